"""Annotation assist: fill a CT's label volume from a few annotated axial slices.

    flare22 propagate --image CT --annotations LABELS --out OUT [--mode interp] [--bundle BUNDLE] [--slices 12,40,77]

The user labels a few axial slices in any tool (the label volume is zero elsewhere); every
other slice is filled from those by one of four modes (``--mode``): ``nearest`` copies the
nearest drawn slice; ``interp`` interpolates each organ's shape between the drawn slices
around it (signed distances blended by distance, :class:`app.shapes.ShapeInterpolator`); ``stcn`` runs
the propagation engine (app.propagation, the same one the appliance runs) from the drawn
slices in both directions; ``fused`` blends STCN's probabilities into the interpolation,
more so the further a slice lies from a drawn one (:class:`FusionConfig`). The default is
chosen from the table in docs/results.md. Annotated slices are copied to the output unchanged
and organs never drawn stay absent. Slice numbers are the file's own k index (the third
ITK axis), whatever the canonical orientation; by default every slice with any label counts
as annotated.

The same functions serve training validation (ground-truth reference slices, scored against
the full ground truth) with the nearest-slice copy as the baseline.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .argtypes import positive_int
from .ctio import check_same_grid, read_ct, write_labels
from .errors import Flare22Error, InputError
from .labels import NUM_CLASSES
from .propagation import PropagationConfig, PropagationEngine
from .resize import resize_labels_nearest, resize_stack
from .shapes import ShapeInterpolator
from .windowing import DEFAULT_WINDOWS, model_slices


def largest_area_slices(labels: np.ndarray) -> list[int]:
    """For every organ present, the slice where its area is largest (unique, sorted)."""
    n = labels.shape[0]
    counts = np.stack([np.bincount(labels[t].ravel(), minlength=NUM_CLASSES)[1:NUM_CLASSES] for t in range(n)])
    return sorted({int(counts[:, o].argmax()) for o in range(counts.shape[1]) if counts[:, o].max() > 0})


def nearest_copy(annotations: np.ndarray, slices: list[int]) -> np.ndarray:
    """Baseline: every slice copies the annotation of the nearest annotated slice."""
    s = np.asarray(sorted(slices))
    out = np.empty_like(annotations)
    for t in range(annotations.shape[0]):
        out[t] = annotations[s[np.abs(s - t).argmin()]]
    return out


MODES = ("nearest", "interp", "stcn", "fused")
DEFAULT_MODE = "interp"


def interpolate(annotations: np.ndarray, slices: list[int], *, vanish: float = 1.0, align: bool = True) -> np.ndarray:
    """Mode ``interp``: every undrawn slice from the shape-based interpolation."""
    si = ShapeInterpolator(annotations, slices, vanish=vanish, align=align)
    out = np.empty_like(annotations, dtype=np.uint8)
    for t in range(annotations.shape[0]):
        out[t] = annotations[t] if t in si.slices else si.labels(t)
    return out


@dataclass
class FusionConfig:
    """Mode ``fused``: per organ, p = (1 - lam) * sigmoid(level / tau) + lam * p_stcn, with
    lam = stcn_weight * min(1, distance to the nearest drawn slice / ramp): next to a drawn
    slice the interpolation is nearly exact, further away STCN's view of the image counts more."""

    tau: float = 2.0  # pixels of the level function per unit of logit
    stcn_weight: float = 0.25  # chosen on the 2 validation phantoms (docs/results.md, "Annotation assist")
    ramp: float = 5.0  # slices
    vanish: float = 1.0


def fuse(interp: ShapeInterpolator, result, t: int, hw: tuple[int, int], cfg: FusionConfig) -> np.ndarray:
    """One slice of mode ``fused`` from the interpolation and the STCN engine's result."""
    ids, lev = interp.levels(t)
    if not len(ids):
        return np.zeros(hw, np.uint8)
    p = 1.0 / (1.0 + np.exp(-np.clip(lev / cfg.tau, -30, 30)))
    dist = min(abs(t - s) for s in interp.slices)
    lam = cfg.stcn_weight * min(1.0, dist / cfg.ramp)
    if lam > 0:
        stcn = result.organ_probs(t)[ids - 1]
        if stcn.shape[-2:] != tuple(hw):
            stcn = resize_stack(stcn, tuple(hw))
        p = (1 - lam) * p + lam * np.clip(stcn, 0, 1)
    bg = np.prod(1 - p, axis=0, keepdims=True)
    win = np.concatenate([bg, p], axis=0).argmax(axis=0)
    return np.concatenate([[0], ids]).astype(np.uint8)[win]


def fill_modes(
    backend,
    volume: np.ndarray,
    annotations: np.ndarray,
    slices: list[int],
    hw: tuple[int, int],
    modes: list[str],
    *,
    windows=DEFAULT_WINDOWS,
    config: PropagationConfig | None = None,
    fusion: FusionConfig | None = None,
    variants: dict[str, FusionConfig] | None = None,
    absent_votes: bool = True,
) -> tuple[dict[str, np.ndarray], dict]:
    """Every mode in ``modes`` from one engine run: {mode: (N, h, w) labels} and stats.
    ``variants`` adds more fused fillings, one per named FusionConfig (for tuning).

    ``absent_votes``: a drawn slice is truth for every organ, so an organ not drawn on it is
    known to be absent there: the pass from that slice votes 0 for it, weighted linearly
    by distance as the votes of the drawn organs are (the engine's reference weights, all
    1). Without it, an organ drawn on one side of a gap is decided by that side's pass
    alone, which must find by itself where the organ ends."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"mode must be one of {MODES}, got {bad[0]!r}")
    n, h, w = volume.shape
    slices = sorted(int(t) for t in slices)
    fusion = fusion or FusionConfig()
    fusions = {"fused": fusion} if "fused" in modes else {}
    fusions.update(variants or {})
    out: dict[str, np.ndarray] = {}
    stats: dict = {"seconds": {}}
    for mode in ("nearest", "interp"):
        if mode in modes:
            t0 = time.perf_counter()
            out[mode] = (nearest_copy(annotations, slices) if mode == "nearest"
                         else interpolate(annotations, slices, vanish=fusion.vanish))
            stats["seconds"][mode] = time.perf_counter() - t0
    if "stcn" in modes or fusions:
        t0 = time.perf_counter()
        refs = {t: resize_labels_nearest(annotations[t], hw).astype(np.uint8) for t in slices}

        def get(idx):
            return model_slices(volume, idx, windows, hw)

        engine = PropagationEngine(backend, config or PropagationConfig(), num_organs=NUM_CLASSES - 1)
        weights = {t: np.ones(NUM_CLASSES - 1) for t in slices} if absent_votes else None
        result = engine.run(n, hw, get, refs, reference_weights=weights)
        stats["engine"] = result.stats.to_json()
        engine_s = time.perf_counter() - t0
        todo = (["stcn"] if "stcn" in modes else []) + list(fusions)
        for name in todo:
            t0 = time.perf_counter()
            if name == "stcn":
                out[name] = np.stack([result.labels(t, (h, w)) for t in range(n)])
            else:
                cfg = fusions[name]
                si = ShapeInterpolator(annotations, slices, vanish=cfg.vanish)
                out[name] = np.stack([fuse(si, result, t, (h, w), cfg) for t in range(n)])
            stats["seconds"][name] = engine_s + time.perf_counter() - t0
    for labels in out.values():
        labels[slices] = annotations[slices]
    return {k: v.astype(np.uint8) for k, v in out.items()}, stats


def propagate_annotations(
    backend,
    volume: np.ndarray,
    annotations: np.ndarray,
    slices: list[int],
    hw: tuple[int, int],
    *,
    windows=DEFAULT_WINDOWS,
    config: PropagationConfig | None = None,
    mode: str = "stcn",
    fusion: FusionConfig | None = None,
    absent_votes: bool = True,
) -> tuple[np.ndarray, dict]:
    """(N, h, w) HU + annotations on ``slices`` -> (N, h, w) labels and stats.

    ``mode``: ``nearest`` (copy the nearest drawn slice), ``interp`` (shape-based
    interpolation), ``stcn`` (the propagation engine alone), ``fused`` (STCN fused with the
    interpolation). The first two need no backend."""
    filled, st = fill_modes(backend, volume, annotations, slices, hw, [mode], windows=windows, config=config,
                            fusion=fusion, absent_votes=absent_votes)
    n = volume.shape[0]
    seconds = st["seconds"][mode]
    stats = {"mode": mode, "seconds": seconds, "seconds_per_slice": seconds / max(1, n - len(set(slices))),
             "references": sorted(int(t) for t in slices)}
    if "engine" in st:
        stats["engine"] = st["engine"]
    return filled[mode], stats


def _parse_slices(text: str | None, annotations: np.ndarray, path: str) -> list[int]:
    if text:
        try:
            slices = sorted({int(s) for s in text.split(",") if s.strip()})
        except ValueError:
            raise InputError(path, f"--slices must be comma-separated integers, got {text!r}") from None
        n = annotations.shape[0]
        if any(not 0 <= t < n for t in slices):
            return slices  # the caller names the slices out of range
        blank = [t for t in slices if not annotations[t].any()]
        drawn = [t for t in range(n) if annotations[t].any()]
        if blank:
            raise InputError(path, f"--slices {blank} hold no annotation (drawn slices: {drawn or 'none'})")
        unlisted = [t for t in drawn if t not in slices]
        if unlisted:
            raise InputError(path, f"slices {unlisted} hold annotations but are not in --slices: they would be "
                                   "overwritten; list them or clear them")
    else:
        slices = [t for t in range(annotations.shape[0]) if annotations[t].any()]
    return slices


OUT_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")


def add_arguments(p) -> None:
    p.add_argument("--image", required=True, help="the CT volume")
    p.add_argument("--annotations", required=True, help="label volume on the CT's grid, zero off the drawn slices")
    p.add_argument("--out", required=True, help="filled label volume to write (.nii.gz)")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help="nearest: copy the nearest drawn slice; interp: shape-based interpolation between drawn "
                        "slices; stcn: the STCN propagation; fused: STCN fused with interp "
                        f"(default {DEFAULT_MODE}: docs/results.md, 'Annotation assist')")
    p.add_argument("--bundle", help="model bundle (its STCN graphs are used; needed by --mode stcn and fused)")
    p.add_argument("--slices", help="comma-separated file k indices that count as annotated (default: any labelled)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "tensorrt"))
    p.add_argument("--threads", type=positive_int)


def run(args) -> int:
    from .backends import load_backends
    from .bundle import load_bundle

    try:
        if not str(args.out).endswith(OUT_SUFFIXES):
            raise InputError(args.out, f"--out needs an image extension ({', '.join(OUT_SUFFIXES)})")
        volume, props = read_ct(args.image)
        ann, aprops = read_ct(args.annotations, label=True)
        check_same_grid(aprops, props, what=f"annotations {args.annotations}")
        if ann.max() >= NUM_CLASSES:
            raise InputError(args.annotations, f"label values up to {ann.max()}; FLARE22 labels are 0..13")
        # slice numbers are given in the file's own k index: map them to canonical z
        k_axis = props.src_axes.index(0)  # canonical axis holding file numpy axis 0 (= ITK k)
        if k_axis != 0:
            raise InputError(args.image, "the file's third axis is not axial; give --slices in canonical order")
        n = ann.shape[0]
        user = _parse_slices(args.slices, ann if not props.flips[0] else ann[::-1], args.annotations)
        slices = [(n - 1 - s) if props.flips[0] else s for s in user]
        bad = [s for s in user if not 0 <= s < n]
        if bad:
            raise InputError(args.annotations, f"slices {bad} outside 0..{n - 1}")
        if not slices:
            raise InputError(args.annotations, "no annotated slice: draw at least one axial slice")
        if args.mode in ("stcn", "fused"):
            if not args.bundle:
                raise InputError(args.image, f"--mode {args.mode} needs --bundle (the STCN graphs)")
            bundle = load_bundle(args.bundle)
            _, stcn, info = load_backends(bundle, device=args.device, threads=args.threads)
            labels, stats = propagate_annotations(stcn, volume, ann, slices, bundle.input_size, windows=bundle.windows,
                                                  config=bundle.propagation, mode=args.mode)
        else:
            info = {"providers": []}
            labels, stats = propagate_annotations(None, volume, ann, slices, (0, 0), mode=args.mode)
        write_labels(labels, props, args.out)
    except Flare22Error as exc:
        print(f"flare22 propagate: {exc}", file=sys.stderr)
        return 2
    report = Path(str(args.out).replace(".nii.gz", "") + ".json")
    report.write_text(json.dumps({"annotated_slices": user, "providers": info["providers"], **stats}, indent=1))
    print(f"filled {n - len(slices)} slices from {len(slices)} annotated ({args.mode}) in {stats['seconds']:.1f} s "
          f"({1000 * stats['seconds_per_slice']:.0f} ms per slice); wrote {args.out}")
    return 0

"""Annotation assist: fill a CT's label volume from a few annotated axial slices.

    flare22 propagate --image CT --annotations LABELS --out OUT --bundle BUNDLE [--slices 12,40,77]

The user labels a few axial slices in any tool (the label volume is zero elsewhere); the
propagation engine (app.propagation, the same one the appliance runs) fills every other
slice from those, in both directions. Annotated slices are copied to the output unchanged
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
from pathlib import Path

import numpy as np

from .argtypes import positive_int
from .ctio import check_same_grid, read_ct, write_labels
from .errors import Flare22Error, InputError
from .labels import NUM_CLASSES
from .propagation import PropagationConfig, PropagationEngine
from .resize import resize_labels_nearest, resize_stack
from .windowing import DEFAULT_WINDOWS, window_slices


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


def propagate_annotations(
    backend,
    volume: np.ndarray,
    annotations: np.ndarray,
    slices: list[int],
    hw: tuple[int, int],
    *,
    windows=DEFAULT_WINDOWS,
    config: PropagationConfig | None = None,
) -> tuple[np.ndarray, dict]:
    """(N, h, w) HU + annotations on ``slices`` -> (N, h, w) labels and the engine's stats."""
    n, h, w = volume.shape
    refs = {int(t): resize_labels_nearest(annotations[t], hw).astype(np.uint8) for t in slices}

    def get(idx):
        return resize_stack(window_slices(volume[np.asarray(idx)], windows), hw)

    engine = PropagationEngine(backend, config or PropagationConfig(), num_organs=NUM_CLASSES - 1)
    t0 = time.perf_counter()
    result = engine.run(n, hw, get, refs)
    out = np.zeros_like(annotations, dtype=np.uint8)
    for t in range(n):
        out[t] = annotations[t] if t in refs else result.labels(t, (h, w))
    seconds = time.perf_counter() - t0
    return out, {"seconds": seconds, "seconds_per_slice": seconds / max(1, n - len(refs)),
                 "references": sorted(refs), "engine": result.stats.to_json()}


def _parse_slices(text: str | None, annotations: np.ndarray, path: str) -> list[int]:
    if text:
        try:
            slices = sorted({int(s) for s in text.split(",") if s.strip()})
        except ValueError:
            raise InputError(path, f"--slices must be comma-separated integers, got {text!r}") from None
    else:
        slices = [t for t in range(annotations.shape[0]) if annotations[t].any()]
    return slices


def add_arguments(p) -> None:
    p.add_argument("--image", required=True, help="the CT volume")
    p.add_argument("--annotations", required=True, help="label volume on the CT's grid, zero off the drawn slices")
    p.add_argument("--out", required=True, help="filled label volume to write (.nii.gz)")
    p.add_argument("--bundle", required=True, help="model bundle (its STCN graphs are used)")
    p.add_argument("--slices", help="comma-separated file k indices that count as annotated (default: any labelled)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "tensorrt"))
    p.add_argument("--threads", type=positive_int)


def run(args) -> int:
    from .backends import load_backends
    from .bundle import load_bundle

    try:
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
        bundle = load_bundle(args.bundle)
        _, stcn, info = load_backends(bundle, device=args.device, threads=args.threads)
        labels, stats = propagate_annotations(stcn, volume, ann, slices, bundle.input_size,
                                              windows=bundle.windows, config=bundle.propagation)
        write_labels(labels, props, args.out)
    except Flare22Error as exc:
        print(f"flare22 propagate: {exc}", file=sys.stderr)
        return 2
    report = Path(str(args.out).replace(".nii.gz", "") + ".json")
    report.write_text(json.dumps({"annotated_slices": user, "providers": info["providers"], **stats}, indent=1))
    print(f"filled {n - len(slices)} slices from {len(slices)} annotated in {stats['seconds']:.1f} s "
          f"({1000 * stats['seconds_per_slice']:.0f} ms per slice); wrote {args.out}")
    return 0

"""The appliance's pipeline: every ``*_0000`` CT in a folder -> ``<case>.nii.gz`` labels.

Per case: read and canonicalise -> window k uniformly sampled axial slices -> the CPS pair
(summed softmax) -> the mode (``MODES``) fills the other slices: a copy of the nearest
sampled slice (the default, every 2nd slice), interpolation, or bidirectional STCN
propagation (app.propagation) from the largest-area or the reliable sampled slices; or
``dense``, the pair on every slice -> probabilities back to the native in-plane size one
slice at a time -> argmax -> the input's exact grid, written atomically. A per-case JSON
report records the mode, the slices sampled, the references chosen, stage timings and the
providers that ran.

Reading the next case overlaps with computing the current one (a bounded queue), writing
happens in a background thread, one bad case never stops the others. Outputs are written
only inside the output (and report) folder, through the run's private temporaries
(app.outputs); clashes between inputs and outputs are refused before the first case, and
Ctrl-C / SIGTERM end the run cleanly.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .argtypes import positive_int, probability
from .backends import DEVICES, EXTRA_BACKENDS, PRECISIONS, RUNTIMES, load_backends
from .bundle import Bundle, load_bundle
from .ctio import CTProperties, case_name, read_ct, write_labels, write_map
from .errors import BundleError, Flare22Error
from .outputs import OutputFolder, hidden_cases, plan_outputs
from .propagation import PUBLISHED, PropagationConfig, PropagationEngine, normalised_entropy, organ_distribution
from .resize import argmax_resized, resize_stack
from .shapes import ShapeInterpolator
from .windowing import model_slices

log = logging.getLogger("flare22")


def sample_candidates(num_slices: int, every: int = 5, maximum: int = 64) -> np.ndarray:
    """Uniform ``linspace`` sampling of num_slices // every slices (at least 1, at most maximum)."""
    k = max(1, min(maximum, num_slices // every))
    return np.unique(np.round(np.linspace(0, num_slices - 1, k)).astype(np.int64))


def select_largest_area(areas: np.ndarray) -> dict[int, list[int]]:
    """``areas`` (k, C) pixel counts per candidate and organ (column 0 = organ 1).

    For each organ predicted on any candidate, the candidate where its area is largest.
    Returns candidate position -> organs it was chosen for (unique candidates)."""
    chosen: dict[int, list[int]] = {}
    for o in range(areas.shape[1]):
        if areas[:, o].max() > 0:
            chosen.setdefault(int(areas[:, o].argmax()), []).append(o + 1)
    return dict(sorted(chosen.items()))


# The pipeline's modes, all in one engine and one cost accounting (evaluation.benchmark).
MODES = {
    "dense": "the CPS pair on every slice, no propagation",
    "interp": "the pair on the sampled slices, its probabilities interpolated linearly along z",
    "nearest": "the pair on the sampled slices, every other slice copies the nearest one's labels",
    "shape": "the pair on the sampled slices, each organ's signed distance interpolated along z (app.shapes)",
    "largest": "STCN from each organ's largest-area sampled slice, with the cost switches on",
    "published": "STCN from each organ's largest-area sampled slice, the paper's propagation",
    "reliable": "STCN from every sampled slice where the pair is reliable, votes weighted by distance",
    "fused": "the reliable STCN fused with interpolation (organs STCN does not carry keep interpolation's)",
}
# The default run (docs/method.md, "Choosing the default"): the mode and sampling a bundle
# gets from `flare22 export` unless told otherwise, and what a manifest without them runs.
DEFAULT_SAMPLING = {"mode": "nearest", "every": 2, "max": 64}
DEFAULT_MODE = DEFAULT_SAMPLING["mode"]
LEGACY_MODES = {"propagate": "largest"}  # the name of the largest-area pipeline before the modes
SAMPLING_KEYS = ("every", "max")  # --propagation-option keys that set the sampling, not the engine


def resolve_settings(manifest: dict, mode: str | None, overrides: dict) -> tuple[str, dict, PropagationConfig]:
    """(mode, sampling {every, max}, engine settings) of a run: the command line's ``mode`` and
    ``overrides`` over the bundle manifest's ``sampling`` (its ``mode``, ``every``, ``max``) and
    ``propagation``. A bad mode, key or value is a ValueError naming it."""
    sampling = dict(manifest.get("sampling", {}))
    mode = mode or overrides.get("mode") or sampling.pop("mode", None) or DEFAULT_MODE
    sampling.pop("mode", None)
    mode = LEGACY_MODES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    engine = {k: v for k, v in overrides.items() if k not in (*SAMPLING_KEYS, "mode")}
    for key in SAMPLING_KEYS:
        if key in overrides:
            try:
                sampling[key] = int(overrides[key])
            except (TypeError, ValueError):
                raise ValueError(f"sampling setting {key}={overrides[key]!r} is not an integer") from None
        if int(sampling.get(key, 1)) < 1:
            raise ValueError(f"sampling setting {key}={sampling[key]!r} must be at least 1")
    known = PropagationConfig.__dataclass_fields__
    cfg = PropagationConfig(**{k: v for k, v in manifest.get("propagation", {}).items() if k in known})
    cfg = cfg.with_overrides(engine)
    if mode == "published":
        cfg = cfg.with_overrides(PUBLISHED)
    every, maximum = sampling.get("every", DEFAULT_SAMPLING["every"]), sampling.get("max", DEFAULT_SAMPLING["max"])
    return mode, {"every": int(every), "max": int(maximum)}, cfg


def pair_labels(probs_fn, volume: np.ndarray, windows, hw: tuple[int, int], batch: int = 8):
    """Yield (slice indices, (B, h, w) uint8 labels) over every axial slice of a canonical
    (N, h, w) HU volume: the one "volume -> pair labels" routine (``--mode dense``, training
    validation and pseudo-labelling run it, with ONNX or torch pairs). Slices are windowed
    and resized to the model input ``hw``, positioned at z / N; ``probs_fn(images,
    positions)`` returns the pair's summed softmax (B, C, H, W), whose argmax after bilinear
    resizing back to (h, w) is the label."""
    n, h, w = volume.shape
    for i in range(0, n, batch):
        z = np.arange(i, min(n, i + batch))
        probs = probs_fn(model_slices(volume, z, windows, hw), (z / n).astype(np.float32))
        yield z, np.stack([argmax_resized(p, (h, w)) for p in probs])


@dataclass
class PredictOptions:
    batch: int = 8
    mode: str | None = None  # one of MODES; None: the bundle's (manifest sampling.mode) or DEFAULT_MODE
    device: str = "auto"
    backend: str = "onnx"
    threads: int | None = None
    runtime: str = "ort"  # ort (ONNX Runtime) or openvino (CPU)
    precision: str = "auto"  # fp32, int8, bf16 (openvino) or auto (the bundle's int8 graphs where it has them)
    io_binding: str = "auto"  # auto (on where a GPU provider runs), on, off: features kept on the device
    memory_read: str = "auto"  # auto (per device, app.backends.MEMORY_READ), graph (stcn_read) or numpy
    propagation: dict = field(default_factory=dict)  # overrides of the bundle's settings (and every / max)
    uncertainty: bool = False  # also return a per-voxel uncertainty map (see Predictor)


class Predictor:
    """A loaded bundle and its backends; ``predict_volume`` runs one canonical CT."""

    def __init__(self, bundle: Bundle, options: PredictOptions | None = None, backends: tuple | None = None):
        """``backends`` = (reference, stcn, info) already built (the GPU script passes live
        torch networks); by default they are loaded from the bundle's graphs."""
        self.bundle = bundle
        self.opt = options or PredictOptions()
        self.hw = bundle.input_size
        self.windows = bundle.windows
        try:
            self.mode, self.sampling, self.prop = resolve_settings(bundle.manifest, self.opt.mode,
                                                                   self.opt.propagation)
        except ValueError as exc:
            raise Flare22Error(f"model bundle {bundle.path}: {exc}") from None
        self.num_organs = bundle.num_classes - 1
        if backends is None:
            self._load(self.opt.device)
        else:
            self.reference, self.stcn, self.info = backends
            self.device = self.opt.device

    def _load(self, device: str) -> None:
        self.reference, self.stcn, self.info = load_backends(
            self.bundle, backend=self.opt.backend, device=device, threads=self.opt.threads,
            runtime=self.opt.runtime, precision=self.opt.precision, io_binding=self.opt.io_binding,
            memory_read=self.opt.memory_read,
        )
        self.device = device

    def slices(self, volume: np.ndarray, idx) -> np.ndarray:
        """Windowed slices at model resolution: (B, 3, H, W) float32."""
        return model_slices(volume, idx, self.windows, self.hw)

    def run_reference(self, volume: np.ndarray, idx: np.ndarray):
        """Yield (batch indices, outputs dict) over ``idx`` in batches."""
        n = volume.shape[0]
        for i in range(0, len(idx), self.opt.batch):
            b = idx[i : i + self.opt.batch]
            out = self.reference(self.slices(volume, b), (b / n).astype(np.float32))
            yield b, out

    def predict_volume(self, volume: np.ndarray) -> tuple[np.ndarray, dict]:
        """(N, h, w) Hounsfield units in canonical orientation -> (N, h, w) uint8 labels."""
        n, h, w = volume.shape
        report: dict = {"num_slices": n, "native_hw": [h, w], "model_hw": list(self.hw), "mode": self.mode}
        if self.mode == "dense":
            return self._dense(volume, report)
        if self.mode in ("largest", "published"):
            return self._largest_area(volume, report)
        return self._every_sampled(volume, report)

    def _dense(self, volume: np.ndarray, report: dict):
        labels = np.zeros(volume.shape, np.uint8)
        t0 = time.perf_counter()
        for z, lab in pair_labels(lambda x, p: self.reference(x, p)["probs"], volume, self.windows, self.hw,
                                  self.opt.batch):
            labels[z] = lab
        report["timings"] = {"reference": time.perf_counter() - t0}
        return labels, report

    def _largest_area(self, volume: np.ndarray, report: dict):
        """``largest`` / ``published``: STCN from each organ's largest-area sampled slice."""
        n, h, w = volume.shape
        timings: dict[str, float] = {}
        labels = np.zeros((n, h, w), np.uint8)
        t0 = time.perf_counter()
        cands = sample_candidates(n, self.sampling["every"], self.sampling["max"])
        areas = np.zeros((len(cands), self.num_organs), np.int64)
        best_area = np.zeros(self.num_organs, np.int64)
        kept: dict[int, tuple] = {}  # candidate pos -> (probs f16, mask, member disagreement f16)
        agreement = []
        pos = 0
        for b, out in self.run_reference(volume, cands):
            probs = out["probs"]
            masks = probs.argmax(axis=1).astype(np.uint8)
            for j in range(len(b)):
                counts = np.bincount(masks[j].ravel(), minlength=self.num_organs + 1)[1:]
                areas[pos + j] = counts
                better = counts > best_area
                if better.any():
                    best_area[better] = counts[better]
                    dis = None
                    if self.opt.uncertainty and "probs_a" in out:
                        dis = (0.5 * np.abs(out["probs_a"][j] - out["probs_b"][j]).sum(0)).astype(np.float16)
                    kept[pos + j] = (probs[j].astype(np.float16), masks[j], dis)
            if "probs_a" in out and "probs_b" in out:
                agreement.append(member_agreement(out["probs_a"], out["probs_b"], self.num_organs))
            pos += len(b)
        timings["reference"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        chosen = select_largest_area(areas)
        refs = {int(cands[c]): kept[c][1] for c in chosen}
        ref_probs = {int(cands[c]): kept[c][0].astype(np.float32) / 2.0 for c in chosen}
        ref_dis = {int(cands[c]): kept[c][2] for c in chosen if kept[c][2] is not None}
        kept.clear()
        timings["selection"] = time.perf_counter() - t0
        report["sampled"] = cands.tolist()
        report["references"] = {str(int(cands[c])): organs for c, organs in chosen.items()}
        if agreement:
            report["member_agreement"] = combine_agreement(agreement)

        if not refs:  # nothing found on any candidate: an empty prediction, honestly
            report["timings"] = timings
            report["warning"] = "no organ predicted on any sampled slice"
            if self.opt.uncertainty:
                report["uncertainty_map"] = np.full((n, h, w), UNCERTAIN, np.uint8)
            return labels, report

        t0 = time.perf_counter()
        engine = PropagationEngine(self.stcn, self.prop, num_organs=self.num_organs)
        result = engine.run(n, self.hw, lambda idx: self.slices(volume, idx), refs, ref_probs)
        timings["propagation"] = time.perf_counter() - t0
        report["propagation"] = {"config": engine.cfg.to_json(), **result.stats.to_json()}

        t0 = time.perf_counter()
        umap = np.zeros((n, h, w), np.uint8) if self.opt.uncertainty else None
        for t in range(n):
            labels[t] = result.labels(t, (h, w))
            if umap is not None:
                if t in ref_dis:  # reference slices: how much the two CPS members disagree
                    umap[t] = uncertainty_slice(ref_dis[t], (h, w))
                else:  # propagated slices: normalised entropy of the composed probabilities
                    umap[t] = uncertainty_slice(result.entropy(t), (h, w))
        timings["compose"] = time.perf_counter() - t0
        if umap is not None:
            report["uncertainty_map"] = umap
        report["timings"] = timings
        return labels, report

    def _every_sampled(self, volume: np.ndarray, report: dict):
        """``interp`` / ``nearest`` / ``shape`` / ``reliable`` / ``fused``: every sampled slice
        keeps the pair's labels; the slices between are filled from the sampled slices on both
        sides."""
        n, h, w = volume.shape
        timings: dict[str, float] = {}
        labels = np.zeros((n, h, w), np.uint8)
        umap = np.zeros((n, h, w), np.uint8) if self.opt.uncertainty else None
        t0 = time.perf_counter()
        cands = sample_candidates(n, self.sampling["every"], self.sampling["max"])
        keep_probs = self.mode in ("interp", "fused")
        probs: list[np.ndarray] = []  # per candidate (C+1, H, W) float16, summed softmax / 2
        masks = np.zeros((len(cands), *self.hw), np.uint8)
        member_dsc = np.ones((len(cands), self.num_organs))
        agreement = []
        pos = 0
        for b, out in self.run_reference(volume, cands):
            both = "probs_a" in out and "probs_b" in out
            for j, t in enumerate(b):
                p = out["probs"][j] / 2.0
                labels[t] = argmax_resized(p, (h, w))
                masks[pos + j] = p.argmax(axis=0)
                if keep_probs:
                    probs.append(p.astype(np.float16))
                if both:
                    member_dsc[pos + j] = member_dice(out["probs_a"][j], out["probs_b"][j], self.num_organs)
                if umap is not None:
                    umap[t] = uncertainty_slice(normalised_entropy(p), (h, w))
            if both:
                agreement.append(member_agreement(out["probs_a"], out["probs_b"], self.num_organs))
            pos += len(b)
        timings["reference"] = time.perf_counter() - t0
        report["sampled"] = cands.tolist()
        if agreement:
            report["member_agreement"] = combine_agreement(agreement)
        sampled = set(cands.tolist())
        others = [t for t in range(n) if t not in sampled]

        result = None
        if self.mode in ("reliable", "fused"):
            t0 = time.perf_counter()
            areas = np.stack([np.bincount(m.ravel(), minlength=self.num_organs + 1)[1:] for m in masks])
            weights = reliability(areas, member_dsc, self.prop.reliable_fraction, self.prop.reliable_agreement)
            refs = {int(c): masks[i] for i, c in enumerate(cands)}
            ref_weights = {int(c): weights[i] for i, c in enumerate(cands)}
            report["references"] = {str(int(c)): [o + 1 for o in np.nonzero((weights[i] > 0) & (areas[i] > 0))[0]]
                                    for i, c in enumerate(cands)}
            timings["selection"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            engine = PropagationEngine(self.stcn, self.prop, num_organs=self.num_organs)
            result = engine.run(n, self.hw, lambda idx: self.slices(volume, idx), refs,
                                reference_weights=ref_weights)
            timings["propagation"] = time.perf_counter() - t0
            report["propagation"] = {"config": engine.cfg.to_json(), **result.stats.to_json()}

        t0 = time.perf_counter()
        shapes = (ShapeInterpolator({int(c): masks[i] for i, c in enumerate(cands)}, cands.tolist())
                  if self.mode == "shape" else None)
        for t in others:
            i = int(np.searchsorted(cands, t))  # cands[i - 1] < t < cands[i]
            lo, hi = (i - 1 if i > 0 else None), (i if i < len(cands) else None)
            if shapes is not None and lo is not None and hi is not None:
                a = (t - cands[lo]) / (cands[hi] - cands[lo])
                labels[t] = argmax_resized(shapes.scores(t, self.num_organs), (h, w))
                if umap is not None:
                    umap[t] = umap[cands[lo if a <= 0.5 else hi]]
                continue
            if self.mode in ("nearest", "shape") or (keep_probs and (lo is None or hi is None)):
                near = lo if hi is None or (lo is not None and t - cands[lo] <= cands[hi] - t) else hi
                labels[t] = labels[cands[near]]
                if umap is not None:
                    umap[t] = umap[cands[near]]
                if self.mode in ("nearest", "interp", "shape"):
                    continue
            dist = None
            if keep_probs and lo is not None and hi is not None:
                a = (t - cands[lo]) / (cands[hi] - cands[lo])
                dist = (1 - a) * probs[lo].astype(np.float32) + a * probs[hi].astype(np.float32)
            if result is not None:
                organs = result.organ_probs(t)
                if dist is not None:  # fused: organs no pass carried here keep interpolation's
                    silent = result.votes[t] == 0
                    organs[silent] = dist[1:][silent]
                stcn = organ_distribution(organs)
                fw = self.prop.fuse_weight
                dist = stcn if dist is None else fw * stcn + (1 - fw) * dist
            labels[t] = argmax_resized(dist, (h, w))
            if umap is not None:
                umap[t] = uncertainty_slice(normalised_entropy(dist), (h, w))
        timings["compose"] = time.perf_counter() - t0
        if umap is not None:
            report["uncertainty_map"] = umap
        report["timings"] = timings
        return labels, report


UNCERTAIN = 255  # the uncertainty map's scale: 0 = certain .. 255 = uncertainty 1


def uncertainty_slice(u: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """One slice of the uncertainty map: a (H, W) map in 0..1 at model resolution, resized to
    the native ``hw`` as one channel (not the class stack: that cost 10x the plain run on
    512 x 512 x 600) and stored as uint8 0..255 (a quarter of float32's memory and write)."""
    u = resize_stack(np.asarray(u, np.float32), hw)
    return np.clip(np.rint(u * UNCERTAIN), 0, UNCERTAIN).astype(np.uint8)


def member_dice(pa: np.ndarray, pb: np.ndarray, num_organs: int) -> np.ndarray:
    """(C+1, H, W) probabilities of the two CPS members on one slice -> (num_organs,) DSC of
    their argmax masks per organ (1 where neither predicts the organ)."""
    ma, mb = pa.argmax(0).ravel(), pb.argmax(0).ravel()
    na = np.bincount(ma, minlength=num_organs + 1)[1:]
    nb = np.bincount(mb, minlength=num_organs + 1)[1:]
    inter = np.bincount(ma[ma == mb], minlength=num_organs + 1)[1:]
    return np.where(na + nb > 0, 2 * inter / np.maximum(na + nb, 1), 1.0)


def reliability(areas: np.ndarray, member_dsc: np.ndarray, fraction: float, agreement: float) -> np.ndarray:
    """(k, C) reference weights of the sampled slices for the engine's weighted votes.

    An organ predicted on a sampled slice is a reference there when its area is at least
    ``fraction`` of its largest on the sampled slices and the two members agree on it (DSC >=
    ``agreement``); its weight is that DSC. Where it is not predicted it votes 0 with weight 1
    (known absent); otherwise (small or disputed) 0: neither propagated nor voted."""
    best = areas.max(axis=0, keepdims=True)
    ok = (areas >= fraction * best) & (member_dsc >= agreement)
    return np.where(areas == 0, 1.0, np.where(ok, member_dsc, 0.0))


def member_agreement(pa: np.ndarray, pb: np.ndarray, num_organs: int) -> dict:
    """Per-organ intersections and sizes of the two CPS members' masks vs their average."""
    ma, mb = pa.argmax(1), pb.argmax(1)
    mavg = (pa + pb).argmax(1)
    stats = np.zeros((num_organs, 3), np.int64)  # inter_a+inter_b, |a|+|b|, 2|avg|
    for o in range(1, num_organs + 1):
        a, b, v = ma == o, mb == o, mavg == o
        stats[o - 1] = [(a & v).sum() + (b & v).sum(), a.sum() + b.sum(), 2 * v.sum()]
    return {"stats": stats}


def combine_agreement(parts: list[dict]) -> dict:
    """The consensus score: mean DSC of each member against their average, per organ and overall."""
    s = sum(p["stats"] for p in parts)
    per_organ = {}
    for o in range(s.shape[0]):
        inter, sizes, avg = s[o]
        if sizes + avg == 0:
            continue
        per_organ[str(o + 1)] = round(float(2 * inter / (sizes + avg)), 4)
    overall = float(np.mean(list(per_organ.values()))) if per_organ else 1.0
    return {"overall": round(overall, 4), "per_organ": per_organ}


# ---------------------------------------------------------------------------------------
# folder runner


def _is_oom(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return any(s in msg for s in ("out of memory", "failed to allocate", "cudnn_status_alloc", "bad_alloc"))


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: the run stops cleanly (whole outputs kept, its temporaries removed).
    Not an Exception: the per-case ``except Exception`` must not swallow it."""

    def __init__(self, signum: int, done: int = 0, total: int = 0):
        self.signum, self.done, self.total = signum, done, total
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@dataclass
class CaseResult:
    case: str
    ok: bool
    seconds: float
    error: str | None = None
    report: dict | None = None


def predict_folder(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    bundle_path: str | os.PathLike,
    options: PredictOptions | None = None,
    report_dir: str | os.PathLike | None = None,
    quiet: bool = False,
    review_threshold: float = 0.8,
) -> list[CaseResult]:
    """Segment every case; raises Flare22Error only for problems that stop every case (all
    of them found before the first case runs), Interrupted on Ctrl-C / SIGTERM."""
    options = options or PredictOptions()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise Flare22Error(f"input folder {input_dir} does not exist")
    bundle = load_bundle(bundle_path)
    report_dir = Path(report_dir) if report_dir else output_dir
    protected = [bundle.path / "manifest.json", *(bundle.path / f for f in bundle.manifest["files"])]
    cases = plan_outputs(input_dir, output_dir, report_dir, uncertainty=options.uncertainty, protected=protected)
    for name in hidden_cases(input_dir):
        log.warning("skipping %s: a name starting with '.' is not a case", input_dir / name)
    folders: list[OutputFolder] = []
    try:
        out = OutputFolder(output_dir)
        folders.append(out)
        rep = out if os.path.realpath(report_dir) == os.path.realpath(output_dir) else OutputFolder(report_dir, "report folder")
        folders.append(rep)
        if not cases:
            log.warning("no *_0000.nii.gz / .nii / .mha cases in %s: nothing to do", input_dir)
            return []
        try:
            predictor = Predictor(bundle, options)
        except Flare22Error:
            raise
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime refusing a graph, an unknown mode: one line
            detail = " ".join(str(exc).split())[:240]
            raise BundleError(bundle.path, f"cannot be used: {type(exc).__name__}: {detail}") from None
        log.info("bundle %s; backend %s; providers %s; precision %s", bundle.path, predictor.info["backend"],
                 predictor.info["providers"], predictor.info.get("precision", "fp32"))
        return _run_cases(predictor, cases, out, rep, quiet, review_threshold)
    finally:
        for f in folders:
            f.close()


def _run_cases(predictor: Predictor, cases: list[Path], out: OutputFolder, rep: OutputFolder, quiet: bool,
               review_threshold: float) -> list[CaseResult]:
    # reader thread: the next case is read while the current one computes
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def reader():
        for path in cases:
            if stop.is_set():
                break
            t0 = time.perf_counter()
            try:
                item = read_ct(path)
                q.put((path, item, None, time.perf_counter() - t0))
            except Exception as exc:  # noqa: BLE001 - reported per case
                q.put((path, None, exc, time.perf_counter() - t0))
        q.put(None)

    threading.Thread(target=reader, daemon=True, name="flare22-reader").start()
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flare22-writer")
    pending: list[tuple[str, Future, CaseResult]] = []
    results: list[CaseResult] = []
    total = len(cases)

    def on_signal(signum, frame):  # pragma: no cover - exercised by a subprocess test
        raise Interrupted(signum)

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    for s in previous:
        signal.signal(s, on_signal)
    try:
        while (item := q.get()) is not None:
            path, loaded, error, read_s = item
            name = case_name(path)
            t0 = time.perf_counter() - read_s
            if error is not None:
                _drain(pending, results, rep, quiet, total, wait=True)  # keep the counter in order
                res = CaseResult(name, False, time.perf_counter() - t0, f"{type(error).__name__}: {error}")
                _finish(res, rep, quiet, len(results) + 1, total)
                results.append(res)
                continue
            volume, props = loaded
            try:
                labels, report = _predict_with_fallback(predictor, volume)
            except Exception as exc:  # noqa: BLE001 - one bad case never stops the others
                log.debug("case %s failed", name, exc_info=True)
                _drain(pending, results, rep, quiet, total, wait=True)
                res = CaseResult(name, False, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
                _finish(res, rep, quiet, len(results) + 1, total)
                results.append(res)
                continue
            report.update(case=name, input=str(path), timings={"read": read_s, **report["timings"]},
                          backend=predictor.info, geometry=props.to_json())
            umap = report.pop("uncertainty_map", None)
            res = CaseResult(name, True, 0.0, report=report)
            fut = writer.submit(_write_case, labels, props, out, f"{name}.nii.gz", umap, rep,
                                f"{name}_uncertainty.nii.gz")
            pending.append((name, fut, res))
            res.seconds = time.perf_counter() - t0
            _drain(pending, results, rep, quiet, total, wait=False)
        _drain(pending, results, rep, quiet, total, wait=True)
        write_review(results, rep, review_threshold)
    except KeyboardInterrupt:
        raise Interrupted(signal.SIGINT, len(results), total) from None
    except Interrupted as exc:
        exc.done, exc.total = len(results), total
        raise
    finally:
        stop.set()
        writer.shutdown(wait=True, cancel_futures=True)
        for s, h in previous.items():
            signal.signal(s, h)
    return results


def _predict_with_fallback(predictor: Predictor, volume: np.ndarray):
    """GPU out of memory: retry with smaller batches, then on the CPU; never lose the case."""
    while True:
        try:
            return predictor.predict_volume(volume)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            if predictor.opt.batch > 1:
                predictor.opt.batch = max(1, predictor.opt.batch // 2)
                log.warning("out of memory: retrying with batch %d", predictor.opt.batch)
            elif predictor.device != "cpu":
                log.warning("out of memory at batch 1: retrying on the CPU")
                predictor._load("cpu")
            else:
                raise


def _write_case(labels: np.ndarray, props: CTProperties, out: OutputFolder, name: str, umap=None,
                rep: OutputFolder | None = None, umap_name: str | None = None) -> float:
    t0 = time.perf_counter()
    write_labels(labels, props, out.folder / name, tmp_dir=out.private)
    if umap is not None:
        write_map(umap, props, rep.folder / umap_name, tmp_dir=rep.private)
    return time.perf_counter() - t0


def write_review(results: list[CaseResult], rep: OutputFolder, threshold: float) -> Path | None:
    """review.csv: cases by ascending member agreement, those below ``threshold`` flagged,
    so that a person looks at the weakest cases first."""
    rows = []
    for r in results:
        q = (r.report or {}).get("member_agreement") if r.ok else None
        if q is None:
            rows.append((-1.0, r.case, "", "failed" if not r.ok else "no score", ""))
            continue
        worst = min(q["per_organ"].items(), key=lambda kv: kv[1]) if q["per_organ"] else ("", "")
        rows.append((q["overall"], r.case, f"{q['overall']:.4f}", "review" if q["overall"] < threshold else "ok",
                     f"{worst[0]}:{worst[1]}"))
    if not rows:
        return None
    rows.sort()
    lines = ["case,quality,flag,weakest_organ"] + [f"{case},{q},{flag},{worst}" for _, case, q, flag, worst in rows]
    return rep.write_text("review.csv", "\n".join(lines) + "\n")


def _drain(pending, results, rep: OutputFolder, quiet, total, wait: bool) -> None:
    while pending and (wait or pending[0][1].done()):
        name, fut, res = pending.pop(0)
        try:
            write_s = fut.result()
            res.report["timings"]["write"] = write_s
            res.seconds += write_s
        except Exception as exc:  # noqa: BLE001
            res.ok, res.error = False, f"{type(exc).__name__}: {exc}"
        _finish(res, rep, quiet, len(results) + 1, total)
        results.append(res)


def _finish(res: CaseResult, rep: OutputFolder, quiet: bool, i: int, total: int) -> None:
    record = {"case": res.case, "ok": res.ok, "seconds": round(res.seconds, 3), "error": res.error}
    if res.report:
        record.update({k: v for k, v in res.report.items() if k not in record})
    rep.write_text(f"{res.case}.json", json.dumps(record, indent=1, default=_json_default))
    if quiet:
        return
    if res.ok:
        refs = ",".join(res.report.get("references", {}).keys()) if res.report else ""
        n = res.report.get("num_slices") if res.report else "?"
        print(f"[{i}/{total}] {res.case}: {n} slices, references [{refs}], {res.seconds:.1f} s", flush=True)
    else:
        print(f"[{i}/{total}] {res.case}: FAILED: {res.error}", file=sys.stderr, flush=True)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# ---------------------------------------------------------------------------------------
# command line


def propagation_option(text: str) -> tuple[str, object]:
    """argparse type of ``--propagation-option KEY=VALUE``: a known key and a value of its type."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    key = key.strip().replace("-", "_")
    try:
        if key in SAMPLING_KEYS:
            resolve_settings({}, None, {key: value})
            return key, int(value)
        return key, getattr(PropagationConfig().with_overrides({key: value}), key)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p) -> None:
    p.add_argument("-i", "--input", required=True, help="folder of *_0000.nii.gz (.nii, .mha) CT volumes")
    p.add_argument("-o", "--output", required=True, help="folder for <case>.nii.gz label maps")
    p.add_argument("--bundle", required=True, help="model bundle folder (manifest.json + graphs)")
    p.add_argument("--report-dir", help="folder for the per-case JSON reports (default: the output folder)")
    p.add_argument("--mode", choices=(*MODES, *LEGACY_MODES), default=None, metavar="MODE",
                   help="how slices between the sampled ones are filled (default: the bundle's, else "
                        f"{DEFAULT_MODE}): " + "; ".join(f"{k}: {v}" for k, v in MODES.items()))
    p.add_argument("--propagation-option", action="append", default=[], type=propagation_option,
                   metavar="KEY=VALUE", help="override a setting of the bundle: every / max (sampling) or a "
                                             "propagation field (top_k, mem_every, reliable_fraction, ...)")
    p.add_argument("--backend", choices=("onnx", *EXTRA_BACKENDS), default="onnx",
                   help="ONNX Runtime (the appliance), or a backend the `flare22` command registers")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--runtime", choices=RUNTIMES, default="ort",
                   help="ort: ONNX Runtime (default); openvino: OpenVINO on the CPU (the optional openvino extra)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): the bundle's int8 graphs where `flare22 quantize` made them, else fp32; "
                        "bf16: fp32 graphs computed in bfloat16 (--runtime openvino, CPUs with AVX-512 BF16 / AMX)")
    p.add_argument("--io-binding", choices=("auto", "on", "off"), default="auto",
                   help="ONNX Runtime I/O binding, STCN features kept on the device between graphs "
                        "(auto, the default: on where a GPU provider runs)")
    p.add_argument("--memory-read", choices=("auto", "graph", "numpy"), default="auto",
                   help="STCN memory read: the bundle's stcn_read graph or numpy (auto, the default: numpy on "
                        "the CPU, the graph on CUDA)")
    p.add_argument("--threads", type=positive_int, help="intra-op threads of the runtime (default: all cores)")
    p.add_argument("--batch", type=positive_int, default=8, help="slices per reference / key-encoder call")
    p.add_argument("--published-propagation", action="store_true",
                   help="the same as --mode published (the authors' propagation and cost)")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write <case>_uncertainty.nii.gz: uint8, 0 = certain .. 255 = most uncertain "
                        "(member disagreement / normalised entropy, x 255)")
    p.add_argument("--review-threshold", type=probability, default=0.8,
                   help="flag cases whose CPS member agreement is below this in review.csv")
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    mode = "published" if args.published_propagation else args.mode
    opts = PredictOptions(batch=args.batch, mode=mode, device=args.device, backend=args.backend,
                          threads=args.threads, runtime=args.runtime, precision=args.precision, io_binding=args.io_binding,
                          memory_read=args.memory_read, propagation=dict(args.propagation_option),
                          uncertainty=args.uncertainty)
    t0 = time.perf_counter()
    try:
        results = predict_folder(args.input, args.output, args.bundle, opts, args.report_dir, args.quiet,
                                 args.review_threshold)
    except Interrupted as exc:
        print(f"flare22 predict: {exc}; {exc.done} of {exc.total} cases written to {args.output}"
              " (whole files only)", file=sys.stderr)
        return 128 + exc.signum
    except (BundleError, Flare22Error) as exc:
        print(f"flare22 predict: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in results if not r.ok]
    print(f"flare22 predict: {len(results) - len(failed)} of {len(results)} cases written to {args.output}"
          f" in {time.perf_counter() - t0:.1f} s" + (f"; FAILED: {', '.join(r.case for r in failed)}" if failed else ""))
    return 1 if failed else 0

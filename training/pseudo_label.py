"""Pseudo labels with uncertainty estimation (paper section 2.2; REFERENCE section 5).

    flare22 pseudo-label --models CKPT_OR_BUNDLE [CKPT_OR_BUNDLE ...] --unlabeled DIR --out DIR \
        --threshold T [--score paper|iou-majority] [--empty-slices skip|one] [--shard i/n] \
        [--device auto|cpu|cuda] [--batch 16]
    flare22 pseudo-label --merge OUT

M trained CPS models segment every axial slice of every unlabelled volume; the volumes on
which they agree well enough become labelled training data, the others stay unlabelled.

Models
------
A model is a reference checkpoint (``.pt`` from ``flare22 train-reference``, run in torch)
or a model bundle folder, of which only the ``reference`` graph is used (ONNX Runtime).
Slices go through the appliance's own path (its dense mode): ``app.ctio.read_ct`` into the
canonical orientation, the model's windows (the bundle's manifest; ``DEFAULT_WINDOWS`` for a
checkpoint), bilinear resize to the model's input size, position z / N. Model m's mask
``Y_m`` is the argmax of its pair's summed softmax after resizing the probabilities back
to the native in-plane size.

Aggregate
---------
``Y_avg`` = the M one-hot masks averaged, argmax (a plurality vote per voxel). Ties go to
the lowest label: background before any organ, a lower organ id before a higher one. So an
organ needs a strict plurality over background; with M = 2 a voxel the two models
disagree on is background when one of them says background. ``Y_avg`` is the pseudo label.

Scores (``Y_m`` against ``Y_avg``; organs 1..13, background is not an organ)
--------------------------------------------------------------------------
``paper`` -- formula (1): the mean over slices k and models m of DSC(Y_m^k, Y_avg^k). The
DSC of two multi-class masks is the mean, over the organs present in either mask, of the
per-organ Dice 2|X_o & Y_o| / (|X_o| + |Y_o|). A pair (m, k) where neither mask holds any
organ has no DSC: ``--empty-slices skip`` (default) leaves it out of the mean, so a scan is
not rewarded for agreeing on empty slices above and below the abdomen; ``one`` counts it
as 1 (formula (1) with K = every slice). A volume where no pair holds an organ scores 1.0
under both (nothing predicted: agreement, as FLARE scores empty against empty); its pseudo
label is all background, which the manifest shows as ``foreground_voxels`` = 0.
Example, one slice, M = 2: Y_1 = {liver: 4 px}, Y_2 = {liver: 2 of those 4 px, spleen:
2 px elsewhere}; Y_avg = {liver: 2 px} (Y_1's other 2 liver px and Y_2's spleen px are
ties with background -> background); DSC(Y_1, Y_avg) = 2*2/(4+2) = 2/3; DSC(Y_2, Y_avg) =
mean(liver 1, spleen 0) = 1/2; score = (2/3 + 1/2) / 2 = 7/12.

``iou-majority`` -- the authors' code: for each model m and organ o, the IoU over the whole
volume (3D) of Y_m == o against Y_avg == o; both empty = 1; a prediction on an empty target
= 0; a target that the model misses = 0 (plain IoU). Score = mean over the 13 M terms.
Organs absent from both count 1, so the score runs high on volumes that show few organs
(the code keeps volumes at >= 0.9).

Both scores and the ``skip``/``one`` variant of ``paper`` are stored for every volume;
``--score`` and ``--empty-slices`` choose the one compared with ``--threshold``
(kept when score >= threshold).

Output folder
-------------
    run.json                          settings and the full case list (every shard writes it)
    records/<case>.json               per-volume scores, written atomically when a volume is done
    aggregated/<case>.nii.gz          the aggregated label of every volume, on the input's grid
    labelled/images/<case>_0000.*     kept: the input image (hard link, or a copy) ...
    labelled/labels/<case>.nii.gz     ... and its pseudo label: a labelled FLARE folder that
                                      ``flare22 train-reference --labelled`` reads as it is
    rejected/images/<case>_0000.*     the rest: an unlabelled FLARE folder (next cycle's CPS input)
    manifest.json, manifest.csv       one row per volume: case, score, kept, threshold, ...

Resumable: a volume with a record made by the same models is not computed again (the
models are not even loaded when every volume is done); it is only filed again into
labelled/ or rejected/, so a rerun with another ``--threshold`` or ``--score`` re-splits
without running a model. A volume that failed (an unreadable file) gets a record with its
error and is retried by the next run.

Sharded: ``--shard i/n`` takes the cases whose index in the sorted list is i modulo n.
Without ``--shard`` the shard comes from torchrun (RANK / WORLD_SIZE) or a SLURM array
(SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_STEP, SLURM_ARRAY_TASK_COUNT).
Each shard writes the manifest of what is done so far; ``--merge OUT`` (``merge(out)``),
run once after all shards, writes the complete one. See docs/scaling.md.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from app.argtypes import positive_int, probability
from app.bundle import load_bundle
from app.ctio import case_name, list_cases, read_ct, write_labels
from app.errors import Flare22Error
from app.labels import NUM_CLASSES
from app.predict import pair_labels
from app.windowing import DEFAULT_WINDOWS

SCORES = ("paper", "iou-majority")
EMPTY_SLICES = ("skip", "one")
MANIFEST_FIELDS = ("case", "score", "kept", "threshold", "score_kind", "empty_slices", "paper",
                   "paper_empty_one", "iou_majority", "foreground_voxels", "slices", "models", "error")


# ---------------------------------------------------------------------------------------
# aggregation and scores


def vote(masks: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """(M, ...) label masks -> the plurality label per voxel; ties to the lowest label."""
    masks = np.asarray(masks)
    counts = np.stack([(masks == c).sum(0, dtype=np.uint16) for c in range(num_classes)])
    return counts.argmax(0).astype(np.uint8)  # argmax takes the first maximum


class Consensus:
    """Agreement of M masks with their aggregate, accumulated over slice batches of a volume."""

    def __init__(self, num_models: int, num_classes: int = NUM_CLASSES):
        self.num_models, self.num_classes = num_models, num_classes
        self.dsc_sum = 0.0  # paper: sum of DSC over (model, slice) pairs with an organ
        self.pairs = 0  # pairs with an organ in either mask
        self.empty_pairs = 0  # pairs with no organ in either mask
        self.inter = np.zeros((num_models, num_classes), np.int64)  # iou-majority, whole volume
        self.pred = np.zeros((num_models, num_classes), np.int64)
        self.target = np.zeros(num_classes, np.int64)

    def update(self, masks: np.ndarray, avg: np.ndarray) -> None:
        """masks (M, B, H, W) and their aggregate avg (B, H, W), integer labels < num_classes."""
        c, b = self.num_classes, avg.shape[0]
        if masks.shape[1:] != avg.shape or len(masks) != self.num_models:
            raise ValueError(f"masks {masks.shape} do not match {self.num_models} models x {avg.shape}")
        if max(masks.max(initial=0), avg.max(initial=0)) >= c or min(masks.min(initial=0), avg.min(initial=0)) < 0:
            raise ValueError(f"labels outside 0..{c - 1}")
        flat_avg = avg.reshape(b, -1).astype(np.int64)
        base = np.arange(b)[:, None] * c * c + flat_avg * c
        self.target += np.bincount(flat_avg.ravel(), minlength=c)[:c]
        for m in range(self.num_models):
            idx = base + masks[m].reshape(b, -1).astype(np.int64)
            conf = np.bincount(idx.ravel(), minlength=b * c * c).reshape(b, c, c)  # [slice, avg, model]
            inter = np.diagonal(conf, axis1=1, axis2=2)
            pred, tgt = conf.sum(1), conf.sum(2)
            self.inter[m] += inter.sum(0)
            self.pred[m] += pred.sum(0)
            denom = (pred + tgt)[:, 1:]
            present = denom > 0
            n_present = present.sum(1)
            dice_sum = np.where(present, 2 * inter[:, 1:] / np.maximum(denom, 1), 0.0).sum(1)
            has = n_present > 0
            self.dsc_sum += float((dice_sum[has] / n_present[has]).sum())
            self.pairs += int(has.sum())
            self.empty_pairs += int((~has).sum())

    def paper(self, empty_slices: str = "skip") -> float:
        if empty_slices not in EMPTY_SLICES:
            raise ValueError(f"empty_slices must be one of {EMPTY_SLICES}, got {empty_slices!r}")
        if self.pairs == 0:
            return 1.0
        if empty_slices == "one":
            return (self.dsc_sum + self.empty_pairs) / (self.pairs + self.empty_pairs)
        return self.dsc_sum / self.pairs

    def iou_majority(self) -> float:
        union = self.pred + self.target[None] - self.inter
        iou = np.where(union > 0, self.inter / np.maximum(union, 1), 1.0)
        return float(iou[:, 1:].mean())

    def scores(self) -> dict[str, float]:
        return {"paper": self.paper("skip"), "paper_empty_one": self.paper("one"),
                "iou_majority": self.iou_majority()}


def dsc_multiclass(x: np.ndarray, y: np.ndarray, num_classes: int = NUM_CLASSES) -> float | None:
    """Mean per-organ Dice over the organs present in either mask; None when neither has one."""
    cons = Consensus(1, num_classes)
    cons.update(np.asarray(x)[None, None], np.asarray(y)[None])
    return cons.dsc_sum if cons.pairs else None


def paper_score(masks: np.ndarray, avg: np.ndarray | None = None, empty_slices: str = "skip") -> float:
    """Formula (1) for masks (M, K, H, W) against avg (K, H, W) (default: their vote)."""
    masks = np.asarray(masks)
    cons = Consensus(masks.shape[0])
    cons.update(masks, vote(masks) if avg is None else np.asarray(avg))
    return cons.paper(empty_slices)


def iou_majority_score(masks: np.ndarray, avg: np.ndarray | None = None) -> float:
    """The authors' score for masks (M, K, H, W) against avg (default: their vote)."""
    masks = np.asarray(masks)
    cons = Consensus(masks.shape[0])
    cons.update(masks, vote(masks) if avg is None else np.asarray(avg))
    return cons.iou_majority()


def select_score(scores: dict, score: str, empty_slices: str) -> float:
    if score == "iou-majority":
        return scores["iou_majority"]
    if score == "paper":
        return scores["paper_empty_one" if empty_slices == "one" else "paper"]
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


# ---------------------------------------------------------------------------------------
# models


def torch_device(device: str):
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


class CheckpointModel:
    """A reference checkpoint's pair in torch: slices -> summed softmax at input size."""

    def __init__(self, path: str | os.PathLike, device: str = "auto"):
        from training.models.reference import REFERENCE_CONFIGS, ReferencePair
        from training.torch_backend import TorchReference
        from training.train_reference import load_pair

        a, b, state = load_pair(path)
        dev = torch_device(device)
        self.reference = TorchReference(ReferencePair(a.to(dev), b.to(dev)).eval(), dev)
        s = REFERENCE_CONFIGS[state["config"]["model"]].image_size
        self.input_size = (s, s)
        self.windows = DEFAULT_WINDOWS  # the trainers window with the defaults (training.data)

    def __call__(self, images: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self.reference(images, positions)["probs"]


class BundleModel:
    """A bundle's ``reference`` graph in ONNX Runtime (the appliance's own backend)."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None):
        from app.backends import OrtReference, providers_for

        bundle = load_bundle(path)
        providers: list = providers_for(device)
        local = int(os.environ.get("LOCAL_RANK", "0"))  # one GPU per torchrun rank
        if local:
            providers = [(p, {"device_id": local}) if p != "CPUExecutionProvider" else p for p in providers]
        self.reference = OrtReference(bundle, providers, threads)
        self.input_size = bundle.input_size
        self.windows = bundle.windows

    def __call__(self, images: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self.reference(images, positions)["probs"]


def load_model(path: str | os.PathLike, device: str = "auto", threads: int | None = None):
    path = Path(path)
    if path.is_dir():
        return BundleModel(path, device, threads)
    if not path.is_file():
        raise Flare22Error(f"model {path} does not exist (a reference checkpoint .pt or a bundle folder)")
    return CheckpointModel(path, device)


def model_id(path: str | os.PathLike) -> str:
    return str(Path(path).resolve())


# ---------------------------------------------------------------------------------------
# one volume


def predict_masks(models, volume: np.ndarray, batch: int = 16):
    """Yield (slice indices, (M, B, h, w) uint8 masks) over every axial slice of a canonical
    (N, h, w) HU volume, each model through its own windows and input size."""
    runs = [pair_labels(m, volume, m.windows, tuple(m.input_size), batch) for m in models]
    for parts in zip(*runs):
        yield parts[0][0], np.stack([labels for _, labels in parts])


def label_volume(models, volume: np.ndarray, batch: int = 16) -> tuple[np.ndarray, Consensus]:
    """The aggregated label (N, h, w) uint8 of a canonical volume and its agreement stats."""
    labels = np.zeros(volume.shape, np.uint8)
    cons = Consensus(len(models))
    for z, masks in predict_masks(models, volume, batch):
        labels[z] = vote(masks)
        cons.update(masks, labels[z])
    return labels, cons


# ---------------------------------------------------------------------------------------
# run


@dataclass
class PseudoLabelConfig:
    models: list[str]
    unlabeled: str
    out: str
    threshold: float
    score: str = "paper"
    empty_slices: str = "skip"
    shard: tuple[int, int] | None = None  # None: from the environment (torchrun, SLURM array)
    device: str = "auto"
    batch: int = 16
    threads: int | None = None
    progress: bool = True

    def settings(self, cases: list[Path]) -> dict:
        return {"models": [model_id(m) for m in self.models], "unlabeled": str(Path(self.unlabeled).resolve()),
                "threshold": self.threshold, "score": self.score, "empty_slices": self.empty_slices,
                "cases": [case_name(c) for c in cases]}


@dataclass
class RunStats:
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"shard {text!r}: expected i/n, e.g. 0/8") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard {text!r}: need 0 <= i < n")
    return i, n


def shard_from_env(env=None) -> tuple[int, int]:
    """(index, count) from torchrun or a SLURM array; (0, 1) otherwise."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) > 1:
        return int(env.get("RANK", "0")), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first, step = int(env.get("SLURM_ARRAY_TASK_MIN", "0")), int(env.get("SLURM_ARRAY_TASK_STEP", "1"))
        return (int(env["SLURM_ARRAY_TASK_ID"]) - first) // step, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def unlabeled_cases(folder: str | os.PathLike) -> list[Path]:
    """The ``*_0000`` images of an unlabelled FLARE folder (``DIR/images``, or DIR itself)."""
    folder = Path(folder)
    images = folder / "images" if (folder / "images").is_dir() else folder
    if not images.is_dir():
        raise Flare22Error(f"unlabelled folder {folder} does not exist")
    cases = list_cases(images)
    if not cases:
        raise Flare22Error(f"{images} holds no *_0000 CT images")
    return cases


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def label_case(models, model_ids: list[str], image: Path, out: Path, batch: int) -> dict:
    """Label one volume: write aggregated/<case>.nii.gz, then its record (atomically, last)."""
    t0 = time.perf_counter()
    name = case_name(image)
    volume, props = read_ct(image)
    labels, cons = label_volume(models, volume, batch)
    write_labels(labels, props, out / "aggregated" / f"{name}.nii.gz")
    counts = np.bincount(labels.ravel(), minlength=NUM_CLASSES)
    record = {"case": name, "image": str(image), "models": model_ids, "scores": cons.scores(),
              "slices": int(volume.shape[0]), "shape_zyx": list(volume.shape),
              "foreground_voxels": int(counts[1:].sum()),
              "organ_voxels": {str(o): int(counts[o]) for o in range(1, NUM_CLASSES) if counts[o]},
              "seconds": round(time.perf_counter() - t0, 3)}
    write_json(out / "records" / f"{name}.json", record)
    return record


def _place(src: Path, dst: Path) -> None:
    """Hard-link (or copy, across file systems) src to dst, atomically; no-op when in place."""
    if dst.exists():
        a, b = src.stat(), dst.stat()
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) or (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns):
            return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def file_case(out: Path, image: Path, kept: bool) -> None:
    """Put a labelled volume into labelled/ (kept) or rejected/ (not), out of the other."""
    name = case_name(image)
    lab_img, lab_lab = out / "labelled" / "images" / image.name, out / "labelled" / "labels" / f"{name}.nii.gz"
    rej_img = out / "rejected" / "images" / image.name
    if kept:
        _place(image, lab_img)
        _place(out / "aggregated" / f"{name}.nii.gz", lab_lab)
        rej_img.unlink(missing_ok=True)
    else:
        _place(image, rej_img)
        lab_img.unlink(missing_ok=True)
        lab_lab.unlink(missing_ok=True)


def pseudo_label(cfg: PseudoLabelConfig) -> dict:
    """Label this shard's volumes (skipping those done), file them, write the manifest."""
    if cfg.score not in SCORES or cfg.empty_slices not in EMPTY_SLICES:
        raise ValueError(f"score {cfg.score!r} / empty_slices {cfg.empty_slices!r} unknown")
    if not cfg.models:
        raise ValueError("no models given")
    out = Path(cfg.out)
    cases = unlabeled_cases(cfg.unlabeled)
    index, count = cfg.shard or shard_from_env()
    settings = cfg.settings(cases)
    ids = settings["models"]
    mine = [c for k, c in enumerate(cases) if k % count == index]
    records = {c: _read_json(out / "records" / f"{case_name(c)}.json") for c in mine}
    for c, record in records.items():  # refuse before touching anything
        if record is not None and "error" not in record and record["models"] != ids:
            raise Flare22Error(f"{out}: {case_name(c)} was labelled by other models ({record['models']}); "
                               "use a fresh --out or delete its records/")
    write_json(out / "run.json", settings)
    stats, models = RunStats(), None
    from tqdm import tqdm

    for image in tqdm(mine, disable=not cfg.progress, desc=f"pseudo-label {index}/{count}", dynamic_ncols=True):
        name, record = case_name(image), records[image]
        if record is None or "error" in record:
            if models is None:
                _set_threads(cfg.threads)
                models = [load_model(m, cfg.device, cfg.threads) for m in cfg.models]
            try:
                record = label_case(models, ids, image, out, cfg.batch)
            except Flare22Error as exc:  # one unreadable volume does not stop the others
                failed = {"case": name, "image": str(image), "models": ids, "error": str(exc)}
                write_json(out / "records" / f"{name}.json", failed)
                stats.failed.append(name)
                continue
            stats.computed.append(name)
        else:
            stats.skipped.append(name)
        file_case(out, image, select_score(record["scores"], cfg.score, cfg.empty_slices) >= cfg.threshold)
    manifest = merge(out)
    return {"shard": [index, count], **asdict(stats), "manifest": manifest["counts"]}


def _set_threads(threads: int | None) -> None:
    if threads:
        try:
            import torch
        except ImportError:  # bundles only: ONNX Runtime takes the threads per session
            return
        torch.set_num_threads(int(threads))


# ---------------------------------------------------------------------------------------
# manifest


def merge(out: str | os.PathLike) -> dict:
    """Join the per-volume records into manifest.json and manifest.csv (settings from run.json)."""
    out = Path(out)
    settings = _read_json(out / "run.json")
    if settings is None:
        raise Flare22Error(f"{out} has no run.json: not a pseudo-label output folder")
    rows, missing = [], []
    for name in settings["cases"]:
        record = _read_json(out / "records" / f"{name}.json")
        if record is None:
            missing.append(name)
            continue
        row = {"case": name, "threshold": settings["threshold"], "score_kind": settings["score"],
               "empty_slices": settings["empty_slices"], "models": record["models"]}
        if "error" in record:
            row.update(score=None, kept=False, error=record["error"])
        else:
            s = record["scores"]
            score = select_score(s, settings["score"], settings["empty_slices"])
            row.update(score=score, kept=score >= settings["threshold"], paper=s["paper"],
                       paper_empty_one=s["paper_empty_one"], iou_majority=s["iou_majority"],
                       foreground_voxels=record["foreground_voxels"], slices=record["slices"])
        rows.append({k: row.get(k) for k in MANIFEST_FIELDS})
    kept = sum(r["kept"] for r in rows)
    failed = sum(r["error"] is not None for r in rows)
    manifest = {
        "settings": {k: v for k, v in settings.items() if k != "cases"},
        "counts": {"cases": len(settings["cases"]), "done": len(rows) - failed, "kept": kept,
                   "rejected": len(rows) - failed - kept, "failed": failed, "missing": len(missing)},
        "complete": not missing and not failed,
        "missing": missing,
        "cases": rows,
    }
    write_json(out / "manifest.json", manifest)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "models": ";".join(r["models"]), "error": r["error"] or "",
                         **{k: ("" if r[k] is None else r[k]) for k in ("score", "paper", "paper_empty_one",
                                                                         "iou_majority", "foreground_voxels",
                                                                         "slices")}})
    tmp = out / f".manifest.csv.{os.getpid()}.tmp"
    tmp.write_text(buf.getvalue())
    os.replace(tmp, out / "manifest.csv")
    return manifest


# ---------------------------------------------------------------------------------------
# command line


def _shard_arg(text: str) -> tuple[int, int]:
    import argparse

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p) -> None:
    p.add_argument("--models", nargs="+", metavar="CKPT_OR_BUNDLE",
                   help="reference checkpoints (.pt) and/or model bundle folders, M >= 2")
    p.add_argument("--unlabeled", "--unlabelled", dest="unlabeled", help="unlabelled FLARE folder (images/)")
    p.add_argument("--out", help="output folder (labelled/, rejected/, records/, manifest)")
    p.add_argument("--threshold", type=probability, help="keep a volume when its score >= this")
    p.add_argument("--score", choices=SCORES, default="paper",
                   help="paper: mean DSC vs the averaged mask (formula 1); iou-majority: the authors' code")
    p.add_argument("--empty-slices", choices=EMPTY_SLICES, default="skip",
                   help="paper score: leave out (skip) or count as 1 slices where neither mask has an organ")
    p.add_argument("--shard", type=_shard_arg, metavar="i/n",
                   help="process cases with index %% n == i (default: torchrun / SLURM array, else all)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch", type=positive_int, default=16, help="slices per forward pass")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch / ONNX Runtime")
    p.add_argument("--merge", metavar="OUT", help="only join OUT/records into OUT/manifest.{json,csv}")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    import sys

    if args.merge:
        m = merge(args.merge)
        print(json.dumps({"manifest": str(Path(args.merge) / "manifest.json"), **m["counts"]}))
        return 0 if m["complete"] else 1
    missing = [f for f, v in (("--models", args.models), ("--unlabeled", args.unlabeled), ("--out", args.out),
                              ("--threshold", args.threshold)) if v is None]
    if missing:
        print(f"flare22 pseudo-label: {', '.join(missing)} required (or --merge OUT)", file=sys.stderr)
        return 2
    cfg = PseudoLabelConfig(models=args.models, unlabeled=args.unlabeled, out=args.out, threshold=args.threshold,
                            score=args.score, empty_slices=args.empty_slices, shard=args.shard, device=args.device,
                            batch=args.batch, threads=args.threads, progress=not args.no_progress)
    summary = pseudo_label(cfg)
    print(json.dumps({"computed": len(summary["computed"]), "skipped": len(summary["skipped"]),
                      "failed": summary["failed"], "shard": summary["shard"], **summary["manifest"]}))
    return 1 if summary["failed"] else 0

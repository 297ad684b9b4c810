"""Train -> pseudo-label -> retrain cycles (paper section 2.2, Table 5 rows 3 and 4).

    flare22 cycle --labelled DIR --unlabeled DIR --out DIR --cycles N --models M --threshold T \
        [--iterations I] [--config tiny] [--val DIR] [--start-cycle k]

Cycle k, in ``out/cycle_<k>/``:

    train/            the cycle's labelled set: a FLARE folder of symlinks to the given
                      labelled cases and to every pseudo label kept in cycles < k (k > 0)
    model_<m>/        M reference pairs (train_reference run folders, ``best.pt``), seeds
                      seed + m: the same M initialisations every cycle, so cycles differ by
                      their data only
    pseudo/           training.pseudo_label's output over the cycle's pool
    inputs.json       the cases of the cycle's labelled set and pool
    validation.json   held-out DSC (--val) of each model and of the M models' vote
    summary.json      what the cycle used and produced

The pool of cycle 0 is ``--unlabeled``; the pool of cycle k is what cycle k-1 rejected. The
pool is the cycle's CPS (unlabelled) input and what it pseudo-labels; kept volumes join the
labelled set for the following cycles. A cycle whose pool is empty trains on everything
labelled and ends the loop (every unlabelled volume has been used, as the paper stops).

Restart: a finished step is found by its output and skipped (a model by ``best.pt``, and an
interrupted one resumes from its ``last.pt``; pseudo labels by their per-volume records;
validation by ``validation.json``), so rerunning the same command continues where it
stopped. A rerun may change ``--threshold``: the pseudo labels are re-split from their
records without running a model, and a cycle whose models were already trained on the old
split refuses to go on (``inputs.json`` holds its case lists; delete the cycle's folder to
retrain it). ``--start-cycle k`` begins at cycle k without looking at the steps of earlier
cycles; it needs their ``pseudo/`` folders.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from app.argtypes import nonneg_int, positive_float, positive_int, probability
from app.ctio import case_name, list_cases, read_ct, read_label_like
from app.errors import Flare22Error
from training.data import scan_folder
from training.models.reference import REFERENCE_CONFIGS
from training.pseudo_label import (EMPTY_SLICES, SCORES, PseudoLabelConfig, load_model, predict_masks,
                                   pseudo_label, vote, write_json)
from training.train_reference import ReferenceTrainConfig, organ_dsc, train


@dataclass
class CycleConfig:
    labelled: str
    unlabeled: str
    out: str
    cycles: int = 2
    models: int = 2
    threshold: float = 0.9
    score: str = "paper"
    empty_slices: str = "skip"
    iterations: int = 2000
    lr: float = 1e-4
    config: str = "tiny"
    val: str = ""
    seed: int = 0
    device: str = "auto"
    batch: int = 16
    start_cycle: int = 0
    cache_dir: str = ""
    progress: bool = True


def run_cycles(cfg: CycleConfig) -> list[dict]:
    out = Path(cfg.out)
    summaries = []
    for k in range(cfg.start_cycle, cfg.cycles):
        cdir = out / f"cycle_{k}"
        labelled, pool = cycle_inputs(cfg, k)
        check_inputs(cdir, labelled, pool, cfg.models)
        ckpts = [train_model(cfg, cdir / f"model_{m}", cfg.seed + m, labelled, pool) for m in range(cfg.models)]
        pseudo = None
        if pool:
            pseudo = pseudo_label(PseudoLabelConfig(
                models=[str(c) for c in ckpts], unlabeled=pool, out=str(cdir / "pseudo"), threshold=cfg.threshold,
                score=cfg.score, empty_slices=cfg.empty_slices, shard=(0, 1), device=cfg.device, batch=cfg.batch,
                progress=cfg.progress))["manifest"]
        val = validate_cycle(cfg, cdir, ckpts)
        summary = {"cycle": k, "labelled": labelled, "labelled_cases": len(list_cases(Path(labelled) / "images")),
                   "pool": pool, "pool_cases": len(list_cases(Path(pool) / "images")) if pool else 0,
                   "checkpoints": [str(c) for c in ckpts], "pseudo_labels": pseudo,
                   "threshold": cfg.threshold, "score": cfg.score, "validation": val}
        write_json(cdir / "summary.json", summary)
        summaries.append(summary)
        if not pool:
            break
    done = [json.loads(p.read_text()) for k in range(cfg.cycles) if (p := out / f"cycle_{k}" / "summary.json").exists()]
    write_json(out / "cycles.json", {"config": asdict(cfg), "cycles": done})
    return summaries


def cycle_inputs(cfg: CycleConfig, k: int) -> tuple[str, str]:
    """(labelled folder, pool folder or "") of cycle k."""
    if k == 0:
        return cfg.labelled, cfg.unlabeled
    out = Path(cfg.out)
    pseudo = [out / f"cycle_{j}" / "pseudo" for j in range(k)]
    last = pseudo[-1]
    if not (last / "manifest.json").exists():
        raise Flare22Error(f"cycle {k} needs cycle {k - 1}'s pseudo labels, but {last}/manifest.json is missing")
    kept = [p / "labelled" for p in pseudo if (p / "labelled" / "labels").is_dir()
            and list_cases(p / "labelled" / "images")]
    labelled = combine_labelled(out / f"cycle_{k}" / "train", [Path(cfg.labelled), *kept])
    rejected = last / "rejected" / "images"
    pool = str(last / "rejected") if rejected.is_dir() and list_cases(rejected) else ""
    return str(labelled), pool


def check_inputs(cdir: Path, labelled: str, pool: str, models: int) -> None:
    """Record the cycle's case lists in inputs.json; refuse to reuse models trained on others
    (e.g. after a rerun with another --threshold re-split the previous cycle)."""
    inputs = {"labelled": [case_name(p) for p in list_cases(Path(labelled) / "images")],
              "pool": [case_name(p) for p in list_cases(Path(pool) / "images")] if pool else []}
    path = cdir / "inputs.json"
    previous = json.loads(path.read_text()) if path.exists() else None
    started = any((cdir / f"model_{m}" / n).exists() for m in range(models) for n in ("last.pt", "best.pt"))
    if previous is not None and previous != inputs and started:
        raise Flare22Error(f"{cdir} was trained on other cases than this run gives it (another threshold for "
                           f"the cycle before?): delete {cdir} to retrain it")
    write_json(path, inputs)


def combine_labelled(dst: Path, sources: list[Path]) -> Path:
    """A labelled FLARE folder of absolute symlinks to every case of ``sources`` (rebuilt)."""
    if dst.exists():
        shutil.rmtree(dst)
    seen: dict[str, Path] = {}
    for src in sources:
        for image, label in scan_folder(src, labelled=True):
            name = case_name(image)
            if name in seen:
                raise Flare22Error(f"case {name} is in both {seen[name]} and {src}")
            seen[name] = src
            for f, sub in ((image, "images"), (label, "labels")):
                (dst / sub).mkdir(parents=True, exist_ok=True)
                os.symlink(Path(f).resolve(), dst / sub / Path(f).name)
    return dst


def train_model(cfg: CycleConfig, run_dir: Path, seed: int, labelled: str, pool: str) -> Path:
    """One reference pair; skipped when ``best.pt`` exists, resumed from ``last.pt``."""
    best, last = run_dir / "best.pt", run_dir / "last.pt"
    if best.exists():
        return best
    tcfg = ReferenceTrainConfig(model=cfg.config, iterations=cfg.iterations, lr=cfg.lr, seed=seed,
                                device=cfg.device, labelled=labelled, unlabelled=pool, cache_dir=cfg.cache_dir,
                                val_every=max(1, min(500, cfg.iterations)))
    train(tcfg, run_dir, resume=str(last) if last.exists() else None, progress=cfg.progress)
    return best


def validate_cycle(cfg: CycleConfig, cdir: Path, ckpts: list[Path]) -> dict | None:
    if not cfg.val:
        return None
    path = cdir / "validation.json"
    if path.exists():
        return json.loads(path.read_text())
    res = evaluate(ckpts, cfg.val, cfg.device, cfg.batch)
    write_json(path, res)
    return res


def evaluate(models: list[Path | str], val_dir: str, device: str = "auto", batch: int = 16) -> dict:
    """Held-out DSC of each model and of their vote: per organ pooled over cases, then the
    mean over organs (organs present in the ground truth; as train_reference.validate)."""
    loaded = [load_model(m, device) for m in models]
    per_model: list[dict[int, list[float]]] = [{} for _ in loaded]
    ensemble: dict[int, list[float]] = {}
    for image, label in scan_folder(val_dir, labelled=True):
        volume, props = read_ct(image)
        gt = read_label_like(label, props)
        masks = np.zeros((len(loaded), *volume.shape), np.uint8)
        for z, m in predict_masks(loaded, volume, batch):
            masks[:, z] = m
        for store, pred in (*zip(per_model, masks), (ensemble, vote(masks))):
            for o, d in organ_dsc(pred, gt).items():
                store.setdefault(o, []).append(d)

    def summary(store):
        per_organ = {o: float(np.mean(v)) for o, v in sorted(store.items())}
        return {"mean_dsc": float(np.mean(list(per_organ.values()))) if per_organ else 0.0,
                "per_organ": {str(o): round(v, 4) for o, v in per_organ.items()}}

    models_res = [{"checkpoint": str(m), **summary(s)} for m, s in zip(models, per_model)]
    return {"models": models_res, "mean_model_dsc": float(np.mean([r["mean_dsc"] for r in models_res])),
            "ensemble": summary(ensemble)}


def add_arguments(p) -> None:
    p.add_argument("--labelled", required=True, help="labelled FLARE folder (images/, labels/)")
    p.add_argument("--unlabeled", "--unlabelled", dest="unlabeled", required=True, help="unlabelled FLARE folder")
    p.add_argument("--out", required=True, help="cycles folder: cycle_<k>/ per cycle")
    p.add_argument("--cycles", type=positive_int, default=2, help="number of train -> label cycles")
    p.add_argument("--models", type=positive_int, default=2, help="CPS pairs per cycle (M)")
    p.add_argument("--threshold", type=probability, required=True, help="keep a volume when its score >= this")
    p.add_argument("--score", choices=SCORES, default="paper")
    p.add_argument("--empty-slices", choices=EMPTY_SLICES, default="skip")
    p.add_argument("--iterations", type=positive_int, default=2000, help="training iterations per model")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate (the paper: 1e-4)")
    p.add_argument("--config", default="tiny", choices=sorted(REFERENCE_CONFIGS))
    p.add_argument("--val", default="", help="held-out labelled FLARE folder: DSC per cycle")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch", type=positive_int, default=16, help="slices per forward pass when labelling")
    p.add_argument("--start-cycle", type=nonneg_int, default=0)
    p.add_argument("--cache-dir", default="")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    cfg = CycleConfig(labelled=args.labelled, unlabeled=args.unlabeled, out=args.out, cycles=args.cycles,
                      models=args.models, threshold=args.threshold, score=args.score,
                      empty_slices=args.empty_slices, iterations=args.iterations, lr=args.lr, config=args.config,
                      val=args.val, seed=args.seed, device=args.device, batch=args.batch, start_cycle=args.start_cycle,
                      cache_dir=args.cache_dir, progress=not args.no_progress)
    for s in run_cycles(cfg):
        val = s["validation"]
        pl = s["pseudo_labels"] or {}
        print(f"cycle {s['cycle']}: {s['labelled_cases']} labelled, pool {s['pool_cases']}, "
              f"kept {pl.get('kept', 0)}, rejected {pl.get('rejected', 0)}"
              + (f", held-out DSC {val['mean_model_dsc']:.4f} (vote {val['ensemble']['mean_dsc']:.4f})" if val else ""))
    return 0

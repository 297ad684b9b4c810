"""One pseudo-label cycle on phantoms: held-out DSC before and after the pseudo labels.

    .venv/bin/python bench/pseudo_label_cycle.py [--work bench/out/pseudo_label_cycle] \
        [--iterations 300] [--lr 1e-4] [--models 2] [--labelled 2] [--unlabeled 32] [--val 4] \
        [--shape 48 64 64] [--threshold T | --keep-fraction F] [--score paper] [--threads 1]

1. Phantoms (evaluation.phantom): labelled, unlabelled and held-out sets from separate seeds. The
   unlabelled phantoms' true labels are kept aside (truth/) to grade the pseudo labels; the
   pipeline sees only their images (unlabeled/images, hard links).
2. Cycle 0 (training.cycle): M tiny CPS pairs on the labelled set with the unlabelled set
   as CPS input; pseudo labels and scores for every unlabelled volume.
3. The threshold: --threshold, or the score that keeps --keep-fraction of the volumes.
4. Cycle 1: M pairs retrained from the same seeds on labelled + kept pseudo labels, the
   rejected volumes as CPS input.
5. report.json: held-out DSC (mean over the M pairs, and the pairs' vote) of both cycles,
   the share kept, the true DSC of kept and rejected pseudo labels, and the rank
   correlation between the consensus score and the pseudo labels' true DSC.

Every step is restartable (training.cycle skips what is done): rerunning the command
continues, and a rerun with another threshold retrains only cycle 1 (delete cycle_1/).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.argtypes import positive_float, positive_int, probability  # noqa: E402
from app.ctio import read_ct, read_label_like  # noqa: E402
from evaluation.phantom import write_dataset  # noqa: E402
from training.cycle import CycleConfig, run_cycles  # noqa: E402
from training.train_reference import organ_dsc  # noqa: E402


def make_data(work: Path, args) -> None:
    shape = tuple(args.shape)
    if not (work / "labelled" / "labels").is_dir():
        write_dataset(work / "labelled", args.labelled, seed=101, shape_zyx=shape, prefix="Lab")
    if not (work / "truth" / "labels").is_dir():
        write_dataset(work / "truth", args.unlabeled, seed=102, shape_zyx=shape, prefix="Case")
    images = work / "unlabeled" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for f in sorted((work / "truth" / "images").iterdir()):
        if not (images / f.name).exists():
            os.link(f, images / f.name)
    if not (work / "val" / "labels").is_dir():
        write_dataset(work / "val", args.val, seed=103, shape_zyx=shape, prefix="Val")


def true_quality(work: Path, pseudo: Path) -> dict[str, float]:
    """Mean organ DSC of each aggregated pseudo label against the phantom's true label."""
    out = {}
    for lab in sorted((pseudo / "aggregated").glob("*.nii.gz")):
        case = lab.name[: -len(".nii.gz")]
        _, props = read_ct(work / "truth" / "images" / f"{case}_0000.nii.gz")
        truth = read_label_like(work / "truth" / "labels" / f"{case}.nii.gz", props)
        pred = read_label_like(lab, props)
        d = organ_dsc(pred, truth)
        out[case] = float(np.mean(list(d.values()))) if d else 0.0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="bench/out/pseudo_label_cycle")
    p.add_argument("--iterations", type=positive_int, default=300)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--models", type=positive_int, default=2)
    p.add_argument("--labelled", type=positive_int, default=2)
    p.add_argument("--unlabeled", type=positive_int, default=32)
    p.add_argument("--val", type=positive_int, default=4)
    p.add_argument("--shape", type=positive_int, nargs=3, default=(48, 64, 64), metavar=("Z", "Y", "X"))
    p.add_argument("--threshold", type=probability, help="absolute score threshold")
    p.add_argument("--keep-fraction", type=probability, default=0.5, help="used when --threshold is not given")
    p.add_argument("--score", choices=("paper", "iou-majority"), default="paper")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work).resolve()
    os.environ.setdefault("FLARE22_CACHE", str(work / "cache"))
    t0 = time.time()
    make_data(work, args)
    base = dict(labelled=str(work / "labelled"), unlabeled=str(work / "unlabeled"), out=str(work / "cycles"),
                models=args.models, iterations=args.iterations, lr=args.lr, val=str(work / "val"), device=args.device,
                score=args.score, progress=False, cache_dir=str(work / "cache"))
    timings = {"data": time.time() - t0}

    t0 = time.time()
    run_cycles(CycleConfig(**base, cycles=1, threshold=2.0))  # scores only: nothing can reach 2
    timings["cycle_0"] = time.time() - t0
    pseudo0 = work / "cycles" / "cycle_0" / "pseudo"
    rows = json.loads((pseudo0 / "manifest.json").read_text())["cases"]
    scores = np.array([r["score"] for r in rows])
    if args.threshold is not None:
        threshold = args.threshold
    else:  # the score of the volume at the keep-fraction rank: ties may keep a few more
        k = max(1, int(round(args.keep_fraction * len(scores))))
        threshold = float(np.sort(scores)[::-1][k - 1])

    t0 = time.time()
    summaries = run_cycles(CycleConfig(**base, cycles=2, threshold=threshold))
    timings["cycle_1"] = time.time() - t0
    by_cycle = {s["cycle"]: s for s in summaries}
    rows = json.loads((pseudo0 / "manifest.json").read_text())["cases"]
    quality = true_quality(work, pseudo0)
    kept = [r for r in rows if r["kept"]]
    rejected = [r for r in rows if not r["kept"]]
    from scipy.stats import spearmanr

    rho = spearmanr([r["score"] for r in rows], [quality[r["case"]] for r in rows]).statistic

    def val(c):
        v = by_cycle[c]["validation"]
        return {"mean_model_dsc": round(v["mean_model_dsc"], 4), "vote_dsc": round(v["ensemble"]["mean_dsc"], 4),
                "per_model": [round(m["mean_dsc"], 4) for m in v["models"]]}

    report = {
        "settings": {k: v for k, v in vars(args).items()}, "threshold": threshold,
        "held_out_before": val(0), "held_out_after": val(1),
        "kept": len(kept), "unlabeled": len(rows), "kept_share": round(len(kept) / len(rows), 4),
        "scores": {"min": float(scores.min()), "median": float(np.median(scores)), "max": float(scores.max())},
        "pseudo_label_true_dsc": {
            "all": round(float(np.mean(list(quality.values()))), 4),
            "kept": round(float(np.mean([quality[r["case"]] for r in kept])), 4) if kept else None,
            "rejected": round(float(np.mean([quality[r["case"]] for r in rejected])), 4) if rejected else None,
        },
        "spearman_score_vs_true_dsc": round(float(rho), 4),
        "per_volume": [{"case": r["case"], "score": round(r["score"], 4), "iou_majority": round(r["iou_majority"], 4),
                        "true_dsc": round(quality[r["case"]], 4), "kept": r["kept"]} for r in rows],
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
    }
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "per_volume"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

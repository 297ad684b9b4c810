"""Learnability on phantoms (issues 3 and 4), one command per figure:

    python bench/learnability.py reference   --minutes 10
    python bench/learnability.py propagation --minutes 10
    python bench/learnability.py semi        --iterations 2000 --minutes 0 --arm sup|cps [--seed S]  # CPS vs labelled-only
    python bench/learnability.py semi-report                       # table of every finished arm
    python bench/learnability.py real        --minutes 5           # train on TotalSegEx_0001, score 0003

Data: 16 labelled phantoms of 128 x 128 x 48 (the `tiny` input size), 16 unlabelled, 4
held-out; all drawn from fixed seeds (`semi` uses the first 2 labelled). `--seed` changes
the training (initialisation, sampling), never the data. Scores come from the project's scorer (evaluation.scoring) on the
held-out volumes at their native grid. Results are printed and written as JSON under
bench/out/learnability/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.argtypes import nonneg_float, nonneg_int, positive_float, positive_int, probability  # noqa: E402
from app.labels import ORGANS  # noqa: E402
from evaluation.phantom import write_dataset  # noqa: E402
from evaluation.scoring import dice  # noqa: E402
from training import train_propagation as TP  # noqa: E402
from training import train_reference as TR  # noqa: E402
from training.data import load_folder  # noqa: E402

OUT = ROOT / "bench" / "out" / "learnability"
SHAPE = (48, 128, 128)


def data(n_lab=16, n_unl=16, n_val=4):
    d = OUT / "data"
    for name, n, seed, unl in (("lab", n_lab, 100, False), ("unl", n_unl, 200, True), ("val", n_val, 300, False)):
        if n and not (d / name / "images").exists():
            write_dataset(d / name, n, seed=seed, shape_zyx=SHAPE, unlabeled=unl)
    return d


def score_pair(ckpt, vols) -> dict:
    import torch

    a, b, state = TR.load_pair(ckpt)
    size = state["config"] and 128
    per = {}
    for v in vols:
        pred = TR.predict_labels([a, b], v, size, torch.device("cpu"))
        gt = np.asarray(v.labels)
        for o in ORGANS:
            if (gt == o).any():
                per.setdefault(o, []).append(dice(gt == o, pred == o))
    m = {o: float(np.mean(x)) for o, x in sorted(per.items())}
    return {"mean_dsc": float(np.mean(list(m.values()))), "per_organ": m}


def reference(args, unlabelled: bool, tag: str, n_lab=16):
    d = data(n_lab=max(n_lab, 16))
    lab = d / "lab" if n_lab == 16 else _subset(d / "lab", n_lab)
    cfg = TR.ReferenceTrainConfig(model="tiny", iterations=args.iterations, lr=args.lr, batch_labelled=args.batch,
                                  batch_unlabelled=args.batch if unlabelled else 0, labelled=str(lab),
                                  unlabelled=str(d / "unl") if unlabelled else "",
                                  val=str(d / "val") if args.val_every else "", val_every=args.val_every or 10**9,
                                  max_minutes=args.minutes, seed=args.seed, device="cpu",
                                  cps_weight=args.cps_weight if unlabelled else 0.0, rampup=args.rampup,
                                  cps_loss=args.cps_loss, cps_threshold=args.threshold, cps_start=args.start,
                                  cps_on=args.cps_on,
                                  sampling_rule=args.sampling_rule, small_organ_boost=args.boost)
    t0 = time.time()
    s = TR.train(cfg, OUT / tag, progress=False)
    res = score_pair(OUT / tag / "last.pt", load_folder(d / "val", labelled=True))
    res.update(iterations=s["iterations"], train_seconds=time.time() - t0, config=vars(args), tag=tag)
    return res


def _subset(src: Path, n: int) -> Path:
    dst = OUT / "data" / f"lab{n}"
    if not dst.exists():
        for sub in ("images", "labels"):
            (dst / sub).mkdir(parents=True)
            for p in sorted((src / sub).iterdir())[:n]:
                (dst / sub / p.name).symlink_to(p)
    return dst


def propagation(args):
    d = data()
    cfg = TP.PropagationTrainConfig(model="tiny", iterations=args.iterations, lr=args.lr, batch=args.batch,
                                    labelled=str(d / "lab"), val_every=10**9, max_minutes=args.minutes,
                                    seed=args.seed, device="cpu")
    t0 = time.time()
    s = TP.train(cfg, OUT / "propagation", progress=False)
    net, _ = TP.load_stcn(OUT / "propagation" / "last.pt")
    res = TP.evaluate(net, load_folder(d / "val", labelled=True), 128, "cpu")
    res.update(iterations=s["iterations"], train_seconds=time.time() - t0, config=vars(args))
    return res


def real(args):
    """tiny trained on TotalSegEx_0001 plus the 16 phantoms, scored on TotalSegEx_0003."""
    import os

    shared = Path(os.environ.get("FLARE22_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not (shared / "images").is_dir():
        raise SystemExit(f"real CTs not found at {shared}")
    d = data()
    mix = OUT / "data" / "real_train"
    if not mix.exists():
        for sub in ("images", "labels"):
            (mix / sub).mkdir(parents=True)
        (mix / "images" / "TotalSegEx_0001_0000.nii.gz").symlink_to(shared / "images" / "TotalSegEx_0001_0000.nii.gz")
        (mix / "labels" / "TotalSegEx_0001.nii.gz").symlink_to(shared / "labels" / "TotalSegEx_0001.nii.gz")
        for sub in ("images", "labels"):
            for q in sorted((d / "lab" / sub).iterdir()):
                (mix / sub / q.name).symlink_to(q)
    test = OUT / "data" / "real_test"
    if not test.exists():
        for sub, name in (("images", "TotalSegEx_0003_0000.nii.gz"), ("labels", "TotalSegEx_0003.nii.gz")):
            (test / sub).mkdir(parents=True)
            (test / sub / name).symlink_to(shared / sub / name)
    cfg = TR.ReferenceTrainConfig(model="tiny", iterations=args.iterations, lr=args.lr, batch_labelled=args.batch,
                                  batch_unlabelled=0, labelled=str(mix), val_every=10**9, max_minutes=args.minutes,
                                  seed=args.seed, device="cpu", cps_weight=0.0)
    s = TR.train(cfg, OUT / "real", progress=False)
    res = score_pair(OUT / "real" / "last.pt", load_folder(test, labelled=True))
    res.update(iterations=s["iterations"], train="TotalSegEx_0001 + 16 phantoms", test="TotalSegEx_0003")
    return res


def semi_report() -> str:
    """A Markdown table of every finished semi arm (one JSON each): mean DSC per seed, the
    mean over seeds, and the per-organ means over seeds."""
    runs: dict[str, dict[int, dict]] = {}
    for f in sorted(OUT.glob("semi_*_i*_s*_*.json")):
        res = json.loads(f.read_text())
        arm, _, rest = f.stem.rpartition("_i")
        its, seed = rest.split("_")[:2]
        runs.setdefault(f"{arm} ({its} it)", {})[int(seed[1:])] = res
    short = ("liver", "R kid", "spleen", "panc", "aorta", "IVC", "R adr", "L adr", "gallbl", "esoph", "stom", "duod", "L kid")
    rows = ["| arm | seeds | mean DSC per seed | mean | " + " | ".join(short) + " |",
            "|---|---|---|---|" + "---|" * len(ORGANS)]
    for arm, by_seed in runs.items():
        seeds = sorted(by_seed)
        means = [by_seed[k]["mean_dsc"] for k in seeds]
        organ = [np.mean([by_seed[k]["per_organ"].get(str(o), np.nan) for k in seeds]) for o in ORGANS]
        rows.append(f"| {arm} | {','.join(map(str, seeds))} | {' / '.join(f'{m:.3f}' for m in means)} | "
                    f"**{np.mean(means):.3f}** | " + " | ".join(f"{v:.2f}" for v in organ) + " |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("reference", "propagation", "semi", "semi-report", "real"))
    p.add_argument("--minutes", type=nonneg_float, default=10.0)
    p.add_argument("--iterations", type=positive_int, default=100000)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--batch", type=positive_int, default=4)
    p.add_argument("--cps-weight", type=nonneg_float, default=1.5)
    p.add_argument("--rampup", type=probability, default=0.2, help="fraction of the run over which the CPS weight ramps up")
    p.add_argument("--start", type=probability, default=0.5, help="fraction of the run before the CPS ramp begins")
    p.add_argument("--cps-on", default="all", choices=TR.CPS_ON, help="slices the CPS loss covers")
    p.add_argument("--cps-loss", default="dice", choices=TR.CPS_LOSSES)
    p.add_argument("--threshold", type=probability, default=0.0, help="CPS confidence threshold on the peer's labels")
    p.add_argument("--arm", default="both", choices=("both", "cps", "sup"),
                   help="semi: which arm(s) to run (run them as two processes to use two cores)")
    p.add_argument("--val-every", type=nonneg_int, default=0,
                   help="log held-out DSC into the run's log.jsonl every N iterations (the figure is still the last checkpoint's)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--sampling-rule", default="rarity", choices=("small", "rarity"))
    p.add_argument("--boost", type=nonneg_float, default=10.0)
    p.add_argument("--tag", default="reference")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.what == "semi-report":
        print(semi_report())
        return
    if args.what == "reference":
        res = reference(args, unlabelled=False, tag=args.tag)
    elif args.what == "propagation":
        res = propagation(args)
    elif args.what == "semi":
        # One JSON per arm, named by everything that changes it, so arms run as separate
        # processes and a labelled-only baseline is reused by every CPS variant.
        run = f"i{args.iterations}_s{args.seed}_{args.sampling_rule}{args.boost:g}"
        arms = {"cps": (True, f"semi_cps_{args.cps_loss}_w{args.cps_weight:g}_st{args.start:g}_r{args.rampup:g}_t{args.threshold:g}"
                       f"{'_unl' if args.cps_on == 'unlabelled' else ''}_{run}"),
                "sup": (False, f"semi_sup_{run}")}
        res = {}
        for arm in ("sup", "cps") if args.arm == "both" else (args.arm,):
            unl, tag = arms[arm]
            res[tag] = reference(args, unl, tag, n_lab=2)
            (OUT / f"{tag}.json").write_text(json.dumps(res[tag], indent=1, default=str))
        print(json.dumps(res, indent=1, default=str))
        return
    else:
        res = real(args)
    name = {"reference": args.tag}.get(args.what, args.what)
    (OUT / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()

"""The main job end to end, on phantoms (and the real CTs in ../shared/data when present):

    make demo        # = python -m training.demo --out demo

1. phantoms: 16 labelled + 16 unlabelled training cases, 2 validation, 4 test;
2. train the ``tiny`` reference pair (CPS with the unlabelled phantoms) and the ``tiny`` STCN;
3. export a bundle (parity table printed);
4. ``sh predict.sh`` on the test phantoms and on the real volumes;
5. ``flare22 evaluate`` on both; 6. the per-case efficiency harness on the test phantoms;
7. one final table and the paths of every artefact, all under ``demo/``.

Rerunning reuses finished steps (each step leaves its output; delete a folder to redo it).
Training budgets are wall-clock minutes so the whole job fits 20 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

from app.argtypes import nonneg_float, positive_int

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FLARE22_SHARED_DATA", ROOT.parent / "shared" / "data"))
SHAPE = (48, 128, 128)


def step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.time()


def done(t0: float) -> None:
    print(f"    ({time.time() - t0:.0f} s)", flush=True)


def sh(cmd: list[str], env: dict | None = None) -> None:
    print("    $ " + " ".join(str(c) for c in cmd), flush=True)
    r = subprocess.run([str(c) for c in cmd], env={**os.environ, **(env or {})}, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"demo: step failed ({r.returncode}): {' '.join(map(str, cmd))}")


def phantoms(out: Path) -> Path:
    from evaluation.phantom import write_dataset

    d = out / "data"
    for name, n, seed, unl in (("train", 16, 1000, False), ("unlabelled", 16, 2000, True),
                               ("val", 2, 3000, False), ("test", 4, 4000, False)):
        if not (d / name / "images").exists():
            write_dataset(d / name, n, seed=seed, shape_zyx=SHAPE, unlabeled=unl)
            print(f"    {name}: {n} phantoms of {SHAPE[2]} x {SHAPE[1]} x {SHAPE[0]}")
    return d


def read_eval(csv_path: Path) -> dict:
    rows = list(csv.DictReader(open(csv_path)))
    organs = [c[:-4] for c in rows[0] if c.endswith("_DSC")]
    out = {}
    for o in organs:
        d = [float(r[o + "_DSC"]) for r in rows if r[o + "_DSC"] not in ("", "nan")]
        n = [float(r[o + "_NSD"]) for r in rows if r[o + "_NSD"] not in ("", "nan")]
        out[o] = (sum(d) / len(d) if d else float("nan"), sum(n) / len(n) if n else float("nan"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="flare22 demo: train -> export -> predict -> evaluate -> efficiency")
    p.add_argument("--out", default="demo")
    p.add_argument("--ref-minutes", type=nonneg_float, default=6.0)
    p.add_argument("--prop-minutes", type=nonneg_float, default=4.0)
    # Half of them on the labels alone, then CPS (the trainer's schedule); 1,800 fit the
    # 6 minutes on 2 cores, so the CPS half is not cut short by the budget.
    p.add_argument("--ref-iterations", type=positive_int, default=1800)
    p.add_argument("--prop-iterations", type=positive_int, default=2000)
    args = p.parse_args(argv)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = {"FLARE22_CACHE": str(out / "cache")}
    start = time.time()

    t = step("1/7 phantoms")
    data = phantoms(out)
    done(t)

    t = step("2/7 train the tiny reference pair (CPS) and the tiny STCN")
    if not (out / "reference" / "best.pt").exists():
        sh([py, "-m", "flare22", "train-reference", "--labelled", data / "train", "--unlabelled", data / "unlabelled",
            "--val", data / "val", "--out", out / "reference", "--config", "tiny", "--iterations", args.ref_iterations,
            "--lr", "1e-3", "--batch-labelled", "4", "--batch-unlabelled", "4", "--val-every", "250",
            "--max-minutes", args.ref_minutes, "--device", "cpu"], env)
    if not (out / "propagation" / "best.pt").exists():
        sh([py, "-m", "flare22", "train-propagation", "--labelled", data / "train", "--val", data / "val",
            "--out", out / "propagation", "--config", "tiny", "--iterations", args.prop_iterations, "--lr", "1e-3",
            "--val-every", "250", "--max-minutes", args.prop_minutes, "--device", "cpu"], env)
    done(t)

    t = step("3/7 export the bundle")
    bundle = out / "bundle"
    if not (bundle / "manifest.json").exists():
        sh([py, "-m", "flare22", "export", "--reference", out / "reference" / "best.pt",
            "--propagation", out / "propagation" / "best.pt", "--out", bundle])
    done(t)

    t = step("4/7 predict.sh on the test phantoms and the real CTs")
    penv = {"FLARE22_BUNDLE": str(bundle), "FLARE22_PYTHON": py}
    preds = {"phantoms": (data / "test", out / "pred" / "phantoms")}
    if (SHARED / "images").is_dir():
        preds["real"] = (SHARED, out / "pred" / "real")
    else:
        print(f"    real CTs not found at {SHARED}: skipped")
    for name, (src, dst) in preds.items():
        if not dst.exists() or not any(dst.glob("*.nii.gz")):
            sh(["sh", "predict.sh"], {**penv, "FLARE22_INPUT": str(src / "images"), "FLARE22_OUTPUT": str(dst)})
    done(t)

    t = step("5/7 evaluate")
    scores = {}
    for name, (src, dst) in preds.items():
        csv_path = out / f"eval_{name}.csv"
        sh([py, "-m", "flare22", "evaluate", "--pred", dst, "--gt", src / "labels", "--out", csv_path])
        scores[name] = read_eval(csv_path)
    done(t)

    t = step("6/7 per-case efficiency harness (test phantoms, one process per case)")
    eff = out / "efficiency"
    if not (eff / "efficiency.csv").exists():
        sh([py, "-m", "flare22", "efficiency", "--input", data / "test" / "images", "--output", out / "pred" / "harness",
            "--report", eff, "--gt", data / "test" / "labels", "--command",
            f"FLARE22_PYTHON={py} FLARE22_BUNDLE={bundle} sh predict.sh --quiet"])
    done(t)

    t = step("7/7 results")
    table = final_table(out, scores, eff)
    (out / "results.md").write_text(table)
    print(table)
    print("artefacts:")
    for name in ("data", "reference/best.pt", "propagation/best.pt", "bundle", "pred", "eval_phantoms.csv",
                 "eval_real.csv", "efficiency/summary.md", "efficiency/efficiency.csv", "results.md"):
        if (out / name).exists():
            print(f"    {out / name}")
    print(f"\ndemo finished in {time.time() - start:.0f} s")
    return 0


def final_table(out: Path, scores: dict, eff: Path) -> str:
    lines = ["# flare22 demo results", ""]
    names = list(scores)
    lines.append("| organ | " + " | ".join(f"{n} DSC | {n} NSD" for n in names) + " |")
    lines.append("|---|" + "---|---|" * len(names))
    organs = list(next(iter(scores.values())).keys()) if scores else []
    for o in organs:
        cells = " | ".join(f"{scores[n][o][0]:.3f} | {scores[n][o][1]:.3f}" for n in names)
        lines.append(f"| {o} | {cells} |")
    if organs:
        means = " | ".join(
            f"{_mean([scores[n][o][0] for o in organs]):.3f} | {_mean([scores[n][o][1] for o in organs]):.3f}"
            for n in names)
        lines.append(f"| **mean** | {means} |")
    lines += ["", "Real CTs: labels present in each case only count; organs a case lacks score 1 when also",
              "absent from the prediction (FLARE rules). The real cases are TotalSegmentator's test files.", ""]
    rows = list(csv.DictReader(open(eff / "efficiency.csv"))) if (eff / "efficiency.csv").exists() else []
    if rows:
        cols = [c for c in ("Name", "Status", "Time", "RSS_Max", "CPU_Utilization", "AUC_CPU_Time", "GPU_Mem",
                            "AUC_GPU_Time_2GB", "DSC", "NSD") if c in rows[0]]
        lines.append("Per-case efficiency (one process per case, process start included):")
        lines.append("")
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in rows:
            lines.append("| " + " | ".join(r.get(c, "") or "-" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _mean(xs):
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


if __name__ == "__main__":
    sys.exit(main())

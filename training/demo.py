"""The main job end to end, on phantoms (and the real CTs in ../shared/data when present):

    make demo        # = python -m training.demo --out demo
    make demo-quick  # = python -m training.demo --quick (small budgets, for CI; under demo/quick)

1. phantoms: 16 labelled + 16 unlabelled training cases, 2 validation, 4 test
   (``--quick``: 4 + 4, 1, 2);
2. train the ``tiny`` reference pair (CPS with the unlabelled phantoms) and the ``tiny`` STCN
   (after ``--prop-pretrain-iterations`` of pretraining on the unlabelled phantoms and the
   real CTs' images, never their labels);
3. export a bundle (parity table printed);
4. ``sh predict.sh`` on the test phantoms and on the real volumes;
5. ``flare22 evaluate`` on both; 6. the per-case efficiency harness on the test phantoms;
7. one final table and the paths of every artefact, all under ``demo/``.

Rerunning reuses finished steps (each step leaves its output; delete a folder to redo it);
a run folder made with other budgets is refused rather than mixed.

Training budgets are iterations, never minutes: the same seed gives the same models and
figures on any machine (up to thread nondeterminism), a slow machine only takes longer.
Before training, a few iterations of each trainer are timed and the expected training time
is printed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from app.argtypes import nonneg_int, positive_int

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


# Budgets sized to the 20-minute target on 2 quiet cores: the timing probe measured 0.75 s per
# reference-pair and 0.40 s per STCN iteration there (CPS doubles the pair's forward passes
# in its second half), so 800 + 600 iterations train in about 16 minutes.
FULL = {"cases": {"train": 16, "unlabelled": 16, "val": 2, "test": 4},
        "ref_iterations": 800, "prop_iterations": 600, "prop_pretrain_iterations": 0, "val_every": 200}
QUICK = {"cases": {"train": 4, "unlabelled": 4, "val": 1, "test": 2},
         "ref_iterations": 120, "prop_iterations": 120, "prop_pretrain_iterations": 0, "val_every": 60}


def phantoms(out: Path, cases: dict) -> Path:
    from evaluation.phantom import write_dataset

    d = out / "data"
    for name, seed, unl in (("train", 1000, False), ("unlabelled", 2000, True), ("val", 3000, False),
                            ("test", 4000, False)):
        n = cases[name]
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


def budgets(args) -> dict:
    base = QUICK if args.quick else FULL
    b = json.loads(json.dumps(base))
    for key in ("ref_iterations", "prop_iterations", "prop_pretrain_iterations"):
        if getattr(args, key) is not None:
            b[key] = getattr(args, key)
    b["seed"] = args.seed
    return b


def check_budgets(out: Path, b: dict) -> None:
    """A run folder holds one set of budgets: reusing its steps under others would mix runs."""
    f = out / "budgets.json"
    if f.exists():
        old = json.loads(f.read_text())
        if old != b:
            diff = ", ".join(f"{k} {old.get(k)} -> {b.get(k)}" for k in sorted(set(old) | set(b)) if old.get(k) != b.get(k))
            raise SystemExit(f"demo: {out} was made with other budgets ({diff}); delete it or give another --out")
    else:
        f.write_text(json.dumps(b, indent=1))


def unlabelled_sources(data: Path) -> str:
    """Pretraining volumes: the unlabelled phantoms and, when present, the real CTs' images."""
    return ",".join([str(data / "unlabelled")] + ([str(SHARED)] if (SHARED / "images").is_dir() else []))


def train_commands(py: str, data: Path, out: Path, b: dict) -> dict:
    ref = [py, "-m", "flare22", "train-reference", "--labelled", data / "train", "--unlabelled", data / "unlabelled",
           "--val", data / "val", "--out", out / "reference", "--config", "tiny", "--iterations", b["ref_iterations"],
           "--lr", "1e-3", "--batch-labelled", "4", "--batch-unlabelled", "4", "--val-every", b["val_every"],
           "--seed", b["seed"], "--device", "cpu"]
    prop = [py, "-m", "flare22", "train-propagation", "--labelled", data / "train", "--val", data / "val",
            "--out", out / "propagation", "--config", "tiny", "--iterations", b["prop_iterations"], "--lr", "1e-3",
            "--val-every", b["val_every"], "--seed", b["seed"], "--device", "cpu"]
    if b["prop_pretrain_iterations"]:
        prop += ["--unlabelled", unlabelled_sources(data), "--pretrain-iterations", b["prop_pretrain_iterations"]]
    return {"reference": ref, "propagation": prop}


def expected_training_seconds(cmds: dict, out: Path, b: dict, env: dict, probe: int = 4) -> dict:
    """Seconds per iteration of each trainer, timed on this machine as loaded now: each
    training command itself runs 1 + ``probe`` iterations (no validation) into a scratch
    folder, and the per-iteration time is read from its log (first iteration excluded). The
    reference pair's probe switches CPS on half way, as the real run does."""
    import shutil

    def set_opt(cmd, **opts):
        cmd = list(cmd)
        i = cmd.index("--val")  # no validation: it would run at the probe's last iteration
        del cmd[i:i + 2]
        for k, v in opts.items():
            flag = "--" + k.replace("_", "-")
            if flag in cmd:
                cmd[cmd.index(flag) + 1] = v
            else:
                cmd += [flag, v]
        return cmd

    scratch = out / "probe"
    probes = {"reference pair": (cmds["reference"], {}), "STCN": (cmds["propagation"], {"pretrain_iterations": 0})}
    if b["prop_pretrain_iterations"]:
        probes["STCN pretraining"] = (cmds["propagation"], {"pretrain_iterations": 1 + probe, "iterations": 1})
    per = {}
    for name, (cmd, opts) in probes.items():
        run_dir = scratch / name.replace(" ", "_")
        shutil.rmtree(run_dir, ignore_errors=True)
        c = set_opt(cmd, **{"iterations": 1 + probe, "out": run_dir, **opts}) + ["--no-progress"]
        r = subprocess.run([str(x) for x in c], env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"demo: timing probe failed ({name}): {r.stderr.strip().splitlines()[-1:]}")
        events = [json.loads(line) for line in open(run_dir / "log.jsonl")]
        first = next(e["time"] for e in events if e["event"] == "train")
        end = next(e["time"] for e in events if e["event"] == "end")
        per[name] = (end - first) / probe
    shutil.rmtree(scratch, ignore_errors=True)
    total = (b["ref_iterations"] * per["reference pair"] + b["prop_iterations"] * per["STCN"]
             + b["prop_pretrain_iterations"] * per.get("STCN pretraining", 0.0))
    return {"seconds_per_iteration": per, "training_seconds": total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="flare22 demo: train -> export -> predict -> evaluate -> efficiency")
    p.add_argument("--out", help="run folder (default demo, or demo/quick with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"small budgets for CI: {QUICK['cases']} phantoms, {QUICK['ref_iterations']} reference and "
                        f"{QUICK['prop_iterations']} STCN iterations")
    # The reference pair trains half of its iterations on the labels alone, then with CPS.
    p.add_argument("--ref-iterations", type=positive_int, help=f"default {FULL['ref_iterations']}")
    p.add_argument("--prop-iterations", type=positive_int, help=f"default {FULL['prop_iterations']}")
    p.add_argument("--prop-pretrain-iterations", type=nonneg_int,
                   help=f"STCN pretraining on unlabelled slices first (default {FULL['prop_pretrain_iterations']})")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--no-estimate", action="store_true", help="skip the timed iterations that predict the duration")
    args = p.parse_args(argv)
    b = budgets(args)
    out = (ROOT / (args.out or ("demo/quick" if args.quick else "demo"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_budgets(out, b)
    py = sys.executable
    env = {"FLARE22_CACHE": str(out / "cache")}
    start = time.time()
    print(f"budgets: {b['ref_iterations']} reference-pair iterations, {b['prop_iterations']} STCN iterations"
          + (f" after {b['prop_pretrain_iterations']} pretraining iterations" if b["prop_pretrain_iterations"] else "")
          + f", seed {b['seed']}; phantoms {b['cases']}", flush=True)

    t = step("1/7 phantoms")
    data = phantoms(out, b["cases"])
    done(t)

    cmds = train_commands(py, data, out, b)
    todo = [k for k in ("reference", "propagation") if not (out / k / "best.pt").exists()]
    if todo and not args.no_estimate:
        t = step("expected duration (a few timed iterations of each trainer)")
        est = expected_training_seconds(cmds, out, b, env)
        for phase, sec in est["seconds_per_iteration"].items():
            print(f"    {phase}: {sec:.2f} s per iteration")
        sec = est["training_seconds"]
        print(f"    training will take about {sec / 60:.0f} min ({sec:.0f} s) on this machine as loaded now "
              "(validation, export, prediction, evaluation and the efficiency harness come on top)", flush=True)
        (out / "expected.json").write_text(json.dumps(est, indent=1))
        done(t)

    t = step("2/7 train the tiny reference pair (CPS) and the tiny STCN")
    for k in todo:
        sh(cmds[k], env)
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

"""The main job in miniature: phantoms -> train both modules a few iterations -> export ->
predict.sh -> evaluate -> efficiency harness; and the benchmark's quick mode."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.phantom import write_dataset

REPO = Path(__file__).resolve().parents[1]


def cli(*args, env=None, timeout=900):
    r = subprocess.run([sys.executable, "-m", "flare22", *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert r.returncode == 0, f"{args[0]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_train_export_predict_evaluate_measure(tmp_path):
    env = {"FLARE22_CACHE": str(tmp_path / "cache"), "OPENBLAS_NUM_THREADS": "1"}
    write_dataset(tmp_path / "train", 3, seed=21)
    write_dataset(tmp_path / "unl", 2, seed=22, unlabeled=True)
    write_dataset(tmp_path / "test", 2, seed=23)
    cli("train-reference", "--labelled", tmp_path / "train", "--unlabelled", tmp_path / "unl", "--val",
        tmp_path / "test", "--out", tmp_path / "ref", "--iterations", 8, "--val-every", 8, "--no-progress",
        "--device", "cpu", env=env)
    cli("train-propagation", "--labelled", tmp_path / "train", "--out", tmp_path / "prop", "--iterations", 8,
        "--val-every", 8, "--no-progress", "--device", "cpu", env=env)
    r = cli("export", "--reference", tmp_path / "ref" / "best.pt", "--propagation", tmp_path / "prop" / "best.pt",
            "--out", tmp_path / "bundle", "--no-programs", env=env)
    assert "stcn_decode" in r.stdout and " NO" not in r.stdout  # the parity table, every row ok
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["sources"]["reference"]["iteration"] == 8
    assert manifest["sources"]["propagation"]["iteration"] == 8

    out = tmp_path / "pred"
    r = subprocess.run(["sh", "predict.sh", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, **env, "FLARE22_INPUT": str(tmp_path / "test" / "images"),
                            "FLARE22_OUTPUT": str(out), "FLARE22_BUNDLE": str(tmp_path / "bundle"),
                            "FLARE22_PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["Phantom_0001.nii.gz", "Phantom_0002.nii.gz"]

    cli("evaluate", "--pred", out, "--gt", tmp_path / "test" / "labels", "--out", tmp_path / "scores.csv")
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert [r["case"] for r in rows] == ["Phantom_0001", "Phantom_0002"]
    assert all(0.0 <= float(r["1_liver_DSC"]) <= 1.0 for r in rows)

    cli("efficiency", "--input", tmp_path / "test" / "images", "--output", tmp_path / "harness",
        "--report", tmp_path / "report", "--gt", tmp_path / "test" / "labels", "--command",
        f"FLARE22_PYTHON={sys.executable} FLARE22_BUNDLE={tmp_path / 'bundle'} sh predict.sh --quiet", env=env)
    eff = list(csv.DictReader(open(tmp_path / "report" / "efficiency.csv")))
    assert len(eff) == 2 and all(e["Status"] == "ok" and float(e["Time"]) > 0 for e in eff)
    assert all(0.0 <= float(e["DSC"]) <= 1.0 for e in eff)
    assert (tmp_path / "report" / "summary.md").exists()


def test_benchmark_quick_mode(tmp_path):
    cli("benchmark", "--quick", "--out", tmp_path / "bench", env={"OPENBLAS_NUM_THREADS": "1"})
    res = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    variants = {r["variant"] for r in res["runs"]}
    assert {"full", "dense"} <= variants
    for r in res["runs"]:
        assert r["seconds"] > 0 and r["gmac"]["reference"] > 0
        if r["variant"] == "full":
            assert {"key_encode", "decode", "read", "write"} <= set(r["stages"])
    assert set(res["fits"]) >= {"full", "dense"}
    md = (tmp_path / "bench" / "benchmark.md").read_text()
    assert "| N | variant |" in md and "Growth with N" in md

"""The appliance's pipeline: reference sampling and selection, end-to-end runs on phantoms and
on the real CTs (through predict.sh), bad inputs, bad bundles and output folders, processes
killed mid-case, and a run that never imports torch.

Every run uses the session's `tiny` random-weight bundle, one ONNX Runtime thread."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from app.bundle import load_bundle
from app.ctio import AIR_HU, read_ct
from app.predict import (DEFAULT_SAMPLING, PredictOptions, Predictor, predict_folder, sample_candidates,
                         select_largest_area)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# Subprocesses keep numpy's BLAS to one thread: on a small shared machine OpenBLAS's spinning
# threads make the per-slice resizes tens of times slower (a cost of the test machine only).
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


def geometry(path: Path) -> tuple:
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return r.GetSize(), r.GetSpacing(), r.GetOrigin(), r.GetDirection()


def assert_labels_on_grid(out: Path, image: Path) -> np.ndarray:
    """The prediction lies exactly on the input's grid, as uint8 FLARE22 labels."""
    assert geometry(out) == geometry(image), out.name
    img = sitk.ReadImage(str(out))
    assert img.GetPixelID() == sitk.sitkUInt8
    labels = sitk.GetArrayFromImage(img)
    assert labels.min() >= 0 and labels.max() <= 13
    return labels


def assert_outputs(out_dir: Path, written: list[str], failed: list[str] = ()) -> None:
    """Exactly <case>.nii.gz + <case>.json for written cases, <case>.json for failed ones, and
    no temporary or half-written file of any kind."""
    names = sorted(p.name for p in out_dir.iterdir())
    want = sorted([f"{c}.nii.gz" for c in written] + [f"{c}.json" for c in [*written, *failed]]
                  + (["review.csv"] if [*written, *failed] else []))
    assert names == want
    assert not [n for n in names if "part" in n or n.startswith(".")]
    for c in failed:
        record = json.loads((out_dir / f"{c}.json").read_text())
        assert record["ok"] is False and record["error"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "flare22", *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def run_predict_sh(input_dir: Path, output_dir: Path, bundle: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(ENV, FLARE22_INPUT=str(input_dir), FLARE22_OUTPUT=str(output_dir),
               FLARE22_BUNDLE=str(bundle), FLARE22_PYTHON=PY)
    return subprocess.run(["sh", str(REPO / "predict.sh"), "--threads", "1", *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def options(**kw) -> PredictOptions:
    return PredictOptions(device="cpu", threads=1, **kw)


# ---------------------------------------------------------------------------------------
# units


@pytest.mark.parametrize("n,want", [(1, [0]), (4, [0]), (5, [0]), (10, [0, 9]), (12, [0, 11])])
def test_sample_candidates_short_volumes(n, want):
    assert sample_candidates(n).tolist() == want


def test_sample_candidates_caps_at_max():
    got = sample_candidates(500)
    assert len(got) == 64 and got[0] == 0 and got[-1] == 499
    assert len(np.unique(got)) == 64 and np.all(np.diff(got) > 0)
    assert len(sample_candidates(100)) == 20  # N // 5 below the cap
    assert sample_candidates(100, every=10, maximum=4).tolist() == [0, 33, 66, 99]


def test_select_largest_area_exact():
    areas = np.array([  # candidates x organs 1..5
        [10, 0, 0, 0, 0],
        [20, 5, 0, 0, 0],
        [5, 5, 0, 7, 0],
        [0, 1, 0, 7, 3],
    ])
    got = select_largest_area(areas)
    # organ 1 -> cand 1; organ 2 ties at 1/2 -> first; organ 3 absent; organ 4 ties -> 2; organ 5 -> 3
    assert got == {1: [1, 2], 2: [4], 3: [5]}
    assert list(got) == sorted(got) and all(type(k) is int for k in got)
    assert select_largest_area(np.zeros((3, 13), np.int64)) == {}


# ---------------------------------------------------------------------------------------
# end to end on phantoms


@pytest.fixture(scope="module")
def phantom_run(phantom_cases, tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom_out")
    results = predict_folder(phantom_cases, out, tiny_bundle, options(mode="largest"), quiet=True)
    return out, results


def test_phantoms_every_case_written_on_input_grid(phantom_cases, phantom_run):
    out, results = phantom_run
    cases = ["Phantom_0001", "Phantom_0002", "Rot_0001"]
    assert [(r.case, r.ok, r.error) for r in results] == [(c, True, None) for c in cases]
    assert_outputs(out, cases)
    # the randomly oriented case really is not in the canonical orientation
    assert geometry(phantom_cases / "Rot_0001_0000.nii.gz")[3] != (1, 0, 0, 0, 1, 0, 0, 0, 1)
    for c in cases:
        assert_labels_on_grid(out / f"{c}.nii.gz", phantom_cases / f"{c}_0000.nii.gz")


def test_phantoms_case_reports(phantom_cases, phantom_run):
    out, _ = phantom_run
    with_refs = 0
    for c in ("Phantom_0001", "Phantom_0002", "Rot_0001"):
        r = json.loads((out / f"{c}.json").read_text())
        assert r["case"] == c and r["ok"] is True and r["error"] is None
        assert r["mode"] == "largest" and r["num_slices"] == 24
        assert r["sampled"] == sample_candidates(24, DEFAULT_SAMPLING["every"], DEFAULT_SAMPLING["max"]).tolist()
        assert set(map(int, r["references"])) <= set(r["sampled"])
        assert all(1 <= o <= 13 for organs in r["references"].values() for o in organs)
        with_refs += bool(r["references"])
        assert {"read", "reference", "selection", "write"} <= set(r["timings"])
        assert all(v >= 0 for v in r["timings"].values())
        assert r["backend"]["backend"] == "onnxruntime"
        assert r["backend"]["providers"] == ["CPUExecutionProvider"]
        assert r["geometry"]["size"] == list(geometry(phantom_cases / f"{c}_0000.nii.gz")[0])
        if r["references"]:
            assert "propagation" in r["timings"] and r["propagation"]["config"]["top_k"] == 20
    assert with_refs > 0, "no case reached propagation: the test exercises nothing beyond selection"


def test_dense_mode(phantom_cases, tiny_bundle, tmp_path):
    out = tmp_path / "dense"
    results = predict_folder(phantom_cases, out, tiny_bundle, options(mode="dense"), quiet=True)
    assert [r.ok for r in results] == [True] * 3
    assert_outputs(out, ["Phantom_0001", "Phantom_0002", "Rot_0001"])
    image = phantom_cases / "Rot_0001_0000.nii.gz"
    labels = assert_labels_on_grid(out / "Rot_0001.nii.gz", image)
    report = json.loads((out / "Rot_0001.json").read_text())
    assert report["mode"] == "dense" and "references" not in report
    # written in the file's orientation = the canonical prediction mapped back exactly
    volume, props = read_ct(image)
    want, _ = Predictor(load_bundle(tiny_bundle), options(mode="dense")).predict_volume(volume)
    got, _ = read_ct(out / "Rot_0001.nii.gz", label=True)
    assert np.array_equal(got, want)
    assert labels.shape != got.shape  # the orientation change was real (axes permuted)


# ---------------------------------------------------------------------------------------
# the real CTs through predict.sh


def test_predict_sh_on_real_cts(shared_data, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    proc = run_predict_sh(shared_data / "images", out, tiny_bundle, "--quiet")
    assert proc.returncode == 0, proc.stderr
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (shared_data / "images").glob("*_0000.nii.gz"))
    assert len(cases) == 3
    assert_outputs(out, cases)
    directions = set()
    for c in cases:
        image = shared_data / "images" / f"{c}_0000.nii.gz"
        assert_labels_on_grid(out / f"{c}.nii.gz", image)
        directions.add(geometry(image)[3])
    assert len(directions) == 2  # RAS and LPS files both came back on their own grids
    assert "3 of 3 cases written" in proc.stdout


# ---------------------------------------------------------------------------------------
# bad inputs: the other case is still written, nothing partial is left


def _write(img: sitk.Image, path: Path) -> None:
    sitk.WriteImage(img, str(path), useCompression=True)


def _slab(phantom: Path, z: slice, spacing=(0.7, 0.8, 2.5)) -> sitk.Image:
    """A few axial slices of a phantom with a geometry of their own (flipped x and y)."""
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom)))[z]
    img = sitk.GetImageFromArray(a)
    img.SetSpacing(spacing)
    img.SetOrigin((12.5, -40.0, 300.0))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    return img


def _truncated(p, src):
    _write(_slab(src, slice(0, 10)), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _not_image(p, src):
    p.write_bytes(b"this is not a NIfTI file\n" * 40)


def _image_2d(p, src):
    _write(sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.ReadImage(str(src)))[5]), p)


def _image_4d(p, src):
    vol = _slab(src, slice(0, 6))
    _write(sitk.JoinSeries([vol, vol]), p)


def _three_slices(p, src):
    _write(_slab(src, slice(10, 13)), p)


def _one_slice(p, src):
    _write(_slab(src, slice(12, 13)), p)


NAN_COUNT = 6 * 6 + 1


def _nan_mha(p, src):
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(src)))[4:16].astype(np.float32)
    a[3, 10:16, 10:16] = np.nan
    a[5, 0, 0] = np.inf
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((5.0, 5.0, 7.5))
    sitk.WriteImage(img, str(p))


# name -> (writer, file suffix, error fragment or None when the case must succeed)
BAD_INPUTS = {
    "truncated nii.gz": (_truncated, ".nii.gz", "truncated"),
    "not an image": (_not_image, ".nii.gz", "unreadable"),
    "2D image": (_image_2d, ".nii.gz", "2D image"),
    "4D image": (_image_4d, ".nii.gz", "4D image"),
    "3 slices": (_three_slices, ".nii.gz", None),
    "1 slice": (_one_slice, ".nii.gz", None),
    "NaN in float mha": (_nan_mha, ".mha", None),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_or_odd_input(kind, phantom_cases, tiny_bundle, tmp_path):
    make, suffix, error = BAD_INPUTS[kind]
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    good = phantom_cases / "Phantom_0001_0000.nii.gz"
    shutil.copy(good, inp / good.name)
    odd = inp / f"Odd_0000{suffix}"
    make(odd, good)
    results = {r.case: r for r in predict_folder(inp, out, tiny_bundle, options(), quiet=True)}
    assert set(results) == {"Odd", "Phantom_0001"}
    assert results["Phantom_0001"].ok
    assert_labels_on_grid(out / "Phantom_0001.nii.gz", good)
    if error is None:
        assert results["Odd"].ok, results["Odd"].error
        assert_outputs(out, ["Odd", "Phantom_0001"])
        assert_labels_on_grid(out / "Odd.nii.gz", odd)
    else:
        assert not results["Odd"].ok and error in results["Odd"].error
        assert_outputs(out, ["Phantom_0001"], failed=["Odd"])
        assert error in json.loads((out / "Odd.json").read_text())["error"]
    if kind == "NaN in float mha":  # documented: non-finite voxels become air, and are counted
        report = json.loads((out / "Odd.json").read_text())
        assert report["geometry"]["nonfinite"] == NAN_COUNT
        volume, _ = read_ct(odd)
        assert np.isfinite(volume).all() and np.count_nonzero(volume == AIR_HU) >= NAN_COUNT


def test_predict_sh_exit_1_when_a_case_fails(phantom_cases, tiny_bundle, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    shutil.copy(phantom_cases / "Phantom_0002_0000.nii.gz", inp)
    (inp / "Broken_0000.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    proc = run_predict_sh(inp, out, tiny_bundle)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = [ln for ln in proc.stdout.splitlines() if ln.startswith("flare22 predict:")]
    assert len(summary) == 1
    assert "1 of 2 cases written" in summary[0] and "FAILED: Broken" in summary[0]
    assert "Broken" in proc.stderr  # the per-case failure is reported too
    assert_outputs(out, ["Phantom_0002"], failed=["Broken"])


# ---------------------------------------------------------------------------------------
# problems that stop every case: exit 2, one message


def test_empty_input_folder(tiny_bundle, tmp_path):
    (tmp_path / "in").mkdir()
    proc = run_cli("predict", "-i", tmp_path / "in", "-o", tmp_path / "out", "--bundle", tiny_bundle, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stderr and "0 of 0 cases" in proc.stdout
    assert list((tmp_path / "out").iterdir()) == []


def test_output_folder_cannot_be_created(phantom_cases, tiny_bundle, tmp_path):
    (tmp_path / "afile").write_text("a regular file where a folder should be")
    out = tmp_path / "afile" / "out"
    proc = run_cli("predict", "-i", phantom_cases, "-o", out, "--bundle", tiny_bundle, "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    want = f"flare22 predict: output folder {out} cannot be written (Not a directory)"
    assert proc.stderr.strip().splitlines() == [want]


def _break_manifest(b: Path) -> None:
    m = json.loads((b / "manifest.json").read_text())
    m["format_version"] = 7
    (b / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("problem", ["missing", "invalid"])
def test_bad_bundle_exit_2_no_case_processed(problem, phantom_cases, tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    if problem == "invalid":
        shutil.copytree(tiny_bundle, bundle, copy_function=os.symlink)
        (bundle / "manifest.json").unlink()
        shutil.copy(tiny_bundle / "manifest.json", bundle / "manifest.json")
        _break_manifest(bundle)
    out = tmp_path / "out"
    proc = run_cli("predict", "-i", phantom_cases, "-o", out, "--bundle", bundle)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flare22 predict: model bundle {bundle}: ")
    assert ("does not exist" if problem == "missing" else "unknown bundle format version 7") in lines[0]
    assert not out.exists() or list(out.iterdir()) == []
    assert "[1/" not in proc.stdout


# ---------------------------------------------------------------------------------------
# killed mid-case


@pytest.fixture(scope="module")
def long_cases(tmp_path_factory) -> Path:
    """Three 60-slice phantoms: 1-2 s a case on one thread."""
    from evaluation.phantom import write_dataset

    root = tmp_path_factory.mktemp("long")
    write_dataset(root, 3, seed=5, shape_zyx=(60, 64, 64), unlabeled=True)
    return root / "images"


LONG = ["Phantom_0001", "Phantom_0002", "Phantom_0003"]


def _start(inp: Path, out: Path, bundle: Path) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "flare22", "predict", "-i", str(inp), "-o", str(out), "--bundle", str(bundle),
                             "--threads", "1", "--device", "cpu", "--quiet"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_first_case(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not (out.is_dir() and any(out.glob("*.json"))):
        assert proc.poll() is None, f"predict ended early: {proc.communicate()}"
        assert time.monotonic() - t0 < timeout, "no case finished in time"
        time.sleep(0.05)


def _check_complete_outputs(out: Path, inp: Path) -> list[str]:
    """Every visible file is a whole case; returns the cases written."""
    written = []
    for p in out.iterdir():
        if p.name.startswith("."):
            continue
        if p.name == "review.csv":
            continue
        assert p.name.endswith((".nii.gz", ".json")) and "part" not in p.name, p.name
        if p.name.endswith(".nii.gz"):
            case = p.name[: -len(".nii.gz")]
            read_ct(p, label=True)  # raises on a truncated file
            assert_labels_on_grid(p, inp / f"{case}_0000.nii.gz")
            written.append(case)
        else:
            assert json.loads(p.read_text())["ok"] is True
    return sorted(written)


def test_sigkill_leaves_no_partial_output_and_rerun_cleans_up(long_cases, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    proc = _start(long_cases, out, tiny_bundle)
    try:
        _wait_for_first_case(proc, out)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    written = _check_complete_outputs(out, long_cases)
    assert 1 <= len(written) < 3, written  # killed mid-run, after the first case
    # a kill can leave only its private folder of temporaries; plant stale ones in it as a
    # kill mid-write would, and a hidden file of someone else's that must survive the rerun
    hidden = [p for p in out.iterdir() if p.name.startswith(".")]
    assert [p.name[: len(".flare22-run.")] for p in hidden] == [".flare22-run."], hidden
    (hidden[0] / "part.k1ll3d.nii.gz").write_bytes(b"\x1f\x8bhalf")
    (hidden[0] / "part.json").write_text('{"case": ')
    (out / ".someone-elses.part.tmp").write_text("keep")
    rerun = run_cli("predict", "-i", long_cases, "-o", out, "--bundle", tiny_bundle, "--threads", "1",
                    "--device", "cpu", "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert "3 of 3 cases written" in rerun.stdout
    assert (out / ".someone-elses.part.tmp").read_text() == "keep"
    (out / ".someone-elses.part.tmp").unlink()
    assert_outputs(out, LONG)
    assert _check_complete_outputs(out, long_cases) == LONG


def test_sigterm_removes_temporaries(long_cases, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    proc = _start(long_cases, out, tiny_bundle)
    try:
        _wait_for_first_case(proc, out)
        # stands for a write in progress when the signal comes
        private = next(out.glob(".flare22-run.*"))
        (private / "part.inflight.nii.gz").write_bytes(b"\x1f\x8b")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert len(_check_complete_outputs(out, long_cases)) < 3


# ---------------------------------------------------------------------------------------
# no torch in the appliance


def test_predict_never_imports_torch(phantom_cases, tiny_bundle, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(phantom_cases / "Rot_0001_0000.nii.gz", inp)
    code = f"""
import contextlib, io, json, sys
import app.cli
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        app.cli.main(["predict", "--help"])
        help_code = None
    except SystemExit as exc:
        help_code = exc.code
from app.predict import PredictOptions, predict_folder
res = predict_folder({str(inp)!r}, {str(tmp_path / "out")!r}, {str(tiny_bundle)!r},
                     PredictOptions(device="cpu", threads=1), quiet=True)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "training", "export", "onnx", "safetensors"))
print(json.dumps({{"help_code": help_code, "help": buf.getvalue(), "ok": [r.ok for r in res], "heavy": heavy}}))
"""
    proc = subprocess.run([PY, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["help_code"] == 0 and "--bundle" in got["help"]
    assert got["ok"] == [True]
    assert got["heavy"] == []
    assert (tmp_path / "out" / "Rot_0001.nii.gz").exists()


def test_review_list_and_uncertainty_map(tiny_bundle, phantom_cases, tmp_path):
    """Cases ranked by CPS member agreement in review.csv; an uncertainty map on the input grid."""
    from app.predict import PredictOptions, predict_folder

    out, rep = tmp_path / "out", tmp_path / "rep"
    results = predict_folder(phantom_cases, out, tiny_bundle, PredictOptions(uncertainty=True, threads=1),
                             report_dir=rep, quiet=True, review_threshold=1.01)
    assert all(r.ok for r in results)
    rows = (rep / "review.csv").read_text().splitlines()
    assert rows[0] == "case,quality,flag,weakest_organ"
    qualities = [float(r.split(",")[1]) for r in rows[1:]]
    assert len(qualities) == len(results) and qualities == sorted(qualities)
    assert all(r.split(",")[2] == "review" for r in rows[1:])  # threshold above any agreement
    for r in results:
        agreement = r.report["member_agreement"]
        assert 0.0 <= agreement["overall"] <= 1.0
        umap = sitk.ReadImage(str(rep / f"{r.case}_uncertainty.nii.gz"))
        src = sitk.ReadImage(str(phantom_cases / f"{r.case}_0000.nii.gz"))
        assert umap.GetSize() == src.GetSize() and umap.GetDirection() == src.GetDirection()
        u = sitk.GetArrayFromImage(umap)
        assert u.dtype == np.uint8 and u.max() > 0  # 0 = certain .. 255 = uncertainty 1
    assert not list(out.glob("*_uncertainty.nii.gz"))  # maps go to the report folder


def test_published_propagation_flag_switches_the_cost_levers_off(tiny_bundle, phantom_cases, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "flare22", "predict", "-i", str(phantom_cases), "-o", str(out),
                        "--bundle", str(tiny_bundle), "--threads", "1", "--quiet", "--published-propagation"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "Phantom_0001.json").read_text())
    cfg = report["propagation"]["config"]
    assert (cfg["skip_absent"], cfg["early_stop"], cfg["crop"]) == (False, False, False)
    # the published schedule decodes every organ on every non-reference slice of each pass
    assert report["propagation"]["decoded_cells"] == report["propagation"]["full_cells"]

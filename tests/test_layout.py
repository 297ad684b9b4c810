"""The appliance stays the appliance: nothing in app/ reaches training, export, evaluation,
docker, flare22 or torch, and the image's file set alone runs every command it offers."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"training", "export", "evaluation", "docker", "flare22", "torch", "torchvision"}
APP_FILES = sorted((REPO / "app").rglob("*.py"))


def forbidden_uses(path: Path, root: Path = REPO, forbidden: set[str] = FORBIDDEN) -> list[str]:
    """Imports of, and dynamic imports or module-path strings naming, a forbidden package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in forbidden]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in forbidden:
                found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__", "find_spec"):
                found.append(f"{name}(...)")
        elif isinstance(node, ast.Name) and node.id == "importlib":
            found.append("importlib")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            head = node.value.split(".")[0]
            if "." in node.value and " " not in node.value and head in forbidden:
                found.append(f"string {node.value!r}")
    return [f"{path.relative_to(root)}:{u}" for u in found]


def test_the_check_catches_each_kind(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom training.trainer import fit\nimport importlib\n"
                   "importlib.import_module('export.bundle')\n__import__('x')\n")
    found = " ".join(forbidden_uses(bad, root=tmp_path))
    for what in ("import torch", "from training.trainer", "importlib", "import_module", "__import__",
                 "'export.bundle'"):
        assert what in found


@pytest.mark.parametrize("path", APP_FILES, ids=lambda p: p.name)
def test_app_names_no_other_package(path):
    assert forbidden_uses(path) == []


@pytest.mark.parametrize("path", sorted((REPO / "evaluation").rglob("*.py")), ids=lambda p: p.name)
def test_evaluation_names_no_package_above_it(path):
    """evaluation/ may use app/, never training/ or export/ (the benchmark's random bundle is
    injected by the flare22 command)."""
    assert forbidden_uses(path, forbidden={"training", "export", "flare22"}) == []


def image_file_set(tmp_path: Path) -> Path:
    """What the Dockerfile copies of the project: app/ and predict.sh."""
    root = tmp_path / "image"
    root.mkdir()
    shutil.copytree(REPO / "app", root / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "predict.sh", root / "predict.sh")
    return root


def test_image_file_set_runs_every_command(tmp_path):
    root = image_file_set(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = ("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' in p or 'lib/python' in p "
            "or p == sys.argv[1]]; sys.argv = ['app'] + sys.argv[2:]; import runpy; "
            "runpy.run_module('app', run_name='__main__')")
    from app.cli import COMMANDS

    for name in [None, *COMMANDS]:
        args = [sys.executable, "-I", "-c", code, str(root)] + ([name, "--help"] if name else ["--help"])
        r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (name, r.stderr[-2000:])
        assert "usage" in r.stdout.lower()
        assert "Traceback" not in r.stderr


def test_image_file_set_predicts(tmp_path, tiny_bundle, phantom_cases):
    """predict.sh from the image's files alone, run from another folder, writes the label."""
    root = image_file_set(tmp_path)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    shutil.copy(phantom_cases / "Phantom_0001_0000.nii.gz", src / "case_0000.nii.gz")
    env = {**os.environ, "FLARE22_INPUT": str(src), "FLARE22_OUTPUT": str(out), "FLARE22_BUNDLE": str(tiny_bundle),
           "FLARE22_PYTHON": sys.executable, "PYTHONPATH": ""}
    r = subprocess.run(["sh", str(root / "predict.sh"), "--device", "cpu"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "case.nii.gz").is_file()

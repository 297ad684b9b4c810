"""Hostile inputs, bundles and folders (issue 17): every reproduction of the issue, one row
each in the table ``ROWS``, run through the real command line.

A row prepares its scene in a scratch folder and returns what the command must do: its
arguments, its exit status, a fragment of the one line it prints on stderr, and a check of
the files afterwards (nothing outside the output folder touched, nothing lost). Every run
asserts that no traceback is printed."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


@dataclass
class Scene:
    """A scratch folder and the session's shared inputs."""

    root: Path
    bundle: Path  # the session's tiny bundle (never modified)
    cases: Path  # the session's phantom images (never modified)

    def copy_bundle(self, name: str = "bundle") -> Path:
        """A private, editable copy of the tiny bundle (hard links where possible)."""
        dst = self.root / name
        dst.mkdir()
        for p in self.bundle.iterdir():
            if p.name == "manifest.json":
                shutil.copy(p, dst / p.name)
            else:
                try:
                    os.link(p, dst / p.name)
                except OSError:
                    shutil.copy(p, dst / p.name)
        return dst

    def input_folder(self, *names: str, src: str = "Phantom_0001_0000.nii.gz") -> Path:
        inp = self.root / "in"
        inp.mkdir(exist_ok=True)
        for n in names:
            shutil.copy(self.cases / src, inp / n)
        return inp


@dataclass
class Expect:
    argv: list
    code: int
    message: str | None = None  # a fragment of the (single) error line on stderr
    check: Callable[[str, str], None] | None = None  # (stdout, stderr) -> asserts on the files
    subprocess: bool = False  # run as its own process (signals, predict.sh, fresh imports)
    env: dict = field(default_factory=dict)
    cwd: Path | None = None


def run_in_process(argv: list[str]) -> tuple[int, str, str]:
    from flare22.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def run_expect(e: Expect) -> tuple[str, str]:
    argv = [str(a) for a in e.argv]
    if e.subprocess:
        cmd = argv if argv[0] in ("sh", PY) else [PY, "-m", "flare22", *argv]
        proc = subprocess.run(cmd, cwd=e.cwd or REPO, env={**ENV, **e.env}, capture_output=True, text=True,
                              timeout=300)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code, out, err = run_in_process(argv)
    assert "Traceback" not in out + err, out + err
    assert code == e.code, f"exit {code}, expected {e.code}\n{out}\n{err}"
    if e.message is not None:
        lines = [ln for ln in err.strip().splitlines() if e.message in ln]
        assert lines, f"no line with {e.message!r} on stderr:\n{err}"
        if e.code == 2:  # nothing could run: exactly one line
            assert len(err.strip().splitlines()) == 1, err
    if e.check is not None:
        e.check(out, err)
    return out, err


# ---------------------------------------------------------------------------------------
# 1, 6: export never destroys, never unpickles


def export_into_folder_with_notes(s: Scene) -> Expect:
    d = s.root / "d"
    d.mkdir()
    (d / "notes.txt").write_text("notes")

    def check(out, err):
        assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
        assert (d / "notes.txt").read_text() == "notes"

    return Expect(["export", "--random", "tiny", "--no-programs", "--out", d], 2,
                  "is not empty and holds no model bundle", check)


def export_over_bundle_without_force(s: Scene) -> Expect:
    b = s.copy_bundle()
    before = {p.name: p.stat().st_mtime_ns for p in b.iterdir()}

    def check(out, err):
        assert {p.name: p.stat().st_mtime_ns for p in b.iterdir()} == before

    return Expect(["export", "--random", "tiny", "--no-programs", "--out", b], 2,
                  "already holds a model bundle; pass --force", check)


def export_force_over_bundle_with_foreign_file(s: Scene) -> Expect:
    b = s.copy_bundle()
    (b / "notes.txt").write_text("mine")

    def check(out, err):
        assert (b / "notes.txt").read_text() == "mine" and (b / "manifest.json").exists()

    return Expect(["export", "--random", "tiny", "--no-programs", "--force", "--out", b], 2,
                  "holds files that are not part of its bundle (notes.txt)", check)


def export_out_is_a_file(s: Scene) -> Expect:
    f = s.root / "f"
    f.write_text("keep")
    return Expect(["export", "--random", "tiny", "--no-programs", "--out", f], 2, "exists and is not a folder",
                  lambda o, e: f.read_text() == "keep" or pytest.fail("file changed"))


def export_crafted_checkpoint(s: Scene) -> Expect:
    import torch

    marker = s.root / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = s.root / "evil.pt"
    torch.save({"kind": "reference", "models": Evil()}, ckpt)

    def check(out, err):
        assert not marker.exists(), "the checkpoint ran code"
        assert not (s.root / "out").exists() or not any((s.root / "out").iterdir())

    return Expect(["export", "--reference", ckpt, "--random", "tiny", "--no-programs", "--out", s.root / "out"], 2,
                  f"checkpoint {ckpt}: cannot be loaded safely", check)


# ---------------------------------------------------------------------------------------
# the table: (issue item, name, scene -> expectation)

ROWS: list[tuple[int, str, Callable[[Scene], Expect]]] = [
    (1, "export into a folder holding other files", export_into_folder_with_notes),
    (1, "export over a bundle without --force", export_over_bundle_without_force),
    (1, "export --force over a bundle holding a foreign file", export_force_over_bundle_with_foreign_file),
    (1, "export --out naming a regular file", export_out_is_a_file),
    (6, "export a crafted pickle checkpoint", export_crafted_checkpoint),
]


@pytest.fixture
def scene(tmp_path, tiny_bundle, phantom_cases) -> Scene:
    return Scene(tmp_path, tiny_bundle, phantom_cases)


@pytest.mark.parametrize("row", ROWS, ids=[f"{item}-{name}" for item, name, _ in ROWS])
def test_hostile(row, scene):
    _item, _name, prepare = row
    run_expect(prepare(scene))


def test_export_force_replaces_only_a_bundle(tiny_bundle, tmp_path, monkeypatch):
    """--force replaces an existing bundle in place (the export itself is stubbed by a copy of
    the session's bundle to save its time); a new or empty folder needs no --force."""
    import export.bundle as xb

    def fake_export(out, final, **kw):
        for p in tiny_bundle.iterdir():
            shutil.copy(p, out / p.name)

    monkeypatch.setattr(xb, "_export_into", fake_export)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert xb.export_bundle(empty) == empty and (empty / "manifest.json").exists()
    target = tmp_path / "b"
    xb.export_bundle(target)
    (target / "stcn_key.onnx").write_bytes(b"old")  # stands for an older bundle's file
    xb.export_bundle(target, force=True)
    assert (target / "stcn_key.onnx").read_bytes() == (tiny_bundle / "stcn_key.onnx").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

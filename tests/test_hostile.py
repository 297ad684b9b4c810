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

from .conftest import editable_bundle_copy

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
        return editable_bundle_copy(self.bundle, self.root / name)

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
# 2: truncated inputs of every format fail their case by name; the others are written


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 200])


def _write_as(src: Path, dst: Path, compress: bool = False) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.ReadImage(str(src)), str(dst), useCompression=compress)


def truncated_input(suffix: str, compress: bool = False):
    def prepare(s: Scene) -> Expect:
        inp = s.input_folder("Good_0000.nii.gz")
        bad = inp / f"Half_0000{suffix}"
        _write_as(s.cases / "Phantom_0002_0000.nii.gz", bad, compress)
        _truncate(bad)
        out = s.root / "out"

        def check(o, e):
            assert "1 of 2 cases written" in o and "FAILED: Half" in o
            assert sorted(p.name for p in out.iterdir()) == ["Good.json", "Good.nii.gz", "Half.json", "review.csv"]
            assert "truncated" in json.loads((out / "Half.json").read_text())["error"]

        return Expect(["predict", "-i", inp, "-o", out, "--bundle", s.bundle, "--threads", "1"], 1,
                      "Half: FAILED", check)

    return prepare


def header_claims_huge_volume(s: Scene) -> Expect:
    """1024^3 int16 claimed by an 80-byte .mha: refused from its size, nothing allocated."""
    inp = s.root / "in"
    inp.mkdir()
    (inp / "Big_0000.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 1024 1024 1024\n"
                                      "ElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    (inp / "Huge_0000.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 4096 4096 4096\n"
                                       "ElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    spacing = inp / "Zero_0000.mha"
    _write_as(s.cases / "Phantom_0001_0000.nii.gz", spacing)
    spacing.write_bytes(spacing.read_bytes().replace(b"ElementSpacing = ", b"ElementSpacing = 0 ", 1)
                        .replace(b"ElementSpacing = 0 ", b"ElementSpacing = 0 0 0 #", 1))
    out = s.root / "out"

    def check(o, e):
        errors = {c: json.loads((out / f"{c}.json").read_text())["error"] for c in ("Big", "Huge", "Zero")}
        assert "claims 2147483648 voxel bytes; the file holds 0" in errors["Big"]
        assert "4096x4096x4096 voxels, more than" in errors["Huge"]
        assert "invalid spacing" in errors["Zero"]
        assert [ln for ln in e.splitlines() if ln.startswith("[")] and "[1/3]" in e and "[3/3]" in e

    return Expect(["predict", "-i", inp, "-o", out, "--bundle", s.bundle, "--threads", "1"], 1, "Big: FAILED",
                  check, subprocess=True)


# ---------------------------------------------------------------------------------------
# 3, 8: the bundle is a sealed box, checked against its schema before any case runs


def _edit(bundle: Path, fn) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    fn(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def _rehash(bundle: Path, rel: str) -> None:
    import hashlib

    digest = hashlib.sha256((bundle / rel).read_bytes()).hexdigest()
    _edit(bundle, lambda m: m["files"].__setitem__(rel, digest))


def bad_bundle(damage: Callable[[Path, Scene], None], message: str):
    """predict with a damaged copy of the bundle: exit 2, one line naming it, no case run."""

    def prepare(s: Scene) -> Expect:
        b = s.copy_bundle()
        damage(b, s)
        inp = s.input_folder("Good_0000.nii.gz")
        out = s.root / "out"

        def check(o, e):
            assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]
            assert "[1/" not in o + e

        return Expect(["predict", "-i", inp, "-o", out, "--bundle", b], 2, message, check)

    return prepare


def _outside_copy(b: Path, s: Scene) -> Path:
    other = s.root / "elsewhere"
    other.mkdir(exist_ok=True)
    shutil.copy(b / "reference.onnx", other / "reference.onnx")
    return other / "reference.onnx"


def _files_entry(rel: str, digest_of: Path | None = None):
    def damage(b: Path, s: Scene) -> None:
        import hashlib

        digest = hashlib.sha256(digest_of.read_bytes()).hexdigest() if digest_of else "0" * 64
        _edit(b, lambda m: m["files"].__setitem__(rel, digest))

    return damage


def _graph_outside(b: Path, s: Scene) -> None:
    target = _outside_copy(b, s)
    rel = os.path.relpath(target, b)

    def fn(m):
        m["graphs"]["reference"]["onnx"] = rel
        m["files"][rel] = m["files"]["reference.onnx"]

    _edit(b, fn)


def _symlink_leaving(b: Path, s: Scene) -> None:
    target = _outside_copy(b, s)
    (b / "reference.onnx").unlink()
    os.symlink(target, b / "reference.onnx")


def _dev_zero(b: Path, s: Scene) -> None:
    os.symlink("/dev/zero", b / "zero.bin")
    _edit(b, lambda m: m["files"].__setitem__("zero.bin", "0" * 64))


def _external_data(b: Path, s: Scene) -> None:
    import onnx

    model = onnx.load(str(b / "stcn_key.onnx"))
    (b / "stcn_key.onnx").unlink()
    onnx.save_model(model, str(b / "stcn_key.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="stcn_key.weights", size_threshold=0)
    for rel in ("stcn_key.onnx", "stcn_key.weights"):
        _rehash(b, rel)


def _swapped_graph(b: Path, s: Scene) -> None:
    (b / "stcn_skip.onnx").unlink()
    shutil.copy(b / "stcn_key.onnx", b / "stcn_skip.onnx")
    _rehash(b, "stcn_skip.onnx")


def _not_onnx(b: Path, s: Scene) -> None:
    (b / "stcn_skip.onnx").unlink()
    (b / "stcn_skip.onnx").write_bytes(os.urandom(4096))
    _rehash(b, "stcn_skip.onnx")


def _manifest(fn):
    return lambda b, s: _edit(b, fn)


def _set(path: str, value):
    def fn(m):
        *head, last = path.split(".")
        d = m
        for k in head:
            d = d[k]
        d[last] = value

    return _manifest(fn)


# ---------------------------------------------------------------------------------------
# 4, 5: writes stay inside the output folder, through private temporaries; clashes refused


def planted_links(s: Scene) -> Expect:
    """Links planted under every name the old code used (and under the outputs' own names)
    point at a victim file outside: nothing is written through them; a live run's private
    folder and someone's hidden file survive."""
    from app.outputs import OutputFolder

    inp = s.input_folder("Good_0000.nii.gz")
    out = s.root / "out"
    out.mkdir()
    victim = s.root / "victim.txt"
    victim.write_text("precious")
    for name in (".Good.json.part.tmp", ".review.csv.part.tmp", "Good.json", "review.csv", "Good.nii.gz"):
        os.symlink(victim, out / name)
    (out / ".other.json.part.tmp").write_text("another run's")
    live = OutputFolder(out)  # another run, alive (its lock held) while this one runs
    (live.private / "part.inflight").write_text("in flight")

    def check(o, e):
        try:
            assert victim.read_text() == "precious"
            for name in ("Good.json", "review.csv", "Good.nii.gz"):
                assert not (out / name).is_symlink() and (out / name).is_file(), name
            assert (out / ".other.json.part.tmp").read_text() == "another run's"
            assert (live.private / "part.inflight").read_text() == "in flight"
            runs = [p for p in out.iterdir() if p.name.startswith(".flare22-run.")]
            assert runs == [live.private]
        finally:
            live.close()
        assert not live.private.exists()

    return Expect(["predict", "-i", inp, "-o", out, "--bundle", s.bundle, "--threads", "1"], 0, None, check)


def outputs_mode_under_umask(s: Scene) -> Expect:
    inp = s.input_folder("Good_0000.nii.gz")
    out = s.root / "out"

    def check(o, e):
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
        assert modes == {"Good.nii.gz": "0o644", "Good.json": "0o644", "review.csv": "0o644"}, modes

    return Expect(["sh", "-c", f'umask 077 && exec "$0" -m flare22 predict -i {inp} -o {out} --bundle {s.bundle}'
                   " --threads 1 --quiet", PY], 0, None, check, subprocess=True)


def duplicate_case_names(s: Scene) -> Expect:
    inp = s.input_folder("dup_0000.nii.gz", "Other_0000.nii.gz")
    _write_as(inp / "dup_0000.nii.gz", inp / "dup_0000.mha")
    out = s.root / "out"
    return Expect(["predict", "-i", inp, "-o", out, "--bundle", s.bundle], 2,
                  "dup_0000.mha, dup_0000.nii.gz are all case 'dup'",
                  lambda o, e: not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]
                  or pytest.fail("something was written"))


def uncertainty_name_clash(s: Scene) -> Expect:
    inp = s.input_folder("A_0000.nii.gz", "A_uncertainty_0000.nii.gz")
    return Expect(["predict", "-i", inp, "-o", s.root / "out", "--bundle", s.bundle, "--uncertainty"], 2,
                  "case 'A''s uncertainty map and case 'A_uncertainty''s labels would both be")


def output_onto_input(s: Scene) -> Expect:
    inp = s.input_folder("B_0000.nii.gz", "B_0000_0000.nii.gz")
    before = (inp / "B_0000.nii.gz").read_bytes()

    def check(o, e):
        assert (inp / "B_0000.nii.gz").read_bytes() == before
        assert sorted(p.name for p in inp.iterdir()) == ["B_0000.nii.gz", "B_0000_0000.nii.gz"]

    return Expect(["predict", "-i", inp, "-o", inp, "--bundle", s.bundle], 2,
                  f"case 'B_0000''s labels would overwrite the input {inp / 'B_0000.nii.gz'}", check)


# ---------------------------------------------------------------------------------------
# 7: predict.sh runs the appliance beside it, whatever the current folder


def predict_sh_from_folder_with_app(s: Scene) -> Expect:
    evil = s.root / "cwd"
    (evil / "app").mkdir(parents=True)
    marker = s.root / "ran-the-wrong-app"
    for mod in ("__init__.py", "__main__.py", "cli.py"):
        (evil / "app" / mod).write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    inp = s.input_folder("Good_0000.nii.gz")
    out = s.root / "out"

    def check(o, e):
        assert not marker.exists(), "predict.sh ran the app/ of the current folder"
        assert (out / "Good.nii.gz").is_file()

    env = {"FLARE22_INPUT": str(inp), "FLARE22_OUTPUT": str(out), "FLARE22_BUNDLE": str(s.bundle),
           "FLARE22_PYTHON": PY}
    return Expect(["sh", REPO / "predict.sh", "--threads", "1", "--quiet"], 0, None, check, subprocess=True,
                  env=env, cwd=evil)


# ---------------------------------------------------------------------------------------
# 9: evaluate: a bad case is one line, the others are still scored into the CSV


def _labels(path: Path, value: int = 1, spacing=(1.0, 1.0, 2.0), dtype="uint8") -> None:
    import numpy as np
    import SimpleITK as sitk

    a = np.zeros((6, 8, 8), dtype)
    a[2:4, 2:6, 2:6] = value
    img = sitk.GetImageFromArray(a)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def evaluate_bad_case(make_bad: Callable[[Path], None], message: str):
    def prepare(s: Scene) -> Expect:
        gt, pred = s.root / "gt", s.root / "pred"
        gt.mkdir()
        pred.mkdir()
        for c in ("A", "B"):
            _labels(gt / f"{c}.nii.gz")
        _labels(pred / "A.nii.gz")
        make_bad(pred / "B.nii.gz")
        csv = s.root / "scores.csv"

        def check(o, e):
            rows = csv.read_text().splitlines()
            assert [r.split(",")[0] for r in rows[1:]] == ["A"]

        return Expect(["evaluate", "--pred", pred, "--gt", gt, "--out", csv, "--workers", "1"], 1, message, check)

    return prepare


def evaluate_no_ground_truth(s: Scene) -> Expect:
    (s.root / "gt").mkdir()
    (s.root / "pred").mkdir()
    return Expect(["evaluate", "--pred", s.root / "pred", "--gt", s.root / "gt", "--out", s.root / "x.csv"], 2,
                  "no ground-truth files")


# ---------------------------------------------------------------------------------------
# 10: propagate: blank --slices and an --out without an image extension


def _assist_scene(s: Scene) -> tuple[Path, Path]:
    import numpy as np
    import SimpleITK as sitk

    image = s.cases / "Phantom_0001_0000.nii.gz"
    ct = sitk.ReadImage(str(image))
    ann = np.zeros(sitk.GetArrayFromImage(ct).shape, np.uint8)
    ann[10, 10:20, 10:20] = 1
    lab = sitk.GetImageFromArray(ann)
    lab.CopyInformation(ct)
    sitk.WriteImage(lab, str(s.root / "ann.nii.gz"))
    return image, s.root / "ann.nii.gz"


def propagate_blank_slices(s: Scene) -> Expect:
    image, ann = _assist_scene(s)
    out = s.root / "filled.nii.gz"
    return Expect(["propagate", "--image", image, "--annotations", ann, "--out", out, "--mode", "nearest",
                   "--slices", "3,4"], 2, "--slices [3, 4] hold no annotation (drawn slices: [10])",
                  lambda o, e: not out.exists() or pytest.fail("written"))


def propagate_out_without_extension(s: Scene) -> Expect:
    image, ann = _assist_scene(s)
    return Expect(["propagate", "--image", image, "--annotations", ann, "--out", s.root / "filled.xyz",
                   "--mode", "nearest"], 2, "--out needs an image extension")


# ---------------------------------------------------------------------------------------
# 11: report folder, counter, hidden names, Ctrl-C


def report_dir_not_writable(s: Scene) -> Expect:
    inp = s.input_folder("Good_0000.nii.gz")
    blocker = s.root / "reports"
    blocker.write_text("a file where the report folder should be")
    return Expect(["predict", "-i", inp, "-o", s.root / "out", "--bundle", s.bundle, "--report-dir", blocker], 2,
                  f"report folder {blocker} cannot be written")


def counter_with_failures(s: Scene) -> Expect:
    inp = s.input_folder("B_0000.nii.gz", "D_0000.nii.gz")
    for bad in ("A_0000.nii.gz", "C_0000.nii.gz"):
        (inp / bad).write_bytes(b"\x1f\x8b not an image")
    (inp / "..x_0000.nii.gz").write_bytes(b"hidden")

    def check(o, e):
        counters = sorted(ln.split("]")[0] + "]" for ln in (o + e).splitlines() if ln.startswith("["))
        assert counters == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"], o + e
        assert "skipping" in e and "..x_0000.nii.gz" in e

    return Expect(["predict", "-i", inp, "-o", s.root / "out", "--bundle", s.bundle, "--threads", "1"], 1,
                  "A: FAILED", check, subprocess=True)  # its own process: the warning goes through logging


def _interrupt_after_first_case(s: Scene, signum) -> Expect:
    import signal as _signal
    import time

    from evaluation.phantom import write_dataset

    write_dataset(s.root / "long", 3, seed=5, shape_zyx=(60, 64, 64), unlabeled=True)
    out = s.root / "out"
    proc = subprocess.Popen([PY, "-m", "flare22", "predict", "-i", str(s.root / "long" / "images"), "-o", str(out),
                             "--bundle", str(s.bundle), "--threads", "1"], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not (out.is_dir() and any(out.glob("*.json"))):
        assert proc.poll() is None and time.monotonic() - t0 < 120, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signum)
    o, e = proc.communicate(timeout=120)
    assert "Traceback" not in o + e, e
    assert proc.returncode == 128 + signum, (proc.returncode, e)
    assert [ln for ln in e.splitlines() if ln.startswith("flare22")] == [
        ln for ln in e.splitlines() if f"interrupted by {_signal.Signals(signum).name}" in ln], e
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    return Expect(["predict", "--help"], 0)  # the run above is the reproduction


# ---------------------------------------------------------------------------------------
# the table: (issue item, name, scene -> expectation)

ROWS: list[tuple[int, str, Callable[[Scene], Expect]]] = [
    (1, "export into a folder holding other files", export_into_folder_with_notes),
    (1, "export over a bundle without --force", export_over_bundle_without_force),
    (1, "export --force over a bundle holding a foreign file", export_force_over_bundle_with_foreign_file),
    (1, "export --out naming a regular file", export_out_is_a_file),
    (2, "truncated raw .nii", truncated_input(".nii")),
    (2, "truncated .nii.gz", truncated_input(".nii.gz", compress=True)),
    (2, "truncated raw .mha", truncated_input(".mha")),
    (2, "truncated compressed .mha", truncated_input(".mha", compress=True)),
    (3, "files entry ../../x", bad_bundle(_files_entry("../../x"), "files['../../x']: must be a plain relative")),
    (3, "files entry /etc/passwd with its digest",
     bad_bundle(_files_entry("/etc/passwd", Path("/etc/passwd")), "files['/etc/passwd']: must be a plain relative")),
    (3, "graph path outside the bundle", bad_bundle(_graph_outside, "must be a plain relative path")),
    (3, "graph file a link leaving the bundle", bad_bundle(_symlink_leaving, "reference.onnx leads outside the bundle")),
    (3, "a /dev/zero entry", bad_bundle(_dev_zero, "file zero.bin leads outside the bundle")),
    (3, "ONNX external data (hashed)", bad_bundle(_external_data, "keeps weights in external data files")),
    (4, "links planted under temporary and output names", planted_links),
    (5, "dup_0000.mha and dup_0000.nii.gz", duplicate_case_names),
    (5, "case A_uncertainty against A's uncertainty map", uncertainty_name_clash),
    (5, "-i X -o X: case B_0000's output onto input B_0000.nii.gz", output_onto_input),
    (6, "export a crafted pickle checkpoint", export_crafted_checkpoint),
    (7, "predict.sh from a folder holding an app/ package", predict_sh_from_folder_with_app),
    (8, "files as a list", bad_bundle(_set("files", ["reference.onnx"]), "manifest field files: must be an object")),
    (8, "graphs as a list", bad_bundle(_set("graphs", []), "manifest field graphs: must be an object")),
    (8, "input_size a string", bad_bundle(_set("input_size", "64"), "manifest field input_size: must be")),
    (8, "input_size of 3 values", bad_bundle(_set("input_size", [64, 64, 3]), "manifest field input_size: must be")),
    (8, "stride 0", bad_bundle(_set("stride", 0), "manifest field stride: must be an integer 1..1024")),
    (8, "stride '8'", bad_bundle(_set("stride", "8"), "manifest field stride: must be an integer 1..1024")),
    (8, "classes an int", bad_bundle(_set("classes", 14), "manifest field classes: must be an object")),
    (8, "malformed windows", bad_bundle(_set("windows", [{"name": "a", "sub_windows": [[0, "x"]]}]),
                                        "manifest field windows[0].sub_windows")),
    (8, "sampling every = 0", bad_bundle(_set("sampling.every", 0), "manifest field sampling.every")),
    (8, "propagation top_k = {}", bad_bundle(_set("propagation.top_k", {}), "manifest field propagation.top_k")),
    (8, "propagation setting misspelt", bad_bundle(_set("propagation.topk", 5), "manifest field propagation.topk: unknown")),
    (8, "propagation {} replaced by a list", bad_bundle(_set("propagation", []), "manifest field propagation:")),
    (8, "graph swapped for one with other inputs (hash updated)",
     bad_bundle(_swapped_graph, "graph 'stcn_skip' file stcn_skip.onnx has inputs ['image']")),
    (8, "non-ONNX bytes with a matching hash", bad_bundle(_not_onnx, "stcn_skip.onnx is not an ONNX model")),
    (11, "header claims 1024^3 / 4096^3 voxels; zero spacing", header_claims_huge_volume),
    (11, "umask 077: every output 0644", outputs_mode_under_umask),
    (9, "evaluate: prediction off the ground truth's grid",
     evaluate_bad_case(lambda p: _labels(p, spacing=(1.0, 1.0, 3.0)), "prediction spacing")),
    (9, "evaluate: a label of 300", evaluate_bad_case(lambda p: _labels(p, 300, dtype="int16"), "must lie in 0..13")),
    (9, "evaluate: a label of 20 (14..255)", evaluate_bad_case(lambda p: _labels(p, 20), "must lie in 0..13")),
    (9, "evaluate: an unreadable prediction", evaluate_bad_case(lambda p: p.write_bytes(b"junk"), "B.nii.gz")),
    (9, "evaluate: no ground-truth files", evaluate_no_ground_truth),
    (10, "propagate --slices naming blank slices", propagate_blank_slices),
    (10, "propagate --out without an image extension", propagate_out_without_extension),
    (11, "--report-dir not writable", report_dir_not_writable),
    (11, "[i/N] counter with failing cases; a hidden ..x_0000 name", counter_with_failures),
    (11, "Ctrl-C", lambda s: _interrupt_after_first_case(s, 2)),
    (11, "SIGTERM", lambda s: _interrupt_after_first_case(s, 15)),
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


@pytest.mark.parametrize("suffix", [".nii", ".mha", ".mhd", ".nrrd"])
def test_every_format_is_size_checked_before_reading(tmp_path, suffix):
    """The formats read_ct takes outside a case folder too (assist, evaluate): a file cut in
    half is refused from its size, before ITK allocates its voxels."""
    import numpy as np
    import SimpleITK as sitk

    from app.ctio import read_ct
    from app.errors import InputError

    path = tmp_path / f"half{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 30, 30), np.int16)), str(path), useCompression=False)
    data_file = tmp_path / "half.raw" if suffix == ".mhd" else path
    data = data_file.read_bytes()
    data_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated image \\(the header claims 36000 voxel bytes"):
        read_ct(path)

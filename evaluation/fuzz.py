"""Seeded, bounded fuzzing of the appliance: ``flare22 fuzz --seconds 120``.

Each trial mutates one thing and runs ``predict`` on it, the way a user would:

* an input CT (``.nii``, ``.nii.gz``, raw or compressed ``.mha``): a random header field set
  to a hostile value (sizes, data type, bits per voxel, spacing, voxel offset, scaling,
  orientation; MetaImage keys), a truncation, or a few flipped bytes;
* the bundle: a manifest value replaced or deleted somewhere in its tree, the manifest's
  text truncated or flipped, or a graph truncated or flipped (its hash updated most times,
  so that the graph itself is what gets read).

A trial passes when the command ends within its time limit with a documented exit status
(image trials: 0 or 1; bundle trials: 0 or 2: a bundle is checked whole before any case
runs), prints no traceback and no "internal error" line, names an ``InputError`` /
``BundleError`` for what failed, and changes nothing outside its output folder (every other
file of the trial's folder is compared before and after, and the output folder holds no
temporaries afterwards).

Trials run in a worker process (fast: one import of ONNX Runtime and SimpleITK); the parent
enforces the time limit per trial, restarts the worker after a hang or a crash, and reports
each failure with the seed and trial number that replay it (``--seed S --trial K``).
Trial k's random choices depend only on (seed, k).
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from app.argtypes import nonneg_int, positive_float

# `flare22 fuzz` without --bundle exports a random tiny bundle; exporting needs torch, which
# evaluation/ does not import: the `flare22` command injects the exporter here.
RANDOM_BUNDLE = None

IMAGE_KINDS = (".nii", ".nii.gz", ".mha", ".cmha")  # .cmha: compressed MetaImage, written as .mha
HOSTILE_NUMBERS = (0, -1, 1, 2, 3, 7, 255, 256, 32767, -32768, 65535, 2**31 - 1, -(2**31), 1e-30, 1e30,
                   float("nan"), float("inf"), -float("inf"))
HOSTILE_JSON = (None, True, 0, -1, 1, 2**63, 1e308, -1e308, "", "x", "../../etc/passwd", "/dev/zero", [], {},
                [1, 2, 3], ["a"], {"a": 1}, [[[]]], "8", 0.5)
# NIfTI-1 header fields: (offset, struct code) of dims, intent, datatype, bitpix, pixdim,
# vox_offset, scl_slope/inter, slice fields, qform/sform codes, quatern, srow
NIFTI_FIELDS = ([(40 + 2 * i, "h") for i in range(8)] + [(70, "h"), (72, "h")]
                + [(76 + 4 * i, "f") for i in range(8)] + [(108, "f"), (112, "f"), (116, "f"), (120, "h"),
                                                            (252, "h"), (254, "h")]
                + [(256 + 4 * i, "f") for i in range(6)] + [(280 + 4 * i, "f") for i in range(12)])
META_KEYS = ("NDims", "DimSize", "ElementSpacing", "ElementType", "ElementDataFile", "CompressedData",
             "CompressedDataSize", "HeaderSize", "TransformMatrix", "Offset", "ElementNumberOfChannels",
             "BinaryDataByteOrderMSB")
META_VALUES = ("0", "-1", "1", "3", "4", "2 2", "0 0 0", "-5 8 8", "1e30 1e30 1e30", "nan nan nan", "99999 99999 99",
               "MET_SHORT", "MET_DOUBLE", "MET_UCHAR_ARRAY", "MET_STRING", "LOCAL", "/dev/zero", "../../etc/passwd",
               "True", "False", "x", "", "1 0 0 0 0 0 0 0 0", "1 2 3 4 5 6 7 8 9")
TRIAL_SECONDS = 60.0


# ---------------------------------------------------------------------------------------
# seeds: one small CT per format, and the bundle


def write_seeds(folder: Path) -> dict[str, Path]:
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 400, (12, 32, 32)).astype(np.int16)
    vol[4:8, 8:24, 8:24] = 60
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((1.5, 1.5, 5.0))
    folder.mkdir(parents=True, exist_ok=True)
    seeds = {}
    for kind in IMAGE_KINDS:
        path = folder / f"seed{kind.replace('.cmha', '.c.mha')}"
        sitk.WriteImage(img, str(path), useCompression=kind in (".nii.gz", ".cmha"))
        seeds[kind] = path
    return seeds


# ---------------------------------------------------------------------------------------
# mutations (pure functions of rng and bytes)


def _flip(rng, data: bytes, start: int = 0) -> bytes:
    b = bytearray(data)
    if len(b) <= start:
        return bytes(b)
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(start, len(b)))
        b[i] ^= int(rng.integers(1, 256))
    return bytes(b)


def _truncate(rng, data: bytes) -> bytes:
    return data[: int(rng.integers(0, max(1, len(data))))]


def _nifti_field(rng, raw: bytes) -> bytes:
    b = bytearray(raw)
    off, code = NIFTI_FIELDS[int(rng.integers(len(NIFTI_FIELDS)))]
    v = HOSTILE_NUMBERS[int(rng.integers(len(HOSTILE_NUMBERS)))]
    if code == "h":
        v = int(np.clip(v, -32768, 32767)) if np.isfinite(v) else 0
    struct.pack_into("<" + code, b, off, v)
    return bytes(b)


def _meta_field(rng, raw: bytes) -> bytes:
    end = raw.find(b"ElementDataFile")
    end = raw.find(b"\n", end) + 1 if end >= 0 else len(raw)
    head, body = raw[:end].decode("latin-1").splitlines(), raw[end:]
    key = META_KEYS[int(rng.integers(len(META_KEYS)))]
    value = META_VALUES[int(rng.integers(len(META_VALUES)))]
    lines = [ln for ln in head if not ln.startswith(key + " ")]
    where = int(rng.integers(0, len(lines) + 1)) if key != "ElementDataFile" else len(lines)
    if key == "ElementDataFile":
        lines = [ln for ln in lines if not ln.startswith("ElementDataFile")]
    lines.insert(where, f"{key} = {value}")
    return ("\n".join(lines) + "\n").encode("latin-1") + body


def mutate_image(rng, kind: str, data: bytes) -> tuple[bytes, str]:
    how = ("field", "truncate", "flip")[int(rng.integers(3))]
    if kind == ".nii.gz":
        raw = gzip.decompress(data)
        if how == "field":
            return gzip.compress(_nifti_field(rng, raw)), "header field"
        if how == "truncate":
            return (_truncate(rng, data), "truncated gzip") if rng.random() < 0.5 else \
                (gzip.compress(_truncate(rng, raw)), "truncated stream, whole gzip")
        return (_flip(rng, data), "flipped gzip bytes") if rng.random() < 0.5 else \
            (gzip.compress(_flip(rng, raw)), "flipped stream bytes")
    if how == "truncate":
        return _truncate(rng, data), "truncated"
    if how == "flip":
        return _flip(rng, data), "flipped bytes"
    if kind == ".nii":
        return _nifti_field(rng, data), "header field"
    return _meta_field(rng, data), "header field"


def _json_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _json_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _json_paths(v, (*prefix, i))


def mutate_manifest(rng, manifest: dict) -> tuple[dict | bytes, str]:
    """A hostile value somewhere in the tree (or a key deleted, or a file entry added)."""
    m = json.loads(json.dumps(manifest))
    paths = [p for p in _json_paths(m) if p and p[0] not in ("parity", "sources", "versions", "configs")]
    path = paths[int(rng.integers(len(paths)))]
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    r = rng.random()
    if r < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
        return m, f"deleted {'.'.join(map(str, path))}"
    if r < 0.25:
        rel = HOSTILE_JSON[int(rng.integers(len(HOSTILE_JSON)))]
        m["files"][str(rel) if not isinstance(rel, str) else rel] = "0" * 64
        return m, f"files entry {rel!r}"
    value = HOSTILE_JSON[int(rng.integers(len(HOSTILE_JSON)))]
    parent[path[-1]] = value
    return m, f"{'.'.join(map(str, path))} = {value!r}"


# ---------------------------------------------------------------------------------------
# one trial: build its folder (parent side), run it (worker side)


def build_trial(seed: int, k: int, root: Path, seeds: dict[str, Path], bundle: Path) -> dict:
    """Make trial k's folder under root; returns its spec (what the worker runs)."""
    rng = np.random.default_rng([seed, k])
    folder = root / f"trial{k:05d}"
    inp, out = folder / "in", folder / "out"
    inp.mkdir(parents=True)
    good = seeds[".nii.gz"]
    use_bundle = bundle
    if rng.random() < 0.6:  # an input CT
        kind = IMAGE_KINDS[int(rng.integers(len(IMAGE_KINDS)))]
        data, what = mutate_image(rng, kind, seeds[kind].read_bytes())
        ext = ".mha" if kind == ".cmha" else kind
        (inp / f"Fuzz_0000{ext}").write_bytes(data)
        if rng.random() < 0.3:
            shutil.copy(good, inp / "Good_0000.nii.gz")
        spec = {"kind": "image", "what": f"{kind}: {what}"}
    else:  # the bundle
        use_bundle = folder / "bundle"
        use_bundle.mkdir()
        for p in bundle.iterdir():
            try:
                os.link(p, use_bundle / p.name)
            except OSError:
                shutil.copy(p, use_bundle / p.name)
        manifest = json.loads((bundle / "manifest.json").read_text())
        r = rng.random()
        if r < 0.5:
            m, what = mutate_manifest(rng, manifest)
            text = json.dumps(m).encode()
        elif r < 0.65:
            raw = (bundle / "manifest.json").read_bytes()
            text, what = (_truncate(rng, raw), "manifest truncated") if rng.random() < 0.5 else \
                (_flip(rng, raw), "manifest bytes flipped")
        else:
            graphs = sorted(p.name for p in bundle.glob("*.onnx"))
            g = graphs[int(rng.integers(len(graphs)))]
            data = (bundle / g).read_bytes()
            data, what = (_truncate(rng, data), f"{g} truncated") if rng.random() < 0.5 else \
                (_flip(rng, data), f"{g} bytes flipped")
            (use_bundle / g).unlink()
            (use_bundle / g).write_bytes(data)
            if rng.random() < 0.8:
                manifest["files"][g] = hashlib.sha256(data).hexdigest()
                what += ", hash updated"
            text = json.dumps(manifest).encode()
        (use_bundle / "manifest.json").unlink()
        (use_bundle / "manifest.json").write_bytes(text)
        shutil.copy(good, inp / "Good_0000.nii.gz")
        spec = {"kind": "bundle", "what": what}
    spec.update(trial=k, folder=str(folder), argv=["predict", "-i", str(inp), "-o", str(out), "--bundle",
                                                    str(use_bundle), "--threads", "1", "--quiet"])
    return spec


def _snapshot(folder: Path, skip: Path) -> dict[str, tuple]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            dirnames[:] = []
            continue
        for n in filenames + dirnames:
            p = os.path.join(dirpath, n)
            if Path(p) == skip:
                continue
            st = os.lstat(p)
            state[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return state


def run_trial(spec: dict) -> dict:
    """Worker side: run the command in this process; judge its outcome."""
    from app.cli import main

    folder = Path(spec["folder"])
    out = folder / "out"
    before = _snapshot(folder, out)
    err, std = io.StringIO(), io.StringIO()
    escaped = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            code = main(spec["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException as exc:  # noqa: BLE001 - what the fuzz is looking for
            code, escaped = -1, f"{type(exc).__name__}: {exc}"
    text = err.getvalue() + std.getvalue()
    problems = []
    if escaped:
        problems.append(f"exception escaped the command: {escaped[:300]}")
    if "Traceback" in text or "--debug shows the traceback" in text:
        problems.append("traceback / internal error: " + text.strip().splitlines()[-1][:300])
    allowed = (0, 1) if spec["kind"] == "image" else (0, 2)
    if code not in allowed and not escaped:
        problems.append(f"exit {code}, expected one of {allowed}: {text.strip()[-300:]}")
    for record in sorted(out.glob("*.json")) if out.is_dir() else []:
        try:
            error = json.loads(record.read_text()).get("error") or ""
        except (OSError, ValueError):
            continue
        if error and not error.startswith(("InputError", "GeometryError")):
            problems.append(f"unclear case error in {record.name}: {error[:300]}")
    after = _snapshot(folder, out)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    if changed:
        problems.append(f"changed outside the output folder: {changed[:5]}")
    if out.is_dir():
        left = [p.name for p in out.iterdir() if p.name.startswith(".")]
        if left:
            problems.append(f"left in the output folder: {left}")
    return {"trial": spec["trial"], "kind": spec["kind"], "what": spec["what"], "exit": code, "problems": problems}


def worker() -> int:
    """Read one JSON spec a line from stdin, answer one JSON result a line."""
    import logging

    logging.disable(logging.WARNING)
    for line in sys.stdin:
        result = run_trial(json.loads(line))
        sys.__stdout__.write(json.dumps(result) + "\n")
        sys.__stdout__.flush()
    return 0


# ---------------------------------------------------------------------------------------
# the parent: build trials, feed the worker, enforce time limits


class _Worker:
    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        repo = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, "-m", "evaluation.fuzz", "--worker"], cwd=repo, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1)

    def run(self, spec: dict, timeout: float) -> dict | None:
        """The result, or None after ``timeout`` seconds (a hang) or a dead worker (a crash)."""
        try:
            self.proc.stdin.write(json.dumps(spec) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def fuzz(bundle: Path, seconds: float, seed: int = 0, work: Path | None = None, only: int | None = None,
         trial_seconds: float = TRIAL_SECONDS, log=print) -> dict:
    """Run trials for ``seconds`` (or trial ``only``); returns counts and failures."""
    owned = work is None
    work = Path(tempfile.mkdtemp(prefix="flare22-fuzz-")) if owned else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    seeds = write_seeds(work / "seeds")
    counts: dict[str, dict[str, int]] = {"image": {}, "bundle": {}}
    failures = []
    w = _Worker()
    t_end = time.monotonic() + seconds
    k = only if only is not None else 0
    trials = 0
    try:
        while True:
            spec = build_trial(seed, k, work / "trials", seeds, Path(bundle))
            result = w.run(spec, trial_seconds)
            if result is None:
                crashed = w.proc.poll() is not None
                result = {"trial": k, "kind": spec["kind"], "what": spec["what"], "exit": None,
                          "problems": ["worker crashed" if crashed else f"no answer within {trial_seconds:.0f} s (hang)"]}
                w.close()
                w = _Worker()
            trials += 1
            key = str(result["exit"])
            counts[result["kind"]][key] = counts[result["kind"]].get(key, 0) + 1
            if result["problems"]:
                failures.append(result)
                log(f"FAIL trial {k} ({result['kind']}: {result['what']}): {'; '.join(result['problems'])}"
                    f"  [replay: flare22 fuzz --seed {seed} --trial {k}]")
            shutil.rmtree(spec["folder"], ignore_errors=True)
            k += 1
            if only is not None or time.monotonic() >= t_end:
                break
    finally:
        w.close()
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    return {"seed": seed, "trials": trials, "seconds": seconds, "exits": counts, "failures": failures}


# ---------------------------------------------------------------------------------------
# command line


def add_arguments(p) -> None:
    p.add_argument("--seconds", type=positive_float, default=120.0, help="how long to fuzz (default 120)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="trial k depends only on (seed, k)")
    p.add_argument("--trial", type=nonneg_int, help="replay this one trial")
    p.add_argument("--bundle", help="model bundle to fuzz against (default: a random tiny bundle, exported here)")
    p.add_argument("--trial-seconds", type=positive_float, default=TRIAL_SECONDS,
                   help="a trial running longer than this counts as a hang")
    p.add_argument("--json", help="also write the summary here")


def run(args) -> int:
    with tempfile.TemporaryDirectory(prefix="flare22-fuzz-bundle-") as tmp:
        bundle = args.bundle
        if bundle is None:
            if RANDOM_BUNDLE is None:
                print("flare22 fuzz: give --bundle (exporting a random one needs the `flare22` command)",
                      file=sys.stderr)
                return 2
            print("exporting a random tiny bundle to fuzz against ...", flush=True)
            bundle = RANDOM_BUNDLE(Path(tmp) / "bundle", "tiny")
        summary = fuzz(Path(bundle), args.seconds, args.seed, only=args.trial, trial_seconds=args.trial_seconds)
    for kind, exits in summary["exits"].items():
        print(f"{kind} trials: {sum(exits.values())} (exit status: "
              + ", ".join(f"{k}: {v}" for k, v in sorted(exits.items())) + ")")
    print(f"flare22 fuzz: {summary['trials']} trials (seed {summary['seed']}), {len(summary['failures'])} failures")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(worker())
    parser = argparse.ArgumentParser(prog="python -m evaluation.fuzz")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))

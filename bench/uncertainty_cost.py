"""What ``--uncertainty`` costs: time and peak memory of ``flare22 predict`` on one
512 x 512 x N case, plain and with ``--uncertainty``, run alternately in the same session
(the machine may be shared: the ratio of interleaved runs is the figure, not the seconds).

    python bench/uncertainty_cost.py [--bundle B] [--slices 600] [--repeats 3] [--out DIR]

Each run is its own process (``python -m flare22 predict ... --threads T``); its wall time
and its peak resident memory (``wait4``'s ``ru_maxrss``) are recorded. Prints a table of
medians and the ratios uncertainty / plain; writes ``uncertainty_cost.json``. Without
``--bundle`` a random tiny bundle is exported first (the pipeline's cost outside the
networks, which is what the map adds, does not depend on the weights).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.argtypes import positive_int  # noqa: E402


def make_case(path: Path, slices: int, size: int = 512, seed: int = 0) -> None:
    """A CT-like volume: air, a body ellipse of soft tissue, a few brighter organ blobs."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:slices, :size, :size]
    vol = np.full((slices, size, size), -1000, np.int16)
    body = ((y - size / 2) / (0.38 * size)) ** 2 + ((x - size / 2) / (0.45 * size)) ** 2 <= 1
    vol[:, body[0]] = 40
    for _ in range(6):
        cz, cy, cx = rng.uniform(0.2, 0.8, 3) * (slices, size, size)
        rz, ry, rx = rng.uniform(0.05, 0.15, 3) * (slices, size, size)
        blob = ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        vol[blob] = int(rng.integers(60, 200))
    vol += rng.integers(-20, 20, vol.shape, dtype=np.int16)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(img, str(path), useCompression=True)


def measure(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of one child process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="model bundle (default: export a random tiny one)")
    p.add_argument("--slices", type=positive_int, default=600)
    p.add_argument("--repeats", type=positive_int, default=3, help="runs of each, interleaved")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--out", default="bench/out/uncertainty_cost")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flare22-ucost-") as tmp:
        tmp = Path(tmp)
        bundle = args.bundle
        if bundle is None:
            from export.bundle import export_bundle

            bundle = str(export_bundle(tmp / "bundle", programs=False, quiet=True))
        (tmp / "in").mkdir()
        make_case(tmp / "in" / "Big_0000.nii.gz", args.slices)
        runs: dict[str, list[tuple[float, float]]] = {"plain": [], "uncertainty": []}
        for r in range(args.repeats):
            for kind in ("plain", "uncertainty") if r % 2 == 0 else ("uncertainty", "plain"):
                cmd = [sys.executable, "-m", "flare22", "predict", "-i", str(tmp / "in"), "-o", str(tmp / kind),
                       "--bundle", str(bundle), "--threads", str(args.threads), "--quiet"]
                if kind == "uncertainty":
                    cmd.append("--uncertainty")
                runs[kind].append(measure(cmd))
                print(f"run {r + 1} {kind:<12} {runs[kind][-1][0]:7.1f} s  {runs[kind][-1][1]:5.2f} GiB", flush=True)
    med = {k: (float(np.median([s for s, _ in v])), float(np.median([m for _, m in v]))) for k, v in runs.items()}
    ratio = (med["uncertainty"][0] / med["plain"][0], med["uncertainty"][1] / med["plain"][1])
    print(f"\n512 x 512 x {args.slices}, {args.repeats} interleaved runs each, {args.threads} thread(s)")
    print(f"{'':<12} {'seconds':>8} {'peak GiB':>9}")
    for k, (s, m) in med.items():
        print(f"{k:<12} {s:8.1f} {m:9.2f}")
    print(f"{'ratio':<12} {ratio[0]:8.2f} {ratio[1]:9.2f}")
    (out / "uncertainty_cost.json").write_text(json.dumps(
        {"slices": args.slices, "repeats": args.repeats, "threads": args.threads, "bundle": str(args.bundle),
         "runs": runs, "median": med, "ratio_time": ratio[0], "ratio_memory": ratio[1]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

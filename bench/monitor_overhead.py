"""How much does ResourceMonitor slow a CPU-bound workload? (target: < 1 %)

The workload is a fixed number of numpy matrix products (all BLAS threads), timed inside
the workload itself. It runs alternately without and with a monitor sampling every 0.1 s:

* ``subprocess``: the workload is a child process and the monitor, in this process,
  follows the child's tree: what ``flare22 efficiency`` does for every case.
* ``inprocess``: the workload runs in this process's main thread while the monitor's
  thread samples beside it (numpy releases the GIL inside the products).

Runs come in pairs, unmonitored and monitored, in alternating order, so that drift of the
machine hits both alike; the figure is the median of the pairs' ratios (and the ratio of the
minima). Pairs of two unmonitored runs give the noise floor of the machine: on a shared,
busy machine a difference below that floor is not a measurement. The monitor also reports its sampling
thread's CPU time (``thread_cpu_s``), a direct, low-noise measure of what it takes
from the workload: that CPU time over (wall time x logical CPUs) is its share of the machine.

    .venv/bin/python bench/monitor_overhead.py [--seconds 3] [--repeats 6]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.argtypes import positive_float, positive_int  # noqa: E402
from evaluation.efficiency import ResourceMonitor  # noqa: E402

N = 768

WORKLOAD = """
import sys, time
import numpy as np
n, iters = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n)); b = rng.standard_normal((n, n))
a @ b
t = time.perf_counter()
for _ in range(iters):
    c = a @ b
print(time.perf_counter() - t)
"""


def matmul_loop(iters: int, n: int = N) -> float:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    a @ b
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    return time.perf_counter() - t


def calibrate(seconds: float) -> int:
    t = matmul_loop(20)
    return max(20, int(round(20 * seconds / t)))


def run_once(mode: str, iters: int, monitored: bool) -> tuple[float, dict | None]:
    mon = ResourceMonitor() if monitored else None
    if mon is not None:
        mon.start()
    try:
        if mode == "subprocess":
            proc = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(N), str(iters)],
                                    stdout=subprocess.PIPE, text=True)
            if mon is not None:
                mon.track(proc.pid)
            out, _ = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"workload exited with {proc.returncode}")
            seconds = float(out.strip())
        else:
            seconds = matmul_loop(iters)
    finally:
        if mon is not None:
            mon.stop()
    if mon is None:
        return seconds, None
    n = len(mon.samples)
    return seconds, {
        "samples": n,
        "missed_ticks": mon.missed_ticks,
        "cpu_ms_per_sample": 1e3 * mon.thread_cpu_s / max(n, 1),
        "machine_share_pct": 100 * mon.thread_cpu_s / (mon.elapsed_s * psutil.cpu_count()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=positive_float, default=3.0, help="length of one workload run")
    ap.add_argument("--repeats", type=positive_int, default=6, help="monitored/unmonitored pairs per mode")
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="skip the unmonitored pairs that show the machine's noise floor")
    ap.add_argument("--modes", nargs="+", default=["subprocess", "inprocess"], choices=["subprocess", "inprocess"])
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    iters = calibrate(args.seconds)
    report = {
        "machine": f"{psutil.cpu_count()} logical CPUs, load {os.getloadavg()[0]:.2f} at start",
        "workload": f"{iters} x ({N} x {N}) @ ({N} x {N}) float64, ~{args.seconds} s",
        "modes": {},
    }
    print(report["machine"], "|", report["workload"])
    for mode in args.modes:
        ratios, control, stats, off_all, on_all = [], [], [], [], []
        for i in range(args.repeats):
            # paired and order-alternated: drift of a busy machine cancels within a pair
            order = (False, True) if i % 2 == 0 else (True, False)
            times = {}
            for monitored in order:
                seconds, st = run_once(mode, iters, monitored)
                times[monitored] = seconds
                if st is not None:
                    stats.append(st)
            off_all.append(times[False])
            on_all.append(times[True])
            ratios.append(times[True] / times[False])
            if args.control:  # the same pair with no monitor at all: the noise floor
                a, b = run_once(mode, iters, False)[0], run_once(mode, iters, False)[0]
                control.append(b / a)
        res = {
            "off_s": off_all, "on_s": on_all,
            "slowdown_pct_median_of_pairs": 100 * (statistics.median(ratios) - 1),
            "slowdown_pct_of_minima": 100 * (min(on_all) / min(off_all) - 1),
            "pair_ratios": ratios,
            "noise_floor_pct_median_abs": (100 * statistics.median(abs(r - 1) for r in control)
                                           if control else None),
            "cpu_ms_per_sample": statistics.median(x["cpu_ms_per_sample"] for x in stats),
            "machine_share_pct": statistics.median(x["machine_share_pct"] for x in stats),
            "missed_ticks": sum(x["missed_ticks"] for x in stats),
            "samples_per_run": statistics.median(x["samples"] for x in stats),
        }
        report["modes"][mode] = res
        floor = res["noise_floor_pct_median_abs"]
        print(f"{mode:>10}: off median {statistics.median(off_all):.3f} s; "
              f"slowdown {res['slowdown_pct_median_of_pairs']:+.2f} % (median of {args.repeats} pairs), "
              f"{res['slowdown_pct_of_minima']:+.2f} % (of minima)"
              + (f"; noise floor (no-monitor pairs) {floor:.2f} %" if floor is not None else "")
              + f"; monitor thread {res['cpu_ms_per_sample']:.3f} ms CPU per sample = "
              f"{res['machine_share_pct']:.3f} % of the machine; "
              f"{res['samples_per_run']:.0f} samples/run, {res['missed_ticks']} missed ticks")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

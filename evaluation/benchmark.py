"""Benchmark: the full pipeline against the dense baseline on 512 x 512 x N phantoms.

    flare22 benchmark --bundle BUNDLE [--sizes 100 200 400] [--out DIR]
    flare22 benchmark --config tiny|paper ...   # a random-weight bundle exported on the spot
    flare22 benchmark --quick                   # CI: tiny bundle, small phantoms, < 1 min
    flare22 benchmark ... --runtimes ort:fp32 openvino:bf16 [--no-dense] [--warmup]   # runtimes, one run

For every N, in one run and side by side: (a) the full pipeline (reference on k sampled
slices, selection, propagation); (b) the dense baseline (the CPS pair on every slice, no
propagation); optionally (c) the same pipeline on the torch backend (eager) and (d) the
published propagation (every organ on every slice, full frame, both directions) with each
of the project's cost switches turned on one after the other.

Per stage (read, reference, selection, key encoding, skip features, value encoding, memory
read, decoding, compose, write): seconds, share of the total and the number of calls;
slices per second; peak RSS and the FLARE figures from evaluation.efficiency; and a cost model:
multiply-adds per stage from the bundle's manifest (counted at export) times the calls and
window areas the engine reports, next to the measured time, with the implied throughput.
The fitted slope of time against N and the peak memory at each N show how cost grows.

Random weights say little about how far a trained network propagates an organ before it
vanishes, so the propagation's share measured with a random bundle is not the trained
one: give a trained bundle (``make demo`` exports one) for figures that mean something.
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from app.argtypes import nonneg_int, positive_int
from app.bundle import Bundle, load_bundle
from app.ctio import read_ct, write_labels
from .efficiency import ResourceMonitor
from app.predict import MODES, PredictOptions, Predictor
from app.propagation import PUBLISHED

log = logging.getLogger("flare22")


def _phantom(n: int, hw: int, seed: int):
    from .phantom import generate

    return generate(seed, (n, hw, hw))


COST_GRAPHS = ("reference", "stcn_key", "stcn_skip", "stcn_value", "stcn_decode")


def graph_macs(bundle: Bundle) -> dict[str, float]:
    """Multiply-adds per unit of each graph, as counted at export (the manifest's ``cost``)."""
    return {name: float(bundle.graph(name).get("cost", {}).get("macs", 0.0)) for name in COST_GRAPHS}


def cost_model(bundle: Bundle | dict, report: dict, num_slices: int, cell_scale: float = 1.0) -> dict:
    """Counted multiply-adds per stage (GMAC) of one pipeline run, any mode: the pair's calls
    times its per-slice count, STCN's key encodes times theirs, and the skip / value / decode
    cells the engine reports times their per-cell counts. ``bundle`` may be a
    :func:`graph_macs` dict of another configuration; ``cell_scale`` then scales the run's
    cells to that configuration's key grid (16 for tiny's 8 x 8 -> paper's 32 x 32)."""
    macs = graph_macs(bundle) if isinstance(bundle, Bundle) else bundle
    g = {}
    if report["mode"] == "dense":
        g["reference"] = macs["reference"] * num_slices
    else:
        g["reference"] = macs["reference"] * len(report.get("sampled", []))
        st = report.get("propagation", {})
        if st:
            g["key_encode"] = macs["stcn_key"] * st.get("key_encodes", 0)
            g["skip"] = macs["stcn_skip"] * st.get("skip_cells", 0) * cell_scale
            g["value_encode"] = macs["stcn_value"] * st.get("value_cells", 0) * cell_scale
            g["decode"] = macs["stcn_decode"] * st.get("decoded_cells", 0) * cell_scale
    return {k: v / 1e9 for k, v in g.items()}


def run_once(predictor: Predictor, path: Path, out_dir: Path) -> dict:
    """One case through read -> predict -> write, with the monitor running."""
    mon = ResourceMonitor(gpu=None, interval_s=0.1)
    t_start = time.perf_counter()
    with mon:
        t0 = time.perf_counter()
        volume, props = read_ct(path)
        t_read = time.perf_counter() - t0
        labels, report = predictor.predict_volume(volume)
        t0 = time.perf_counter()
        write_labels(labels, props, out_dir / f"{path.name.replace('_0000.nii.gz', '')}.nii.gz")
        t_write = time.perf_counter() - t0
    total = time.perf_counter() - t_start
    figures = mon.figures(total).to_dict()
    stages = {"read": t_read, **report["timings"], "write": t_write}
    prop = report.get("propagation", {})
    if prop:
        stages.pop("propagation", None)
        for k, v in prop.get("seconds", {}).items():
            stages[k] = v
        other = report["timings"]["propagation"] - sum(prop.get("seconds", {}).values())
        stages["propagation_other"] = max(0.0, other)
    return {"seconds": total, "stages": stages, "calls": prop.get("calls", {}), "report": report,
            "figures": figures, "peak_rss_mb": figures.get("RSS_Max")}


def runtime_choice(value: str) -> tuple[str, str]:
    """``RUNTIME:PRECISION`` (``ort:fp32``, ``openvino:int8``, ...) for ``--runtimes``."""
    import argparse

    from app.backends import PRECISIONS, RUNTIMES

    runtime, _, precision = value.partition(":")
    if runtime not in RUNTIMES or (precision or "fp32") not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"{value!r} is not RUNTIME:PRECISION with RUNTIME one of {', '.join(RUNTIMES)} "
                                         f"and PRECISION one of {', '.join(PRECISIONS)}")
    return runtime, precision or "fp32"


def _variants(args) -> list[tuple[str, PredictOptions]]:
    base = dict(batch=args.batch, device="cpu", threads=args.threads)
    runtimes = getattr(args, "runtimes", None) or [("ort", "fp32")]
    v = []
    for runtime, precision in runtimes:
        name = "full" if (runtime, precision) == ("ort", "fp32") else f"full {runtime} {precision}"
        v.append((name, PredictOptions(mode=args.mode, runtime=runtime, precision=precision, **base)))
    if not getattr(args, "no_dense", False):  # on the first runtime given
        runtime, precision = runtimes[0]
        v.append(("dense", PredictOptions(mode="dense", runtime=runtime, precision=precision, **base)))
    if args.torch:
        v.append(("full-torch", PredictOptions(mode=args.mode, backend="torch", **base)))
        v.append(("dense-torch", PredictOptions(mode="dense", backend="torch", **base)))
    return v


def _ablation() -> list[tuple[str, dict]]:
    """The published propagation, then each cost switch turned on in turn."""
    pub = dict(PUBLISHED)
    return [
        ("published", pub),
        ("+skip absent organs", {**pub, "skip_absent": True}),
        ("+stop vanished organs", {**pub, "skip_absent": True, "early_stop": True}),
        ("+organ windows", {"batch_organs": False}),
        ("+organ windows, organs batched per call", {"batch_organs": True}),
    ]


def benchmark(bundle: Bundle, sizes, out_dir: Path, args) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    hw = args.in_plane
    results = {"bundle": str(bundle.path), "sources": bundle.manifest.get("sources", {}),
               "input_size": bundle.input_size, "in_plane": hw, "sizes": list(sizes), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        predictors = {name: Predictor(bundle, opt) for name, opt in _variants(args)}
        if getattr(args, "warmup", False):  # first calls at each batch shape: allocation, kernel choice
            warm = np.full((2 * args.batch + 4, 64, 64), -1000.0, np.float32)
            for pred in predictors.values():
                pred.predict_volume(warm)
        for n in sizes:
            case = _phantom(n, hw, args.seed)
            img, _ = case.images()
            path = tmp / f"Bench_{n:04d}_0000.nii.gz"
            import SimpleITK as sitk

            sitk.WriteImage(img, str(path), useCompression=True)
            del case
            for name, pred in predictors.items():
                r = run_once(pred, path, tmp)
                r.update(variant=name, num_slices=n, gmac=cost_model(bundle, r["report"], n))
                r["report"] = {k: r["report"][k] for k in ("sampled", "references") if k in r["report"]}
                results["runs"].append(r)
                log.info("N=%d %-12s %7.1f s", n, name, r["seconds"])
            if args.ablation and n == sizes[0]:
                for label, overrides in _ablation():
                    pred = Predictor(bundle, PredictOptions(mode="largest", batch=args.batch, device="cpu",
                                                            threads=args.threads, propagation=overrides))
                    r = run_once(pred, path, tmp)
                    r.update(variant=f"ablation: {label}", num_slices=n, gmac=cost_model(bundle, r["report"], n))
                    r["report"] = {}
                    results["runs"].append(r)
                    log.info("N=%d %-28s %7.1f s", n, label, r["seconds"])
            path.unlink()
    results["fits"] = fits(results["runs"])
    (out_dir / "benchmark.json").write_text(json.dumps(results, indent=1, default=float))
    md = markdown(results)
    (out_dir / "benchmark.md").write_text(md)
    return results


def fits(runs: list[dict]) -> dict:
    out = {}
    for variant in sorted({r["variant"] for r in runs if not r["variant"].startswith("ablation")}):
        rs = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["num_slices"])
        n = np.array([r["num_slices"] for r in rs], float)
        t = np.array([r["seconds"] for r in rs], float)
        slope, icpt = (np.polyfit(n, t, 1) if len(n) > 1 else (t[0] / n[0], 0.0))
        out[variant] = {"seconds_per_slice": float(slope), "intercept_s": float(icpt),
                        "peak_rss_mb": {int(r["num_slices"]): r["peak_rss_mb"] for r in rs}}
    return out


def markdown(res: dict) -> str:
    lines = ["# flare22 benchmark\n", f"bundle `{res['bundle']}`, model input {res['input_size']}, "
             f"phantoms {res['in_plane']} x {res['in_plane']} x N\n"]
    src = res.get("sources", {})
    if any(v.get("random_weights") for v in src.values()):
        lines.append("**Random weights**: propagation extents are not those of a trained network.\n")
    lines.append("| N | variant | seconds | slices/s | full/dense | GMAC | GMAC/s | peak RSS MB | CPU AUC |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    dense = {r["num_slices"]: r["seconds"] for r in res["runs"] if r["variant"] == "dense"}
    for r in res["runs"]:
        g = sum(r["gmac"].values())
        ratio = r["seconds"] / dense[r["num_slices"]] if r["num_slices"] in dense else float("nan")
        lines.append(f"| {r['num_slices']} | {r['variant']} | {r['seconds']:.2f} | {r['num_slices'] / r['seconds']:.1f} | "
                     f"{ratio:.2f} | {g:.1f} | {g / r['seconds']:.1f} | {r['peak_rss_mb'] or 0:.0f} | "
                     f"{r['figures'].get('AUC_CPU_Time', 0):.0f} |")
    lines.append("\n## Stages of the full pipeline\n")
    lines.append("| N | variant | stage | seconds | share | calls | GMAC | GMAC/s |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in res["runs"]:
        if not r["variant"].startswith("full"):
            continue
        for s, sec in r["stages"].items():
            g = r["gmac"].get(s)
            lines.append(f"| {r['num_slices']} | {r['variant']} | {s} | {sec:.3f} | {100 * sec / r['seconds']:.1f}% | "
                         f"{r['calls'].get(s, '')} | {'' if g is None else f'{g:.1f}'} | "
                         f"{'' if not g or not sec else f'{g / sec:.1f}'} |")
    lines.append("\n## Growth with N\n")
    lines.append("| variant | seconds per slice (fit) | intercept s | peak RSS MB by N |")
    lines.append("|---|---|---|---|")
    for v, f in res["fits"].items():
        mem = ", ".join(f"{k}: {v2:.0f}" for k, v2 in f["peak_rss_mb"].items() if v2)
        lines.append(f"| {v} | {f['seconds_per_slice']:.3f} | {f['intercept_s']:.2f} | {mem} |")
    return "\n".join(lines) + "\n"


# (folder, config name) -> a random-weight bundle exported there. Exporting needs torch and
# the export package, which evaluation/ does not import: the `flare22` command injects it.
RANDOM_BUNDLE = None


def add_arguments(p) -> None:
    p.add_argument("--bundle", help="model bundle; or --config to export random weights on the spot")
    p.add_argument("--config", choices=("tiny", "paper"), help="random-weight bundle of this configuration")
    p.add_argument("--sizes", type=positive_int, nargs="+", default=[100, 200, 400], help="slice counts N")
    p.add_argument("--in-plane", type=positive_int, default=512, help="phantom in-plane size")
    p.add_argument("--out", default="bench/out/benchmark", help="folder for benchmark.md / benchmark.json")
    p.add_argument("--threads", type=positive_int, help="ONNX Runtime intra-op threads")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--mode", choices=MODES, default="largest",
                   help="the mode of the \"full\" variant (default: largest, the STCN pipeline whose stages and "
                        "cost switches this benchmark breaks down); bench/mode_table.py compares every mode")
    p.add_argument("--runtimes", nargs="+", type=runtime_choice, metavar="RUNTIME:PRECISION",
                   help="the full pipeline once per runtime and precision, in one run (default ort:fp32); "
                        "e.g. ort:fp32 openvino:int8")
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline (else run on the first --runtimes)")
    p.add_argument("--warmup", action="store_true", help="run every variant once on a small blank volume first")
    p.add_argument("--torch", action="store_true", help="also run the torch (eager) backend")
    p.add_argument("--ablation", action="store_true", help="published propagation and each cost switch (smallest N)")
    p.add_argument("--seed", type=nonneg_int, default=7)
    p.add_argument("--quick", action="store_true", help="CI: tiny random bundle, small phantoms, under a minute")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.config = args.config or "tiny"
            args.sizes, args.in_plane = [16, 32], 128
        if args.bundle:
            bundle = load_bundle(args.bundle)
        elif args.config:
            if RANDOM_BUNDLE is None:
                print("flare22 benchmark: --config needs the development install's `flare22` command "
                      "(it exports the random bundle); give --bundle", file=sys.stderr)
                return 2
            bundle = load_bundle(RANDOM_BUNDLE(Path(tmp) / "bundle", args.config))
        else:
            print("flare22 benchmark: give --bundle or --config", file=sys.stderr)
            return 2
        res = benchmark(bundle, sorted(args.sizes), Path(args.out), args)
    print(markdown(res))
    print(f"wrote {Path(args.out) / 'benchmark.md'} and benchmark.json")
    return 0

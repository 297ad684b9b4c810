"""ONNX Runtime (CPU) against torch eager, per exported graph, for random-weight bundles.

For each config (`tiny` at 128 x 128, `paper` at 512 x 512): export a bundle with random
weights (`export_bundle(..., programs=False)`, parity check included), rebuild the torch
modules from the bundle's own weights, and time every graph both ways on the same inputs in
the same process: ONNX Runtime with the appliance's session settings, torch in eval mode
under ``inference_mode``, both limited to ``--threads`` threads. Each figure is the median
of ``--repeats`` calls after one warm-up call (wall time, and the process's CPU time, which
is the steadier figure on a shared machine). Input sizes are the appliance's: one slice
(batch 1) for the reference pair and the key encoder, full-frame grids for the other
stages and ``--organs`` objects. The graphs and their inputs come from ``export.graphs.GRAPHS``.

``--graphs`` restricts the run to some graphs: only those are exported (no parity check,
bundle sizes then cover only those files), which makes a quick check of the `paper` path
affordable on a busy machine.

    .venv/bin/python bench/export_timing.py --out bench/out/export_timing.json
        [--configs tiny paper] [--graphs reference stcn_key ...] [--threads 4]
        [--repeats 5] [--organs 1] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.argtypes import positive_int  # noqa: E402
import export.bundle as xb  # noqa: E402
from app.bundle import load_bundle  # noqa: E402
from bench.stage_costs import time_call  # noqa: E402
from export.graphs import GRAPHS, Case, Dims, modules, stcn_channels  # noqa: E402
from training.torch_backend import rebuild_networks  # noqa: E402
from training.models.reference import REFERENCE_CONFIGS, build_reference_pair  # noqa: E402
from training.models.stcn import build_stcn  # noqa: E402

def prepare(config: str, graphs: list[str], work: Path, seed: int):
    """(folder of ONNX files, graph name -> torch module, table dims, sizes, export seconds)."""
    out = work / config
    t0 = time.perf_counter()
    if list(graphs) == list(GRAPHS):  # the real export, parity check and all
        xb.export_bundle(out, ref_config=config, stcn_config=config, seed=seed, programs=False, quiet=True)
        a, b, net = rebuild_networks(load_bundle(out))
        mods = modules(a, b, net)
        sizes = {**xb.bundle_size(out), "partial": False}
    else:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        torch.manual_seed(seed)
        a, b = build_reference_pair(config)
        net = build_stcn(config)
        mods = modules(a.eval(), b.eval(), net.eval(), names=graphs)
    dims = Dims((REFERENCE_CONFIGS[config].image_size,) * 2, stcn_channels(net.cfg))
    if list(graphs) != list(GRAPHS):
        rng = np.random.default_rng(seed)
        for g, m in mods.items():
            graph = GRAPHS[g]
            xb.export_onnx(graph, m, graph.sample(dims, rng, graph.example), dims, out / f"{g}.onnx")
        onnx_mb = sum((out / f"{g}.onnx").stat().st_size for g in mods) / 2**20
        sizes = {"onnx_mb": onnx_mb, "total_mb": onnx_mb, "partial": True}
    return out, mods, dims, sizes, time.perf_counter() - t0


def measure(config: str, graphs: list[str], work: Path, *, threads: int, repeats: int, organs: int,
            batch: int, seed: int = 0) -> dict:
    folder, mods, dims, sizes, export_s = prepare(config, graphs, work, seed)
    rng = np.random.default_rng(seed + 1)
    full_frame = Case(b=batch, o=organs, cells=dims.cells)  # the appliance's sizes: whole slices
    rows = []
    for name in graphs:
        module = mods[name]
        xs = GRAPHS[name].sample(dims, rng, full_frame)
        sess = ort_session(folder / f"{name}.onnx", threads)
        feed = {i.name: x for i, x in zip(sess.get_inputs(), xs)}
        ts = [torch.from_numpy(x) for x in xs]

        def run_torch():
            with torch.inference_mode():
                return module(*ts)

        ort_wall, _, ort_cpu = time_call(lambda: sess.run(None, feed), repeats)
        torch_wall, _, torch_cpu = time_call(run_torch, repeats)
        want = run_torch()
        want = [want] if isinstance(want, torch.Tensor) else list(want)
        diff = max(float(np.abs(w.numpy() - o).max()) for w, o in zip(want, sess.run(None, feed)))
        shapes = {i.name: list(x.shape) for i, x in zip(sess.get_inputs(), xs)}
        rows.append({"config": config, "graph": name, "inputs": shapes,
                     "ort_ms": 1000 * ort_wall, "torch_ms": 1000 * torch_wall,
                     "ort_cpu_ms": 1000 * ort_cpu, "torch_cpu_ms": 1000 * torch_cpu,
                     "torch_over_ort": torch_wall / ort_wall, "max_abs_diff": diff})
        del sess
    return {"config": config, "input_size": list(dims.hw), "export_s": export_s, "sizes": sizes, "rows": rows}


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"ONNX Runtime {meta['onnxruntime']} (CPU) vs torch {meta['torch']} eager, {meta['threads']} threads, "
             f"median of {meta['repeats']} calls after a warm-up; load average {meta['load_before']} -> "
             f"{meta['load_after']} on {meta['cpus']} CPUs.", "",
             "| config | graph | inputs | ORT ms | torch ms | torch / ORT | ORT cpu ms | torch cpu ms | max abs diff |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        for r in res["rows"]:
            shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in r["inputs"].items())
            lines.append(f"| {r['config']} | {r['graph']} | {shapes} | {r['ort_ms']:.1f} | {r['torch_ms']:.1f} | "
                         f"{r['torch_over_ort']:.2f} | {r['ort_cpu_ms']:.1f} | {r['torch_cpu_ms']:.1f} | "
                         f"{r['max_abs_diff']:.1e} |")
    lines += ["", "| config | input | ONNX MB | all files MB | export s |", "|---|---|---:|---:|---:|"]
    for res in results:
        s = res["sizes"]
        part = " (exported graphs only)" if s["partial"] else ""
        lines.append(f"| {res['config']} | {res['input_size'][0]}x{res['input_size'][1]} | {s['onnx_mb']:.1f}{part} | "
                     f"{s['total_mb']:.1f}{part} | {res['export_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--configs", nargs="+", default=["tiny", "paper"], choices=sorted(REFERENCE_CONFIGS))
    p.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=GRAPHS)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="threads for both (default: all CPUs)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed calls per figure (median)")
    p.add_argument("--batch", type=positive_int, default=1, help="slices per reference / key-encoder call")
    p.add_argument("--organs", type=positive_int, default=1, help="objects per value-encoder / decoder call")
    p.add_argument("--work", type=Path, help="folder for the exported bundles (default: a temporary one)")
    args = p.parse_args(argv)
    graphs = [g for g in GRAPHS if g in args.graphs]
    import onnxruntime

    torch.set_num_threads(args.threads)
    meta = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": args.threads,
            "repeats": args.repeats, "batch": args.batch, "organs": args.organs,
            "cpus": os.cpu_count(), "machine": platform.platform(),
            "processor": platform.processor(), "load_before": [round(v, 2) for v in os.getloadavg()]}
    tmp = None
    work = args.work
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="flare22-export-timing-")
        work = Path(tmp.name)
    try:
        results = [measure(c, graphs, work, threads=args.threads, repeats=args.repeats, organs=args.organs,
                           batch=args.batch) for c in args.configs]
    finally:
        if tmp is not None:
            tmp.cleanup()
    meta["load_after"] = [round(v, 2) for v in os.getloadavg()]
    print(markdown(results, meta))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

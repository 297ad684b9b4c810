"""I/O binding and the memory read, measured on one device in one process: the appliance's
ONNX Runtime path with features bound to the device (``io_binding`` on) or making a host
round trip per graph (off), crossed with the ``stcn_read`` graph or the numpy memory read.
The four variants run interleaved on the same volumes (order rotated per case), after one
warm-up each, so their ratios do not depend on the machine's load; labels of bound and
unbound runs must be identical (checked), those of the two reads are compared.

    python bench/io_binding.py --bundle B --device cpu --threads 1          # a bundle
    python bench/io_binding.py --random tiny --device cpu --slices 24       # a random-weight export (needs torch)
    bash bench/gpu.sh                                                       # on a GPU machine: --device cuda

Writes ``OUT/io_binding.json`` (per case and variant: best and median seconds, the memory
read's seconds, providers that really ran, peak GPU memory from NVML on CUDA) and prints a
table. Cases: ``--cases DIR`` (``*_0000.nii.gz`` files; the real CTs), else one phantom of
``--slices`` x ``--in-plane``^2.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from app.argtypes import positive_int  # noqa: E402
from app.backends import load_backends  # noqa: E402
from app.bundle import load_bundle  # noqa: E402
from app.predict import PredictOptions, Predictor  # noqa: E402

VARIANTS = {  # name -> (io_binding, memory_read)
    "unbound, numpy read": ("off", "numpy"),
    "unbound, graph read": ("off", "graph"),
    "bound, numpy read": ("on", "numpy"),
    "bound, graph read": ("on", "graph"),
}
BASE = "unbound, numpy read"
SHORT = {"unbound-numpy": "unbound, numpy read", "unbound-graph": "unbound, graph read",
         "bound-numpy": "bound, numpy read", "bound-graph": "bound, graph read"}


def cases(args):
    """(name, canonical volume) of every case."""
    if args.cases:
        from app.ctio import read_ct

        files = sorted(Path(args.cases).glob("**/*_0000.nii.gz"))
        if not files:
            raise SystemExit(f"io_binding: no *_0000.nii.gz under {args.cases}")
        for f in files:
            yield f.name[: -len("_0000.nii.gz")], read_ct(f)[0]
    else:
        from evaluation.phantom import generate

        yield f"phantom {args.slices}x{args.in_plane}x{args.in_plane}", generate(7, (args.slices, args.in_plane, args.in_plane)).image


def random_bundle(config: str, out: Path) -> Path:
    from export.bundle import export_bundle

    return export_bundle(out / f"random-{config}", ref_config=config, stcn_config=config, seed=0, quiet=True)


def measure(args, bundle_path: Path) -> dict:
    bundle = load_bundle(bundle_path)
    probe = None
    if args.device == "cuda":
        from evaluation.efficiency import GpuProbe

        probe = GpuProbe.open(0)
    preds, infos, stcns = {}, {}, {}
    names = [SHORT[v] for v in args.variants]
    for name in names:
        binding, read = VARIANTS[name]
        backends = load_backends(bundle, device=args.device, threads=args.threads, io_binding=binding, memory_read=read)
        infos[name], stcns[name] = backends[2], backends[1]
        preds[name] = Predictor(bundle, PredictOptions(mode=args.mode, device=args.device, threads=args.threads,
                                                       batch=args.batch), backends=backends)
    res = {"device": args.device, "mode": args.mode, "threads": args.threads, "repeats": args.repeats,
           "bundle": str(bundle_path), "input_size": list(bundle.input_size),
           "providers": {k: v["providers"] for k, v in infos.items()},
           "io_binding": {k: v["io_binding"] for k, v in infos.items()},
           "memory_read": {k: v["memory_read"] for k, v in infos.items()}, "cases": []}
    for i, (case, volume) in enumerate(cases(args)):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:  # warm-up: sessions, arenas, kernels
            preds[name].predict_volume(volume[: min(len(volume), 8)])
        runs = {name: [] for name in names}
        labels, reads, gpu, helpers = {}, {name: [] for name in names}, {}, {}
        for _ in range(args.repeats):
            for name in order:
                ctx = stcns[name].ctx
                calls0 = ctx.helper_calls if ctx is not None else 0
                mon = None
                if probe is not None:
                    from evaluation.efficiency import ResourceMonitor

                    mon = ResourceMonitor(gpu=probe, interval_s=0.05)
                    mon.__enter__()
                t0 = time.perf_counter()
                try:
                    labels[name], report = preds[name].predict_volume(volume)
                finally:
                    secs = time.perf_counter() - t0
                    if mon is not None:
                        mon.__exit__(None, None, None)
                if mon is not None:
                    gpu[name] = max(gpu.get(name, 0), mon.figures(secs).to_dict().get("GPU_Mem") or 0)
                helpers[name] = (ctx.helper_calls - calls0) if ctx is not None else 0
                runs[name].append(secs)
                reads[name].append(report.get("propagation", {}).get("seconds", {}).get("read_memory", 0.0))
        row = {"case": case, "shape": list(volume.shape), "variants": {}}
        base = BASE if BASE in names else None
        for name in names:
            row["variants"][name] = {"best_s": min(runs[name]), "median_s": statistics.median(runs[name]),
                                     "read_memory_median_s": statistics.median(reads[name]),
                                     "helper_calls": helpers[name],
                                     "over_base": statistics.median(runs[name]) / statistics.median(runs[base]) if base else None}
            if gpu:
                row["variants"][name]["gpu_mem_mb"] = gpu.get(name)
        row["bound_equals_unbound"] = {read: bool(np.array_equal(labels[f"bound, {read} read"], labels[f"unbound, {read} read"]))
                                       for read in ("numpy", "graph")
                                       if f"bound, {read} read" in labels and f"unbound, {read} read" in labels}
        if "unbound, graph read" in labels and BASE in labels:
            row["graph_vs_numpy_read_label_agreement"] = float((labels["unbound, graph read"] == labels[BASE]).mean())
        res["cases"].append(row)
        print(f"{case}: " + ", ".join(f"{n} {row['variants'][n]['median_s']:.3f} s" for n in names), flush=True)
    return res


def table(res: dict) -> str:
    names = list(res["cases"][0]["variants"]) if res["cases"] else []
    lines = [f"device {res['device']} ({', '.join(next(iter(res['providers'].values())))}), mode {res['mode']}, "
             f"threads {res['threads']}, median of {res['repeats']}; ratios to '{BASE}' in the same run; "
             "GPU memory: NVML, the whole process so far (sessions of earlier variants included)", "",
             "| case | " + " | ".join(names) + " | bound = unbound | graph/numpy labels |",
             "|---|" + "---:|" * len(names) + "---|---:|"]
    for row in res["cases"]:
        v = row["variants"]
        cells = [f"{v[n]['median_s']:.3f} s (" + (f"{v[n]['over_base']:.2f}x; " if v[n]["over_base"] else "")
                 + f"read {v[n]['read_memory_median_s']:.3f} s; {v[n]['helper_calls']} helper calls"
                 + (f"; {v[n]['gpu_mem_mb']} MB" if "gpu_mem_mb" in v[n] else "") + ")" for n in names]
        same = all(row["bound_equals_unbound"].values())
        agree = row.get("graph_vs_numpy_read_label_agreement")
        lines.append(f"| {row['case']} {'x'.join(map(str, row['shape']))} | " + " | ".join(cells)
                     + f" | {'yes' if same else 'NO'} | {'-' if agree is None else f'{agree:.4f}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path)
    src.add_argument("--random", choices=("tiny", "paper"), help="export a random-weight bundle first (needs torch)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--mode", default="published", help="an STCN mode (published: full frames, every organ)")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--cases", type=Path, help="folder of *_0000.nii.gz CTs (default: one phantom)")
    p.add_argument("--slices", type=positive_int, default=60)
    p.add_argument("--in-plane", type=positive_int, default=256)
    p.add_argument("--variants", nargs="+", choices=list(SHORT), default=list(SHORT),
                   help="which of the four to run (one alone: its GPU memory is not mixed with the others')")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or random_bundle(args.random, Path(tmp))
        res = measure(args, bundle)
    (args.out / "io_binding.json").write_text(json.dumps(res, indent=1))
    text = table(res)
    (args.out / "io_binding.md").write_text(text + "\n")
    print(text)
    return 0 if all(all(r["bound_equals_unbound"].values()) for r in res["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())

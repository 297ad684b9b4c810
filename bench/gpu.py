"""GPU measurement: paper-size networks (random weights) on the torch backend, fp16 or
bf16, one 512 x 512 x 200 phantom: time per case (process start excluded, model load
and one warm-up case excluded too, both reported), per stage, and peak GPU memory from
NVML (device-wide, as the organisers measure) and from torch's allocator. The dense
baseline (the CPS pair on every slice) runs in the same process for the ratio.

    bash bench/gpu.sh                 # on a lent GPU machine: writes $OUT/gpu.json, gpu.md
    python bench/gpu.py --device cpu --slices 12 --in-plane 128 --config tiny   # CPU check

Needs torch, timm, segmentation-models-pytorch, numpy, scipy, psutil, nvidia-ml-py. SimpleITK
is not needed (no files are read or written); a stand-in module is used where it is absent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.argtypes import positive_int  # noqa: E402
try:
    import SimpleITK  # noqa: F401
except ImportError:  # the GPU image lacks it; nothing here touches files
    sys.modules["SimpleITK"] = types.ModuleType("SimpleITK")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from app.bundle import Bundle  # noqa: E402
from evaluation.efficiency import GpuProbe, ResourceMonitor  # noqa: E402
from evaluation.phantom import generate  # noqa: E402
from app.predict import PredictOptions, Predictor  # noqa: E402
from export.bundle import base_manifest  # noqa: E402
from training.models.reference import ReferencePair, build_reference_pair  # noqa: E402
from training.models.stcn import build_stcn  # noqa: E402
from training.torch_backend import TorchReference, TorchStcnBackend  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--config", default="paper", choices=("paper", "tiny"))
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--slices", type=positive_int, default=200)
    p.add_argument("--in-plane", type=positive_int, default=512)
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out/gpu"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[args.dtype]
    torch.backends.cudnn.benchmark = False

    t0 = time.perf_counter()
    a, b = build_reference_pair(args.config)
    net = build_stcn(args.config)
    a, b, net = a.to(dev).eval(), b.to(dev).eval(), net.to(dev).eval()
    sync(dev)
    load_s = time.perf_counter() - t0
    size = 512 if args.config == "paper" else 128
    bundle = Bundle(Path("<in-memory>"), base_manifest((size, size)))
    backends = (TorchReference(ReferencePair(a, b).eval(), dev, dtype), TorchStcnBackend(net, dev, dtype),
                {"backend": "torch", "device": str(dev), "dtype": args.dtype, "providers": [f"torch-{dev.type}"]})
    case = generate(7, (args.slices, args.in_plane, args.in_plane))
    volume = case.image
    probe = GpuProbe.open(0) if dev.type == "cuda" else None
    res = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "config": args.config,
           "dtype": args.dtype, "shape": list(volume.shape), "model_load_s": load_s, "torch": torch.__version__,
           "note": "random weights: the propagation's extent is not that of a trained network"}
    for mode in ("propagate", "dense"):
        pred = Predictor(bundle, PredictOptions(mode=mode, batch=args.batch), backends=backends)
        t = time.perf_counter()
        pred.predict_volume(volume[: max(8, args.slices // 10)])  # warm-up on a short volume
        sync(dev)
        warm = time.perf_counter() - t
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        mon = ResourceMonitor(gpu=probe, interval_s=0.1)
        with mon:
            t = time.perf_counter()
            labels, report = pred.predict_volume(volume)
            sync(dev)
            secs = time.perf_counter() - t
        figs = mon.figures(secs).to_dict()
        res[mode] = {"seconds": secs, "warmup_s": warm, "timings": report["timings"],
                     "propagation": report.get("propagation", {}), "figures": figs,
                     "torch_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
                     "torch_max_reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if dev.type == "cuda" else None,
                     "labels_present": sorted(int(x) for x in np.unique(labels))}
        print(f"{mode}: {secs:.2f} s  (warm-up {warm:.2f} s)  GPU_Mem {figs.get('GPU_Mem')} MB", flush=True)
    res["full_over_dense"] = res["propagate"]["seconds"] / res["dense"]["seconds"]
    (out / "gpu.json").write_text(json.dumps(res, indent=1, default=str))
    lines = [f"# GPU run: {res['device']}, {args.config}, {args.dtype}, {volume.shape}", "",
             "| mode | seconds | GPU_Mem MB (NVML) | torch max allocated MB |", "|---|---|---|---|"]
    for mode in ("propagate", "dense"):
        r = res[mode]
        lines.append(f"| {mode} | {r['seconds']:.2f} | {r['figures'].get('GPU_Mem')} | {r['torch_max_allocated_mb']} |")
    lines += ["", f"full / dense = {res['full_over_dense']:.2f}", "", "stages (propagate): " +
              json.dumps({k: round(v, 3) for k, v in res["propagate"]["timings"].items()})]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

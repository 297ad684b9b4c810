"""CPU runtimes on a bundle's graphs, in one run: time per call, load time and parity.

    python bench/runtimes.py --bundle BUNDLE [--graphs reference stcn_key ...] [--threads 2]
        [--batch 8] [--repeats 5] [--parity DIR ...] [--variants ...] [--json out.json]

Variants (``--variants``; those whose runtime or graphs are missing are skipped, and said so):

=================  =====================================================================
ort                the appliance's ONNX Runtime CPU session (ORT_ENABLE_ALL, intra-op
                   threads = --threads, inter-op 1, arena and memory pattern on); the
                   reference every other variant is compared with
ort-basic          the same at graph optimisation level BASIC (what ENABLE_ALL buys)
ort-nospin         intra-op threads do not spin-wait between kernels
ort-noarena        CPU memory arena and memory pattern off
openvino           OpenVINO's CPU plugin on the fp32 ONNX graph (latency hint, f32)
openvino-bf16      the same with bf16 inference precision (AVX-512 BF16 here)
ort-int8           ONNX Runtime on the bundle's int8 graph (``flare22 quantize``)
openvino-int8      OpenVINO on the same int8 (QDQ) graph
ovep               ONNX Runtime with the OpenVINO execution provider (``onnxruntime-openvino``
                   or the ``onnxruntime-ep-openvino`` plugin), where one is installed
=================  =====================================================================

Inputs: each graph's symbolic axes from the manifest, with B = --batch slices, O = 3 organs
and the feature grids of a full frame; the reference pair and the key encoder take real CT
slices from ``--parity`` folders (windowed and resized as the appliance does; random
otherwise). Time: every variant once per round, ``--repeats`` rounds after one warm-up
round, so the ratios between variants hold on a loaded machine; median and fastest call,
per unit (slice for the image graphs). Parity against ``ort``: max |difference| over every
output and, for the reference pair, argmax agreement of the summed probabilities over
every parity slice.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.argtypes import existing_dir, positive_int  # noqa: E402
from app.backends import OvGraph, RuntimeMissing, graph_file, ort_session_options  # noqa: E402
from app.bundle import Bundle, load_bundle  # noqa: E402
from export.quantize import calibration_slices  # noqa: E402

ORT_SETTINGS = {"ort": {}, "ort-basic": {"optimization": "basic"}, "ort-nospin": {"spinning": False},
                "ort-noarena": {"cpu_arena": False, "mem_pattern": False}}
VARIANTS = (*ORT_SETTINGS, "openvino", "openvino-bf16", "ort-int8", "openvino-int8", "ovep")
IMAGE_GRAPHS = ("reference", "stcn_key")


class Skip(Exception):
    pass


class _OrtCall:
    def __init__(self, path: Path, outputs: list[str], so, providers):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.outputs = outputs

    def __call__(self, feed: dict) -> list[np.ndarray]:
        return self.session.run(self.outputs, feed)


class _OvCall:
    def __init__(self, graph: OvGraph):
        self.graph = graph

    def __call__(self, feed: dict) -> list[np.ndarray]:
        return self.graph(*[feed[n] for n in self.graph.inputs])


def ovep_providers(threads: int):
    """(providers, session option hook) for ONNX Runtime's OpenVINO EP: the classic provider
    of ``onnxruntime-openvino`` or the plugin of ``onnxruntime-ep-openvino``; Skip when neither."""
    import onnxruntime as ort

    if "OpenVINOExecutionProvider" in ort.get_available_providers():
        opts = {"device_type": "CPU", "precision": "FP32", "num_of_threads": str(threads)}
        return [("OpenVINOExecutionProvider", opts), "CPUExecutionProvider"], None
    try:
        import onnxruntime_ep_openvino as plugin
    except ImportError:
        raise Skip("no OpenVINO execution provider installed beside this ONNX Runtime") from None
    if "ovep" not in _registered:
        ort.register_execution_provider_library("openvino_ep", plugin.get_library_path())
        _registered.add("ovep")
    devices = [d for d in ort.get_ep_devices() if d.ep_name == plugin.get_ep_name()
               and d.ep_metadata.get("ov_device") == "CPU"]
    if not devices:
        raise Skip("the OpenVINO EP plugin lists no CPU device")

    def hook(so):
        so.add_provider_for_devices([devices[0]], {"precision": "FP32", "num_of_threads": str(threads)})

    return None, hook


_registered: set = set()


def make_variant(variant: str, bundle: Bundle, name: str, threads: int):
    spec = bundle.graph(name)
    outputs = [o["name"] for o in spec["outputs"]]
    int8 = variant.endswith("-int8")
    if int8 and not spec.get("onnx_int8"):
        raise Skip("no int8 graph in the bundle")
    path = bundle.file(graph_file(bundle, name, "int8" if int8 else "fp32")[0])
    if variant in ORT_SETTINGS or variant == "ort-int8":
        return _OrtCall(path, outputs, ort_session_options(threads, **ORT_SETTINGS.get(variant, {})),
                        ["CPUExecutionProvider"])
    if variant == "ovep":
        providers, hook = ovep_providers(threads)
        so = ort_session_options(threads)
        if hook:
            hook(so)
            return _OrtCall(path, outputs, so, None)
        return _OrtCall(path, outputs, so, providers)
    try:
        if variant == "openvino-bf16":
            return _OvCall(OvGraph(bundle, name, threads, "bf16"))
        return _OvCall(OvGraph(bundle, name, threads, "int8" if int8 else "fp32"))
    except RuntimeMissing as exc:
        raise Skip(str(exc)) from None


def parity_slices(folders, bundle: Bundle, per_volume: int) -> tuple[np.ndarray, np.ndarray]:
    """The parity inputs: slices taken as ``flare22 quantize`` takes its calibration slices."""
    images, positions, _ = calibration_slices(folders, bundle, per_volume)
    return images, positions


def sample_feed(bundle: Bundle, name: str, batch: int, rng, images=None, positions=None) -> dict:
    """Inputs for one call: the manifest's shapes with B = batch, O = 3 and full-frame grids."""
    h, w = bundle.input_size
    sizes = {"B": batch, "O": 3, "Hc": h, "Wc": w, "hc": h // 16, "wc": w // 16, "h8": h // 8, "w8": w // 8,
             "h4": h // 4, "w4": w // 4}
    feed = {}
    for t in bundle.graph(name)["inputs"]:
        shape = [sizes[d] if isinstance(d, str) else d for d in t["shape"]]
        if t["name"] == "image" and images is not None and shape[0] <= len(images):
            feed["image"] = np.ascontiguousarray(images[: shape[0]])
        elif t["name"] == "position" and positions is not None and shape[0] <= len(positions):
            feed["position"] = np.ascontiguousarray(positions[: shape[0]])
        else:
            feed[t["name"]] = rng.random(shape, dtype=np.float32)
    return feed


def unit(name: str, batch: int) -> tuple[str, int]:
    return ("slice", batch) if name in IMAGE_GRAPHS else ("call", 1)


def run_graph(bundle: Bundle, name: str, variants, args, images, positions) -> list[dict]:
    rng = np.random.default_rng(0)
    feed = sample_feed(bundle, name, args.batch, rng, images, positions)
    calls, rows = {}, []
    for v in variants:
        t0 = time.perf_counter()
        try:
            calls[v] = make_variant(v, bundle, name, args.threads)
        except Skip as exc:
            print(f"  {name:<12} {v:<14} skipped: {exc}", flush=True)
            continue
        except Exception as exc:  # noqa: BLE001 - a runtime refusing a graph is a finding, not a crash
            print(f"  {name:<12} {v:<14} failed to load: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                  flush=True)
            continue
        rows.append({"graph": name, "variant": v, "load_s": time.perf_counter() - t0})
    times = {v: [] for v in calls}
    for rnd in range(args.repeats + 1):  # round 0: warm-up
        for v, call in calls.items():
            t0 = time.perf_counter()
            call(feed)
            if rnd:
                times[v].append(time.perf_counter() - t0)
    what, per = unit(name, args.batch)
    base = calls.get("ort")
    for row in rows:
        v = row["variant"]
        row.update(unit=what, median_ms=1000 * statistics.median(times[v]) / per, min_ms=1000 * min(times[v]) / per,
                   calls=len(times[v]))
        if base is None or v == "ort":
            continue
        worst, same, total = 0.0, 0, 0
        batches = [feed]
        if name in IMAGE_GRAPHS and images is not None:
            batches = [{**feed, "image": images[i : i + args.batch],
                        **({"position": positions[i : i + args.batch]} if "position" in feed else {})}
                       for i in range(0, len(images), args.batch)]
        for f in batches:
            a, b = base(f), calls[v](f)
            worst = max(worst, max(float(np.abs(x - y).max()) for x, y in zip(a, b)))
            if name == "reference":
                same += int((a[0].argmax(1) == b[0].argmax(1)).sum())
                total += a[0][:, 0].size
        row["max_abs_diff"] = worst
        row["parity_inputs"] = sum(len(f[next(iter(f))]) for f in batches)
        if total:
            row["argmax_agreement"] = same / total
    ort_ms = next((r["median_ms"] for r in rows if r["variant"] == "ort"), None)
    for row in rows:
        row["vs_ort"] = row["median_ms"] / ort_ms if ort_ms else None
        print(f"  {name:<12} {row['variant']:<14} {row['median_ms']:9.1f} ms/{row['unit']} (min {row['min_ms']:.1f})"
              f"  x{row['vs_ort'] or 0:.2f} of ort  load {row['load_s']:.1f} s"
              + (f"  max|diff| {row['max_abs_diff']:.2e}" if "max_abs_diff" in row else "")
              + (f"  argmax {100 * row['argmax_agreement']:.2f} %" if "argmax_agreement" in row else ""), flush=True)
    return rows


def versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("onnxruntime", "openvino", "onnxruntime_ep_openvino"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except ImportError:
            pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True, help="bundle (with int8 graphs for the int8 variants)")
    p.add_argument("--graphs", nargs="+", default=["reference", "stcn_key", "stcn_skip", "stcn_value", "stcn_decode"])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--threads", type=positive_int, default=2, help="intra-op threads of every runtime (default 2)")
    p.add_argument("--batch", type=positive_int, default=8, help="slices per call of the image graphs (default 8)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed rounds after a warm-up round")
    p.add_argument("--parity", nargs="*", type=existing_dir, default=[], help="CT folders for real input slices")
    p.add_argument("--parity-slices", type=positive_int, default=8, help="slices per CT for parity (default 8)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    bundle = load_bundle(args.bundle)
    images = positions = None
    if args.parity:
        images, positions = parity_slices(args.parity, bundle, args.parity_slices)
    load = os.getloadavg()[0]
    print(f"bundle {bundle.path} ({bundle.input_size[0]} x {bundle.input_size[1]}); {args.threads} threads; batch "
          f"{args.batch}; {args.repeats} rounds; {0 if images is None else len(images)} parity slices; "
          f"{versions()}; 1-min load {load:.2f} on {os.cpu_count()} cores", flush=True)
    rows = [r for g in args.graphs for r in run_graph(bundle, g, args.variants, args, images, positions)]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bundle": str(bundle.path), "versions": versions(), "threads": args.threads,
                                         "batch": args.batch, "repeats": args.repeats, "load_before": load,
                                         "load_after": os.getloadavg()[0], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

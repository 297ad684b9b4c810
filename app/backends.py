"""ONNX Runtime backends for the reference pair and the STCN stages.

Providers: ``cpu``, ``cuda`` (CUDA provider, CPU fallback), ``tensorrt`` (TensorRT, then
CUDA, then CPU) or ``auto`` (CUDA when the installed ONNX Runtime offers it and NVML sees a
GPU, else CPU).

CUDA: the image takes CUDA and cuDNN from PyPI wheels (``onnxruntime-gpu[cuda,cudnn]``), which
nothing puts on the library path, so :func:`preload_cuda` loads them
(``onnxruntime.preload_dlls()``) before the first session whenever a CUDA chain is asked for.
``get_available_providers()`` lists CUDA even where those libraries are missing, so it proves
nothing: the providers a session really runs (``session.get_providers()``) are logged, and a
CUDA request that ends on the CPU gives one warning per process and carries on there. The
CUDA arena grows by what is requested (``kSameAsRequested``, not doubling) up to a cap,
``FLARE22_GPU_MEM_MB`` (default 4096 MiB), since GPU memory is scored; convolution algorithms
are picked by heuristic, not by an exhaustive search per new crop shape.

Runtimes (``--runtime``): ``ort`` (ONNX Runtime, the providers above) or ``openvino``
(OpenVINO's CPU plugin reading the bundle's ONNX graphs directly; CPU only; an optional extra,
``pip install flare22[openvino]``). Precision (``--precision``): ``fp32``, ``int8`` (the graphs
``flare22 quantize`` adds to a bundle, ``onnx_int8`` in the manifest; graphs without one run
in fp32), ``auto`` (int8 wherever the bundle has it) or ``bf16`` (OpenVINO only: the fp32
graphs computed in bfloat16 on CPUs with AVX-512 BF16 or AMX). What ran, per graph, goes into every
case report (``backend.runtime``, ``backend.precision``, ``backend.providers``).

I/O binding (:mod:`app.binding`, ONNX Runtime only): where a GPU provider runs, the STCN
features stay on the device from graph to graph (key encoder -> skip convolutions -> decoder;
memory frames -> read), with ``io_binding="auto"``; ``on`` forces it on the CPU provider too,
which is how the tests check it against the unbound path.

Memory read: the bundle's ``stcn_read`` graph, or the numpy read of :mod:`app.propagation`,
per device as :data:`MEMORY_READ` says (docs/efficiency.md, "Memory read"); the graph has
``top_k`` baked in and runs when the memory holds at least that many entries, the numpy
read below that and for bundles exported without the graph.

The torch backend (for GPU measurements where ONNX Runtime's CUDA build is absent) lives in
``training/torch_backend.py`` and is registered from outside (``register_backend``): the appliance never imports it, so an image without
torch never needs it.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from .binding import ConcatCache, DeviceArray, DeviceContext
from .bundle import Bundle
from .errors import Flare22Error
from .propagation import read_memory

log = logging.getLogger("flare22")

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
RUNTIMES = ("ort", "openvino")
PRECISIONS = ("auto", "fp32", "int8", "bf16")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
DEFAULT_GPU_MEM_MB = 4096
# The memory read each device takes by default where the bundle has the ``stcn_read`` graph
# (docs/efficiency.md, "Memory read"). CPU: numpy, measured faster than the exported graph
# (1.7-3x on the read, 1.10-1.24x per case). CUDA: the graph, which keeps the memory on the
# device under I/O binding where the numpy read copies it to the host; bench/gpu.sh measures it.
MEMORY_READ = {"cpu": "numpy", "cuda": "graph"}
_state = {"preloaded": None, "warned": False}


def preload_cuda() -> bool:
    """Load CUDA and cuDNN from the nvidia-* wheels (``onnxruntime.preload_dlls``), once.

    True when it ran; False where this ONNX Runtime has no ``preload_dlls`` or it failed (the
    system's libraries, if any, are then what a CUDA session finds)."""
    if _state["preloaded"] is None:
        import onnxruntime as ort

        preload = getattr(ort, "preload_dlls", None)
        ok = False
        if preload is not None:
            try:
                preload()
                ok = True
            except Exception as exc:  # missing wheels: the CUDA session will tell
                log.info("onnxruntime.preload_dlls() failed: %s", exc)
        _state["preloaded"] = ok
    return bool(_state["preloaded"])


def gpu_mem_limit_bytes() -> int:
    """The CUDA arena's cap: ``FLARE22_GPU_MEM_MB`` MiB (default 4096)."""
    raw = os.environ.get("FLARE22_GPU_MEM_MB", "")
    try:
        mb = int(raw) if raw.strip() else DEFAULT_GPU_MEM_MB
    except ValueError:
        log.warning("FLARE22_GPU_MEM_MB=%r is not a whole number of MiB; using %d", raw, DEFAULT_GPU_MEM_MB)
        mb = DEFAULT_GPU_MEM_MB
    return max(1, mb) * 2**20


def session_providers(providers: list[str]) -> list:
    """Provider names -> what ``InferenceSession`` takes, with the CUDA options set."""
    cuda = {
        "arena_extend_strategy": "kSameAsRequested",
        "gpu_mem_limit": str(gpu_mem_limit_bytes()),
        "cudnn_conv_algo_search": "HEURISTIC",
        "do_copy_in_default_stream": "1",
    }
    return [(p, cuda) if p == "CUDAExecutionProvider" else p for p in providers]


def gpu_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return False


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available and gpu_present() else "cpu"
    chain = {
        "cpu": ["CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    }[device]
    return [p for p in chain if p in available] or ["CPUExecutionProvider"]


class RuntimeMissing(Flare22Error):
    """A runtime asked for that is not installed here (one line, exit 2)."""


def graph_file(bundle: Bundle, name: str, precision: str = "fp32", fp16: bool = False) -> tuple[str, str]:
    """(file, precision) of one graph: its int8 copy where ``precision`` is int8 or auto and
    the bundle has one, its fp16 copy where asked and present, else the fp32 graph."""
    spec = bundle.graph(name)
    if precision in ("int8", "auto") and spec.get("onnx_int8"):
        return spec["onnx_int8"], "int8"
    if fp16 and spec.get("onnx_fp16"):
        return spec["onnx_fp16"], "fp16"
    return spec["onnx"], "fp32"


def ort_session_options(threads: int | None = None, *, optimization: str = "all", mem_pattern: bool = True,
                        cpu_arena: bool = True, spinning: bool = True):
    """ONNX Runtime session options: graph optimisation level (``all``, ``extended``, ``basic``,
    ``none``), intra-op threads (inter-op 1), memory pattern, CPU arena and thread spinning;
    the defaults are the appliance's (bench/runtimes.py measures each setting)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.enable_mem_pattern = mem_pattern
    so.enable_cpu_mem_arena = cpu_arena
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class OrtGraph:
    """One exported graph in one ONNX Runtime session, called with named numpy arrays."""

    runtime = "ort"

    def __init__(self, bundle: Bundle, name: str, providers: list[str], threads: int | None = None, fp16: bool = False,
                 precision: str = "fp32", ctx: DeviceContext | None = None):
        import onnxruntime as ort

        spec = bundle.graph(name)
        rel, self.precision = graph_file(bundle, name, precision, fp16)
        so = ort_session_options(threads)
        self.name = name
        if any(p in GPU_PROVIDERS for p in providers):
            preload_cuda()
        self.session = ort.InferenceSession(str(bundle.file(rel)), so, providers=session_providers(providers))
        self.inputs = [i["name"] for i in spec["inputs"]]
        self.outputs = [o["name"] for o in spec["outputs"]]
        self.dtype = np.float16 if self.precision == "fp16" else np.float32
        self.ctx = ctx

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, *arrays) -> list:
        """Named inputs -> outputs: float32 host arrays, or with a device context (I/O
        binding) DeviceArrays left on the device, in the graph's own precision."""
        if self.ctx is None:
            feed = {n: np.ascontiguousarray(a, dtype=self.dtype) for n, a in zip(self.inputs, arrays)}
            outs = self.session.run(self.outputs, feed)
            return [o.astype(np.float32, copy=False) for o in outs]
        feed = {n: a if isinstance(a, DeviceArray) else np.ascontiguousarray(a, dtype=self.dtype)
                for n, a in zip(self.inputs, arrays)}
        return self.ctx.run(self.session, feed, self.outputs)


def openvino_core():
    """OpenVINO's ``Core``, one per process; RuntimeMissing where openvino is not installed."""
    if "core" not in _state:
        try:
            import openvino
        except ImportError:
            raise RuntimeMissing("runtime openvino is not installed here: pip install 'flare22[openvino]' "
                                 "(or openvino), or use --runtime ort") from None
        _state["core"] = openvino.Core()
    return _state["core"]


def openvino_config(threads: int | None = None, hint: str = "LATENCY", inference_precision: str = "f32") -> dict:
    """The CPU plugin's settings: latency hint (one stream, all threads on one request), fp32
    arithmetic for the graphs' fp32 parts (int8 graphs run their quantised parts in int8)."""
    cfg = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": inference_precision}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg


class OvGraph:
    """One exported graph compiled by OpenVINO for the CPU, called like :class:`OrtGraph`."""

    runtime = "openvino"

    def __init__(self, bundle: Bundle, name: str, threads: int | None = None, precision: str = "fp32", **config):
        core = openvino_core()
        spec = bundle.graph(name)
        rel, self.precision = graph_file(bundle, name, precision)
        if precision == "bf16":
            config.setdefault("inference_precision", "bf16")
            self.precision = "bf16"
        self.name = name
        self.compiled = core.compile_model(core.read_model(str(bundle.file(rel))), "CPU", openvino_config(threads, **config))
        if self.precision == "bf16" and "bf" not in str(self.compiled.get_property("INFERENCE_PRECISION_HINT")):
            self.precision = "fp32"  # a CPU without bf16 arithmetic: OpenVINO computes in fp32, and so we say
        self.request = self.compiled.create_infer_request()
        self.inputs = [i["name"] for i in spec["inputs"]]
        self.outputs = [o["name"] for o in spec["outputs"]]
        self._ports = [self.compiled.output(n) for n in self.outputs]

    @property
    def providers(self) -> list[str]:
        return ["OpenVINO CPU"]

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        feed = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in zip(self.inputs, arrays)}
        res = self.request.infer(feed)  # outputs copied (share_outputs=False): safe past the next call
        return [res[p] for p in self._ports]


def make_graph(bundle: Bundle, name: str, *, runtime: str = "ort", providers: list[str] | None = None,
               threads: int | None = None, precision: str = "fp32", ctx: DeviceContext | None = None):
    """A callable graph on the chosen runtime (``ort`` with ``providers`` and, for I/O binding,
    a device context; or ``openvino``)."""
    if runtime == "openvino":
        return OvGraph(bundle, name, threads, precision)
    return OrtGraph(bundle, name, providers or ["CPUExecutionProvider"], threads, precision=precision, ctx=ctx)


class OrtReference:
    """The CPS pair as one graph: (slices, positions) -> summed softmax (and each member's)."""

    def __init__(self, bundle: Bundle, providers: list[str], threads: int | None = None, *, runtime: str = "ort",
                 precision: str = "fp32"):
        self.graph = make_graph(bundle, "reference", runtime=runtime, providers=providers, threads=threads,
                                precision=precision)

    def __call__(self, images: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.graph(images, positions.astype(np.float32))
        return dict(zip(self.graph.outputs, outs))


class OrtStcnBackend:
    """The STCN stages as ONNX graphs. With a device context (I/O binding, :mod:`app.binding`)
    features stay on the session's device from graph to graph; without one every call takes
    and returns host arrays. Either way the same engine runs the same math: only where the
    arrays live differs.

    Memory read: the bundle's ``stcn_read`` graph (``memory_read="graph"``) when the memory
    holds at least the graph's baked-in ``top_k`` entries and the run asks for that top_k,
    else the numpy read of :mod:`app.propagation`."""

    def __init__(self, bundle: Bundle, providers: list[str], threads: int | None = None, *, runtime: str = "ort",
                 precision: str = "fp32", ctx: DeviceContext | None = None, memory_read: str = "numpy"):
        self.stride = bundle.stride
        self.ctx = ctx
        self._joins = ConcatCache(ctx) if ctx is not None else None

        def graph(name):
            return make_graph(bundle, name, runtime=runtime, providers=providers, threads=threads, precision=precision,
                              ctx=ctx)

        self.key, self.skip, self.value, self.dec = map(graph, ("stcn_key", "stcn_skip", "stcn_value", "stcn_decode"))
        self.read, self.read_top_k = None, 0
        if memory_read == "graph":
            spec = bundle.graph("stcn_read")
            self.read = graph("stcn_read")
            self.read_top_k = int(spec.get("top_k") or bundle.manifest.get("propagation", {}).get("top_k", 0) or 0)
        elif memory_read != "numpy":
            raise ValueError(f"memory_read must be 'graph' or 'numpy', not {memory_read!r}")

    def to_device(self, array: np.ndarray):
        if self.ctx is None:
            return array
        return self.ctx.upload(np.ascontiguousarray(array, dtype=self.key.dtype))

    def to_host(self, x) -> np.ndarray:
        if isinstance(x, DeviceArray):
            return x.numpy().astype(np.float32, copy=False)
        return np.asarray(x)

    def concat(self, xs: list):
        """Readouts of several organs joined along axis 0."""
        return self.ctx.stack0(xs) if self.ctx is not None else np.concatenate(xs, axis=0)

    def _join(self, xs: list, axis: int):
        return self._joins.join(xs, axis) if self._joins is not None else np.concatenate(xs, axis=axis)

    def read_memory(self, mem_keys, mem_values, query_key, top_k):
        n = sum(k.shape[1] for k in mem_keys)
        if self.read is None or top_k != self.read_top_k or n < top_k:
            host = self.to_host
            return read_memory(np.concatenate([host(k) for k in mem_keys], axis=1),
                               np.concatenate([host(v) for v in mem_values], axis=2), host(query_key), top_k)
        return self.read(self._join(mem_keys, 1), self._join(mem_values, 2), query_key)[0]

    def encode_key(self, images):
        return dict(zip(("key", "qv", "f16", "f8", "f4"), self.key(images)))

    def skip_features(self, f8, f4):
        s8, s4 = self.skip(f8, f4)
        return s8, s4

    def encode_value(self, image, f16, masks, others):
        return self.value(image, f16, masks, others)[0]

    def decode(self, readout, qv, s8, s4):
        return self.dec(readout, qv, s8, s4)[0]

    def graphs(self) -> list:
        return [g for g in (self.key, self.skip, self.value, self.dec, self.read) if g is not None]


# Extra backends by name (``--backend torch``): registered from outside the appliance (the
# top-level ``flare22`` command registers the torch one), so ``app/`` never names torch.
EXTRA_BACKENDS: dict[str, Any] = {}


def register_backend(name: str, loader) -> None:
    """``loader(bundle, device=, threads=)`` -> (reference, stcn backend, info)."""
    EXTRA_BACKENDS[name] = loader


def load_backends(bundle: Bundle, *, backend: str = "onnx", device: str = "auto", threads: int | None = None,
                  runtime: str = "ort", precision: str = "fp32", io_binding: str = "auto",
                  memory_read: str = "auto") -> tuple[Any, Any, dict]:
    """(reference, stcn backend, info) for a bundle: ONNX Runtime or OpenVINO, or a registered
    backend. ``info`` records what runs: runtime, providers and each graph's precision.

    ``io_binding`` (ONNX Runtime): ``auto`` (on where a GPU provider runs), ``on`` or ``off``.
    ``memory_read``: ``auto`` (:data:`MEMORY_READ` for the device, when the bundle has the
    graph), ``graph`` or ``numpy``."""
    if backend in EXTRA_BACKENDS:
        return EXTRA_BACKENDS[backend](bundle, device=device, threads=threads)
    if backend != "onnx":
        known = ", ".join(["onnx", *EXTRA_BACKENDS])
        raise ValueError(f"backend {backend!r} is not available here (available: {known}); "
                         "the torch backend needs the development install and the `flare22` command")
    if runtime not in RUNTIMES:
        raise Flare22Error(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise Flare22Error(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "int8" and not any(g.get("onnx_int8") for g in bundle.manifest["graphs"].values()):
        raise Flare22Error(f"model bundle {bundle.path} has no int8 graphs (flare22 quantize adds them); "
                           "use --precision fp32")
    if precision == "bf16" and runtime != "openvino":
        raise Flare22Error("--precision bf16 needs --runtime openvino")
    if io_binding not in ("auto", "on", "off") or memory_read not in ("auto", "graph", "numpy"):
        raise ValueError(f"io_binding must be auto|on|off and memory_read auto|graph|numpy, "
                         f"not {io_binding!r} / {memory_read!r}")
    if runtime == "openvino":
        if device not in ("auto", "cpu"):
            raise Flare22Error(f"--runtime openvino runs on the CPU here; --device {device} needs --runtime ort")
        openvino_core()  # the one-line error before anything else loads
        providers = ["OpenVINO CPU"]
    else:
        providers = providers_for(device)
    ref = OrtReference(bundle, providers, threads, runtime=runtime, precision=precision)
    actual = ref.graph.providers  # what the session really runs, not what is installed
    on_gpu = actual[0] in GPU_PROVIDERS
    has_read = "stcn_read" in bundle.manifest.get("graphs", {})
    if memory_read == "auto":
        memory_read = MEMORY_READ["cuda" if on_gpu else "cpu"] if has_read else "numpy"
    elif memory_read == "graph" and not has_read:
        raise ValueError("memory_read='graph' but the bundle has no stcn_read graph (export it again)")
    ctx = None
    if runtime == "ort" and (io_binding == "on" or (io_binding == "auto" and on_gpu)):
        helpers = [p for p in actual if p != "TensorrtExecutionProvider"]  # no engine build for a Slice
        ctx = DeviceContext(session_providers(helpers), "cuda" if on_gpu else "cpu", 0, threads)
    stcn = OrtStcnBackend(bundle, providers, threads, runtime=runtime, precision=precision, ctx=ctx,
                          memory_read=memory_read)
    info = {"backend": "onnxruntime" if runtime == "ort" else "openvino", "runtime": runtime,
            "requested_providers": providers, "providers": actual,
            "precision": {g.name: g.precision for g in (ref.graph, *stcn.graphs())},
            "cuda_preloaded": bool(_state["preloaded"]), "memory_read": "onnx" if stcn.read is not None else "numpy",
            "io_binding": ctx is not None}
    if runtime == "openvino":
        import openvino

        info["openvino"] = openvino.__version__
    if on_gpu:
        info["gpu_mem_limit_mb"] = gpu_mem_limit_bytes() // 2**20
    log.info("%s providers: %s", "ONNX Runtime" if runtime == "ort" else "OpenVINO", ", ".join(actual))
    if providers[0] != actual[0] and not _state["warned"]:
        _state["warned"] = True
        log.warning("asked for %s but ONNX Runtime runs %s (CUDA or cuDNN libraries not loadable); "
                    "continuing on the CPU", providers[0], actual[0])
    return ref, stcn, info

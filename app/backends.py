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

I/O binding (:mod:`app.binding`): where a GPU provider runs, the STCN features stay on the
device from graph to graph (key encoder -> skip convolutions -> decoder; memory frames ->
read), with ``io_binding="auto"``; ``on`` forces it on the CPU provider too, which is how the
tests check it against the unbound path.

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
from .propagation import read_memory

log = logging.getLogger("flare22")

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
DEFAULT_GPU_MEM_MB = 4096
# The memory read each device takes by default where the bundle has the ``stcn_read`` graph
# (docs/efficiency.md, "Memory read"). CPU: numpy, measured faster than the exported graph
# (1.7-3x on the read, 1.14-1.24x per case). CUDA: the graph, which keeps the memory on the
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


class OrtGraph:
    """One exported graph in one ONNX Runtime session, called with named numpy arrays."""

    def __init__(self, bundle: Bundle, name: str, providers: list[str], threads: int | None = None, fp16: bool = False,
                 ctx: DeviceContext | None = None):
        import onnxruntime as ort

        spec = bundle.graph(name)
        rel = spec.get("onnx_fp16") if fp16 and spec.get("onnx_fp16") else spec["onnx"]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        self.name = name
        if any(p in GPU_PROVIDERS for p in providers):
            preload_cuda()
        self.session = ort.InferenceSession(str(bundle.file(rel)), so, providers=session_providers(providers))
        self.inputs = [i["name"] for i in spec["inputs"]]
        self.outputs = [o["name"] for o in spec["outputs"]]
        self.dtype = np.float16 if fp16 and spec.get("onnx_fp16") else np.float32
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


class OrtReference:
    """The CPS pair as one graph: (slices, positions) -> summed softmax (and each member's)."""

    def __init__(self, bundle: Bundle, providers: list[str], threads: int | None = None):
        self.graph = OrtGraph(bundle, "reference", providers, threads)

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

    def __init__(self, bundle: Bundle, providers: list[str], threads: int | None = None, *,
                 ctx: DeviceContext | None = None, memory_read: str = "numpy"):
        self.stride = bundle.stride
        self.ctx = ctx
        self._joins = ConcatCache(ctx) if ctx is not None else None
        self.key, self.skip, self.value, self.dec = (OrtGraph(bundle, n, providers, threads, ctx=ctx) for n in
                                                     ("stcn_key", "stcn_skip", "stcn_value", "stcn_decode"))
        self.read, self.read_top_k = None, 0
        if memory_read == "graph":
            spec = bundle.graph("stcn_read")
            self.read = OrtGraph(bundle, "stcn_read", providers, threads, ctx=ctx)
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


# Extra backends by name (``--backend torch``): registered from outside the appliance (the
# top-level ``flare22`` command registers the torch one), so ``app/`` never names torch.
EXTRA_BACKENDS: dict[str, Any] = {}


def register_backend(name: str, loader) -> None:
    """``loader(bundle, device=, threads=)`` -> (reference, stcn backend, info)."""
    EXTRA_BACKENDS[name] = loader


def load_backends(bundle: Bundle, *, backend: str = "onnx", device: str = "auto", threads: int | None = None,
                  io_binding: str = "auto", memory_read: str = "auto") -> tuple[Any, Any, dict]:
    """(reference, stcn backend, info) for a bundle: ONNX Runtime, or a registered backend.

    ``io_binding``: ``auto`` (on where a GPU provider runs), ``on`` or ``off``.
    ``memory_read``: ``auto`` (:data:`MEMORY_READ` for the device, when the bundle has the
    graph), ``graph`` or ``numpy``."""
    if backend in EXTRA_BACKENDS:
        return EXTRA_BACKENDS[backend](bundle, device=device, threads=threads)
    if backend != "onnx":
        known = ", ".join(["onnx", *EXTRA_BACKENDS])
        raise ValueError(f"backend {backend!r} is not available here (available: {known}); "
                         "the torch backend needs the development install and the `flare22` command")
    if io_binding not in ("auto", "on", "off") or memory_read not in ("auto", "graph", "numpy"):
        raise ValueError(f"io_binding must be auto|on|off and memory_read auto|graph|numpy, "
                         f"not {io_binding!r} / {memory_read!r}")
    providers = providers_for(device)
    ref = OrtReference(bundle, providers, threads)
    actual = ref.graph.providers  # what the session really runs, not what is installed
    on_gpu = actual[0] in GPU_PROVIDERS
    has_read = "stcn_read" in bundle.manifest.get("graphs", {})
    if memory_read == "auto":
        memory_read = MEMORY_READ["cuda" if on_gpu else "cpu"] if has_read else "numpy"
    elif memory_read == "graph" and not has_read:
        raise ValueError("memory_read='graph' but the bundle has no stcn_read graph (export it again)")
    ctx = None
    if io_binding == "on" or (io_binding == "auto" and on_gpu):
        helpers = [p for p in actual if p != "TensorrtExecutionProvider"]  # no engine build for a Slice
        ctx = DeviceContext(session_providers(helpers), "cuda" if on_gpu else "cpu", 0, threads)
    stcn = OrtStcnBackend(bundle, providers, threads, ctx=ctx, memory_read=memory_read)
    info = {"backend": "onnxruntime", "requested_providers": providers, "providers": actual,
            "cuda_preloaded": bool(_state["preloaded"]), "memory_read": "onnx" if stcn.read is not None else "numpy",
            "io_binding": ctx is not None}
    if on_gpu:
        info["gpu_mem_limit_mb"] = gpu_mem_limit_bytes() // 2**20
    log.info("ONNX Runtime providers: %s", ", ".join(actual))
    if providers[0] != actual[0] and not _state["warned"]:
        _state["warned"] = True
        log.warning("asked for %s but ONNX Runtime runs %s (CUDA or cuDNN libraries not loadable); "
                    "continuing on the CPU", providers[0], actual[0])
    return ref, stcn, info

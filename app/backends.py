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

Memory read: the bundle's ``stcn_read`` graph where the bundle has one (bundles exported
before ``export.graphs`` dropped it) and the memory holds at least its baked-in ``top_k``
entries (on the CPU provider it beat the numpy read at every memory size measured, 1.4-6x,
see docs/efficiency.md; on CUDA unmeasured), else the numpy read of :mod:`app.propagation`.

The torch backend (for GPU measurements where ONNX Runtime's CUDA build is absent) lives in
``training/torch_backend.py`` and is registered from outside (``register_backend``): the appliance never imports it, so an image without
torch never needs it.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from .bundle import Bundle
from .propagation import NumpyMemoryMixin

log = logging.getLogger("flare22")

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
DEFAULT_GPU_MEM_MB = 4096
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

    def __init__(self, bundle: Bundle, name: str, providers: list[str], threads: int | None = None, fp16: bool = False):
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

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        feed = {n: np.ascontiguousarray(a, dtype=self.dtype) for n, a in zip(self.inputs, arrays)}
        outs = self.session.run(self.outputs, feed)
        return [o.astype(np.float32, copy=False) for o in outs]


class OrtReference:
    """The CPS pair as one graph: (slices, positions) -> summed softmax (and each member's)."""

    def __init__(self, bundle: Bundle, providers: list[str], threads: int | None = None):
        self.graph = OrtGraph(bundle, "reference", providers, threads)

    def __call__(self, images: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.graph(images, positions.astype(np.float32))
        return dict(zip(self.graph.outputs, outs))


class OrtStcnBackend(NumpyMemoryMixin):
    def __init__(self, bundle: Bundle, providers: list[str], threads: int | None = None):
        self.stride = bundle.stride
        self.key = OrtGraph(bundle, "stcn_key", providers, threads)
        self.skip = OrtGraph(bundle, "stcn_skip", providers, threads)
        self.value = OrtGraph(bundle, "stcn_value", providers, threads)
        self.dec = OrtGraph(bundle, "stcn_decode", providers, threads)
        # the read graph where the bundle has one (faster than numpy on the CPU too)
        self.read = None
        self.read_top_k = 0
        if "stcn_read" in bundle.manifest.get("graphs", {}):
            self.read = OrtGraph(bundle, "stcn_read", providers, threads)
            self.read_top_k = int(bundle.manifest.get("propagation", {}).get("top_k", 0) or 0)

    def read_memory(self, mem_keys, mem_values, query_key, top_k):
        n = sum(k.shape[1] for k in mem_keys)
        if self.read is None or top_k != self.read_top_k or n < top_k:
            return super().read_memory(mem_keys, mem_values, query_key, top_k)
        return self.read(np.concatenate(mem_keys, axis=1), np.concatenate(mem_values, axis=2), query_key)[0]

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


def load_backends(bundle: Bundle, *, backend: str = "onnx", device: str = "auto", threads: int | None = None) -> tuple[Any, Any, dict]:
    """(reference, stcn backend, info) for a bundle: ONNX Runtime, or a registered backend."""
    if backend in EXTRA_BACKENDS:
        return EXTRA_BACKENDS[backend](bundle, device=device, threads=threads)
    if backend != "onnx":
        known = ", ".join(["onnx", *EXTRA_BACKENDS])
        raise ValueError(f"backend {backend!r} is not available here (available: {known}); "
                         "the torch backend needs the development install and the `flare22` command")
    providers = providers_for(device)
    ref = OrtReference(bundle, providers, threads)
    stcn = OrtStcnBackend(bundle, providers, threads)
    actual = ref.graph.providers  # what the session really runs, not what is installed
    info = {"backend": "onnxruntime", "requested_providers": providers, "providers": actual,
            "cuda_preloaded": bool(_state["preloaded"]), "memory_read": "onnx" if stcn.read is not None else "numpy"}
    if actual[0] in GPU_PROVIDERS:
        info["gpu_mem_limit_mb"] = gpu_mem_limit_bytes() // 2**20
    log.info("ONNX Runtime providers: %s", ", ".join(actual))
    if providers[0] != actual[0] and not _state["warned"]:
        _state["warned"] = True
        log.warning("asked for %s but ONNX Runtime runs %s (CUDA or cuDNN libraries not loadable); "
                    "continuing on the CPU", providers[0], actual[0])
    return ref, stcn, info

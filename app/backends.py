"""ONNX Runtime backends for the reference pair and the STCN stages.

Providers: ``cpu``, ``cuda`` (CUDA provider, CPU fallback), ``tensorrt`` (TensorRT, then
CUDA, then CPU) or ``auto`` (CUDA when the installed ONNX Runtime offers it and NVML sees a
GPU, else CPU). The providers a session actually runs are logged once per bundle, since
ONNX Runtime silently falls back to the CPU when CUDA or cuDNN is missing.

The torch backend (for GPU measurements where ONNX Runtime's CUDA build is absent) lives in
``training/torch_backend.py`` and is registered from outside (``register_backend``): the appliance never imports it, so an image without
torch never needs it.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .bundle import Bundle
from .propagation import NumpyMemoryMixin

log = logging.getLogger("flare22")

DEVICES = ("auto", "cpu", "cuda", "tensorrt")


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
        self.session = ort.InferenceSession(str(bundle.file(rel)), so, providers=providers)
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
    actual = ref.graph.providers
    info = {"backend": "onnxruntime", "requested_providers": providers, "providers": actual}
    if providers[0] != actual[0]:
        log.warning("asked for %s but ONNX Runtime runs %s (CUDA/cuDNN missing?)", providers[0], actual[0])
    return ref, stcn, info

"""The STCN stages and the reference pair behind the engine's interface, in torch.

Used by training validation (the live network) and by the appliance's torch backend
(``load_torch_backends``: a bundle's graphs run by torch, for GPU measurements where
ONNX Runtime's CUDA build is absent; the ``flare22`` command registers it as ``--backend torch``). Features and the memory bank stay on the
network's device; only masks go in and decoder logits come out through the host.
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from app.bundle import Bundle
from training.models.reference import REFERENCE_CONFIGS, ReferencePair, build_reference_pair
from training.models.stcn import STCN_CONFIGS, build_stcn, topk_read

log = logging.getLogger("flare22")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class TorchStcnBackend:
    def __init__(self, net, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, stride: int = 16):
        self.net = net.eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.stride = stride

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    def concat(self, xs: list) -> torch.Tensor:
        return torch.cat(xs, 0)

    def to_host(self, x: torch.Tensor) -> np.ndarray:
        return x.detach().float().cpu().numpy()

    @torch.inference_mode()
    def encode_key(self, images):
        with _autocast(self.device, self.dtype):
            key, qv, f16, f8, f4 = self.net.encode_key(images)
        return {"key": key.float(), "qv": qv, "f16": f16, "f8": f8, "f4": f4}

    @torch.inference_mode()
    def skip_features(self, f8, f4):
        with _autocast(self.device, self.dtype):
            return self.net.skip_features(f8, f4)

    @torch.inference_mode()
    def encode_value(self, image, f16, masks, others):
        with _autocast(self.device, self.dtype):
            return self.net.encode_value(image, f16, masks, others)

    @torch.inference_mode()
    def read_memory(self, mem_keys, mem_values, query_key, top_k):
        return topk_read(torch.cat(mem_keys, dim=1), torch.cat(mem_values, dim=2), query_key, top_k, method="gather")

    @torch.inference_mode()
    def decode(self, readout, qv, s8, s4):
        with _autocast(self.device, self.dtype):
            return self.net.decode(readout, qv, s8, s4).float()


class TorchReference:
    """(slices, positions) -> summed softmax of the pair (and each member's), numpy out.

    ``pair`` is a ``ReferencePair`` (live networks) or the bundle's exported program of it."""

    def __init__(self, pair, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        self.pair = pair  # in eval mode already (an exported program refuses .eval())
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        p = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.float32)).to(self.device)
        with _autocast(self.device, self.dtype):
            probs, pa, pb = self.pair(x, p)
        return {"probs": probs.float().cpu().numpy(), "probs_a": pa.float().cpu().numpy(),
                "probs_b": pb.float().cpu().numpy()}


# ---- a bundle's graphs run by torch ------------------------------------------------
def _load_program(bundle: Bundle, name: str, device):
    return torch.export.load(str(bundle.file(bundle.graph(name)["torch"]))).module().to(device)


class _ProgramNet:
    """The STCN stage methods backed by exported programs."""

    def __init__(self, bundle: Bundle, device):
        self._key, self._skip = _load_program(bundle, "stcn_key", device), _load_program(bundle, "stcn_skip", device)
        self._value = _load_program(bundle, "stcn_value", device)
        self._decode = _load_program(bundle, "stcn_decode", device)

    def eval(self):
        return self

    def encode_key(self, image):
        return self._key(image)

    def skip_features(self, f8, f4):
        return self._skip(f8, f4)

    def encode_value(self, image, f16, masks, others):
        return self._value(image, f16, masks, others)

    def decode(self, readout, qv, s8, s4):
        return self._decode(readout, qv, s8, s4)


def rebuild_networks(bundle: Bundle):
    """(net_a, net_b, stcn) from the manifest's configs and the safetensors weights."""
    from safetensors.torch import load_file

    ref_name = bundle.manifest["configs"]["reference"]["name"]
    stcn_name = bundle.manifest["configs"]["stcn"]["name"]
    if ref_name not in REFERENCE_CONFIGS or stcn_name not in STCN_CONFIGS:
        raise ValueError(f"bundle {bundle.path}: configs {ref_name}/{stcn_name} unknown to this code")
    a, b = build_reference_pair(ref_name)
    net = build_stcn(stcn_name)
    w = bundle.manifest["weights"]
    a.load_state_dict(load_file(str(bundle.file(w["reference_a"]))))
    b.load_state_dict(load_file(str(bundle.file(w["reference_b"]))))
    net.load_state_dict(load_file(str(bundle.file(w["stcn"]))))
    return a.eval(), b.eval(), net.eval()


def resolve_device(device: str) -> torch.device:
    if device in ("auto", "cuda", "tensorrt"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if device != "auto":
            log.warning("torch backend: no CUDA device, running on the CPU")
    return torch.device("cpu")


def load_torch_backends(bundle: Bundle, *, device: str = "auto", threads: int | None = None,
                        dtype: torch.dtype | None = None, programs: bool = True):
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(int(threads))
    source = "programs"
    try:
        if not programs or any("torch" not in bundle.graph(g) for g in
                               ("reference", "stcn_key", "stcn_skip", "stcn_value", "stcn_decode")):
            raise FileNotFoundError("no torch.export programs in the bundle")
        stcn_net = _ProgramNet(bundle, dev)
        ref = TorchReference(_load_program(bundle, "reference", dev), dev, dtype)
    except Exception as exc:  # noqa: BLE001 - fall back to rebuilding from weights
        if programs:
            log.info("torch backend: rebuilding networks from weights (%s)", str(exc).splitlines()[0][:160])
        a, b, stcn_net = rebuild_networks(bundle)
        a, b, stcn_net = a.to(dev), b.to(dev), stcn_net.to(dev)
        ref = TorchReference(ReferencePair(a, b).eval(), dev, dtype)
        source = "weights"
    stcn = TorchStcnBackend(stcn_net, dev, dtype, stride=bundle.stride)
    info = {"backend": "torch", "device": str(dev), "source": source, "dtype": str(dtype or torch.float32),
            "providers": [f"torch-{dev.type}"]}
    return ref, stcn, info

"""The appliance's torch backend: a bundle's graphs run by torch (GPU measurements where
ONNX Runtime's CUDA build is absent). Imported only when ``--backend torch`` is chosen.

Two sources, in order: the bundle's ``torch.export`` programs (``.pt2``), when this torch
can load them; otherwise the networks rebuilt from the bundle's configs and safetensors
weights (no pickle either way). ``dtype`` (fp16 / bf16) runs the stages under autocast.
"""
from __future__ import annotations

import logging

import torch

from app.bundle import Bundle
from training.torch_backend import TorchReference, TorchStcnBackend

log = logging.getLogger("flare22")


class _ProgramNet:
    """The STCN stage methods backed by exported programs."""

    def __init__(self, bundle: Bundle, device):
        def load(name):
            return torch.export.load(str(bundle.file(bundle.graph(name)["torch"]))).module().to(device)

        self._key, self._skip = load("stcn_key"), load("stcn_skip")
        self._value, self._decode = load("stcn_value"), load("stcn_decode")

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


class _ProgramPair:
    def __init__(self, bundle: Bundle, device):
        self.m = torch.export.load(str(bundle.file(bundle.graph("reference")["torch"]))).module().to(device)

    def __call__(self, x, p):
        return self.m(x, p)


def rebuild_networks(bundle: Bundle):
    """(net_a, net_b, stcn) from the manifest's configs and the safetensors weights."""
    from safetensors.torch import load_file

    from training.models.reference import REFERENCE_CONFIGS, build_reference_pair
    from training.models.stcn import STCN_CONFIGS, build_stcn

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
        stcn_net, pair = _ProgramNet(bundle, dev), _ProgramPair(bundle, dev)

        class _Ref(TorchReference):
            def __init__(self):
                self.device, self.dtype = dev, dtype

            @torch.inference_mode()
            def __call__(self, images, positions):
                x = torch.from_numpy(images).to(dev)
                p = torch.from_numpy(positions.astype("float32")).to(dev)
                s, pa, pb = pair(x, p)
                return {"probs": s.float().cpu().numpy(), "probs_a": pa.float().cpu().numpy(),
                        "probs_b": pb.float().cpu().numpy()}

        ref = _Ref()
    except Exception as exc:  # noqa: BLE001 - fall back to rebuilding from weights
        if programs:
            log.info("torch backend: rebuilding networks from weights (%s)", str(exc).splitlines()[0][:160])
        a, b, stcn_net = rebuild_networks(bundle)
        a, b, stcn_net = a.to(dev), b.to(dev), stcn_net.to(dev)
        ref = TorchReference(a, b, dev, dtype)
        source = "weights"
    stcn = TorchStcnBackend(stcn_net, dev, dtype, stride=bundle.stride)
    info = {"backend": "torch", "device": str(dev), "source": source, "dtype": str(dtype or torch.float32),
            "providers": [f"torch-{dev.type}"]}
    return ref, stcn, info

"""The STCN stages and the reference pair behind the engine's interface, in torch.

Used by training validation (the live network) and by the appliance's torch backend
(export.torch_backend, for GPU measurements). Features and the memory bank stay on the
network's device; only masks go in and decoder logits come out through the host.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch


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
        mk = torch.cat(mem_keys, dim=1).float()  # (Ck, M)
        mv = torch.cat(mem_values, dim=2)  # (O, Cv, M)
        qk = query_key.float()
        a = (2 * (mk.T @ qk) - mk.pow(2).sum(0)[:, None]) / math.sqrt(mk.shape[0])
        k = min(top_k, a.shape[0])
        top, idx = a.topk(k, dim=0)  # (k, P)
        w = top.softmax(dim=0).to(mv.dtype)
        gathered = mv[:, :, idx]  # (O, Cv, k, P)
        return (gathered * w).sum(dim=2)

    @torch.inference_mode()
    def decode(self, readout, qv, s8, s4):
        with _autocast(self.device, self.dtype):
            return self.net.decode(readout, qv, s8, s4).float()


class TorchReference:
    """(slices, positions) -> summed softmax of the pair (and each member's), numpy out."""

    def __init__(self, net_a, net_b, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        self.a, self.b = net_a.eval(), net_b.eval()
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        p = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.float32)).to(self.device)
        with _autocast(self.device, self.dtype):
            pa = torch.softmax(self.a(x, p).float(), 1)
            pb = torch.softmax(self.b(x, p).float(), 1)
        return {"probs": (pa + pb).cpu().numpy(), "probs_a": pa.cpu().numpy(), "probs_b": pb.cpu().numpy()}

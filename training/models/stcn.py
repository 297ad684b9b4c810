"""STCN, the propagation network (Cheng et al., NeurIPS 2021; REFERENCE section 6).

The network is cut into stages that are each one exported graph; the memory bank and its
bookkeeping live in the application, not here. Shapes for one 512 x 512 slice with the
`paper` config (h, w = H/16, W/16; O organs as the batch dimension; T memory frames)::

    encode_key(image (B,3,H,W))          -> key (B,64,h,w), qv (B,512,h,w),
                                            f16 (B,1024,h,w), f8 (B,512,2h,2w), f4 (B,256,4h,4w)
    encode_value(image (1|O,3,H,W), f16 (1|O,1024,h,w), masks (O,H,W)[, others (O,H,W)])
                                         -> values (O,512,h,w)
    skip_features(f8, f4)                -> s8 (B,512,2h,2w), s4 (B,256,4h,4w)   once per slice
    read_memory(mem_keys (64,T,h,w), mem_values (O,512,T,h,w), query_key (64,h,w), top_k=20)
                                         -> readout (O,512,h,w)
    decode(readout (O,512,h,w), qv (1,512,h,w), s8 (1,..), s4 (1,..))
                                         -> logits (O,1,H,W)
    aggregate(probabilities (O,H,W))     -> logits (O+1,H,W), background first

Every stage is a pure tensor function of its inputs (no Python-side state), so each is one
exported graph (``export.graphs.GRAPHS`` wraps them). The memory read, ``topk_read``, is the
one torch form of it: the network's training forward, ``read_memory`` and the torch backend
use it; the appliance reads memory in numpy (``app.propagation.read_memory``).

Differences from the original code: CBAM is left out of the value fusion block (as in
the authors' code). Two exact rewrites: the decoder's skip convolutions depend only on the
image, so they are `skip_features`, run once per slice instead of once per object; and
`topk_read(method="gather")` can sum the k selected memory values instead of multiplying
by the mostly-zero dense affinity (the dense form is the default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

__all__ = [
    "STCNConfig",
    "STCN_CONFIGS",
    "STCN",
    "topk_read",
    "ResBlock",
    "ResNetTrunk",
    "build_stcn",
    "freeze_batchnorm",
    "aggregate",
]

_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


@dataclass(frozen=True)
class STCNConfig:
    """STCN hyperparameters. Defaults are the paper's (ResNet-50 key, ResNet-18 value)."""

    name: str = "paper"
    image_size: int = 512  # slice size trained and exported at (the network takes any multiple of 16)
    # Key encoder: ResNet stem + three stages (layer1..layer3) of torchvision blocks.
    key_block: Literal["basic", "bottleneck"] = "bottleneck"
    key_layers: tuple[int, int, int] = (3, 4, 6)
    key_widths: tuple[int, int, int] = (64, 128, 256)
    key_stem: int = 64
    # Value encoder: the same shape of trunk on 5 channels (image, mask, other masks).
    value_block: Literal["basic", "bottleneck"] = "basic"
    value_layers: tuple[int, int, int] = (2, 2, 2)
    value_widths: tuple[int, int, int] = (64, 128, 256)
    value_stem: int = 64
    key_dim: int = 64
    value_dim: int = 512
    # Output channels of the two upsampling steps of the decoder (1/8, 1/4).
    decoder_channels: tuple[int, int] = (256, 256)
    top_k: int = 20
    # STCN trains with batch norm frozen (eval mode); see `freeze_batchnorm`.
    freeze_bn: bool = True


STCN_CONFIGS: dict[str, STCNConfig] = {
    "paper": STCNConfig(),
    # Narrow ResNet-ish trunks of one basic block per stage: trains on two CPU cores.
    # Batch norm trains normally here (nothing pretrained to protect, tiny batches aside).
    "tiny": STCNConfig(
        name="tiny",
        image_size=128,
        key_block="basic",
        key_layers=(1, 1, 1),
        key_widths=(16, 32, 64),
        key_stem=16,
        value_block="basic",
        value_layers=(1, 1, 1),
        value_widths=(16, 32, 64),
        value_stem=16,
        key_dim=32,
        value_dim=64,
        decoder_channels=(32, 32),
        freeze_bn=False,
    ),
}


# --------------------------------------------------------------------------- building blocks


class ResBlock(nn.Module):
    """Pre-activation residual block of two 3x3 convs; a 3x3 conv on the shortcut when the
    width changes (STCN's decoder and fusion block)."""

    def __init__(self, in_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.downsample = (
            nn.Conv2d(in_channels, out_channels, 3, padding=1)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.conv2(F.relu(self.conv1(F.relu(x))))
        if self.downsample is not None:
            x = self.downsample(x)
        return x + r


class ResNetTrunk(nn.Module):
    """ResNet stem and layer1..layer3 from torchvision blocks, at any width.

    Module names follow torchvision's ResNet, so the `paper` key trunk has exactly the
    state-dict keys and shapes of `torchvision.models.resnet50()` up to layer3.
    Returns the 1/4, 1/8 and 1/16 feature maps.
    """

    def __init__(
        self,
        block: Literal["basic", "bottleneck"],
        layers: tuple[int, int, int],
        widths: tuple[int, int, int],
        *,
        stem: int = 64,
        in_channels: int = 3,
    ):
        super().__init__()
        block_cls = _BLOCKS[block]
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem
        stages = []
        for i, (depth, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            out = width * block_cls.expansion
            downsample = None
            if stride != 1 or inplanes != out:
                downsample = nn.Sequential(conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
            blocks = [block_cls(inplanes, width, stride, downsample)]
            blocks += [block_cls(out, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = out
        self.layer1, self.layer2, self.layer3 = stages
        self.channels = tuple(w * block_cls.expansion for w in widths)  # (c4, c8, c16)
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f4 = self.layer1(x)
        f8 = self.layer2(f4)
        f16 = self.layer3(f8)
        return f4, f8, f16


class ValueEncoder(nn.Module):
    """Trunk on (image, mask, other masks), fused with the key encoder's f16."""

    def __init__(self, cfg: STCNConfig, f16_channels: int):
        super().__init__()
        self.trunk = ResNetTrunk(
            cfg.value_block, cfg.value_layers, cfg.value_widths, stem=cfg.value_stem, in_channels=5
        )
        self.fuse1 = ResBlock(self.trunk.channels[2] + f16_channels, cfg.value_dim)
        self.fuse2 = ResBlock(cfg.value_dim)

    def forward(self, x: torch.Tensor, f16: torch.Tensor) -> torch.Tensor:
        v = self.trunk(x)[2]
        return self.fuse2(self.fuse1(torch.cat([v, f16], dim=1)))


class Decoder(nn.Module):
    """compress(readout ⊕ qv) -> up x2 + s8 -> up x2 + s4 -> 1 logit, bilinear x4.

    The skip convolutions (`skip8`, `skip4`) are applied by `skips`, once per slice.
    """

    def __init__(self, cfg: STCNConfig, f8_channels: int, f4_channels: int):
        super().__init__()
        c8, c4 = cfg.decoder_channels
        self.compress = ResBlock(2 * cfg.value_dim, cfg.value_dim)
        self.skip8 = nn.Conv2d(f8_channels, cfg.value_dim, 3, padding=1)
        self.fuse8 = ResBlock(cfg.value_dim, c8)
        self.skip4 = nn.Conv2d(f4_channels, c8, 3, padding=1)
        self.fuse4 = ResBlock(c8, c4)
        self.pred = nn.Conv2d(c4, 1, 3, padding=1)

    def skips(self, f8: torch.Tensor, f4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.skip8(f8), self.skip4(f4)

    def forward(
        self, readout: torch.Tensor, qv: torch.Tensor, s8: torch.Tensor, s4: torch.Tensor
    ) -> torch.Tensor:
        x = torch.cat([readout, qv.expand(readout.shape[0], -1, -1, -1)], dim=1)
        x = self.compress(x)
        x = self.fuse8(s8 + _up(x, 2))
        x = self.fuse4(s4 + _up(x, 2))
        return _up(self.pred(F.relu(x)), 4)


def _up(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=float(factor), mode="bilinear", align_corners=False)


def topk_read(
    mem_keys: torch.Tensor,
    mem_values: torch.Tensor,
    query_key: torch.Tensor,
    top_k: int,
    *,
    method: Literal["dense", "gather"] = "dense",
) -> torch.Tensor:
    """STCN's top-k memory readout, the one torch form of it.

    mem_keys (..., Ck, N), mem_values (..., O, Cv, N), query_key (..., Ck, P) ->
    readout (..., O, Cv, P); leading dimensions are a batch of independent memories.
    affinity(m, q) = (2 k_m.k_q - |k_m|^2) / sqrt(Ck); the top_k largest over m are
    softmax-normalised and weight the memory values (all of them when N < top_k).

    `method="dense"` (STCN's form) scatters the k weights into an N x P matrix and
    multiplies: O*Cv*N*P multiply-adds, BLAS-fast, best for short memories.
    `method="gather"` (no batch dimensions) sums the k selected memory values: O*Cv*k*P
    work independent of N, but bound by memory traffic (on two CPU cores it only wins from
    about 40 frames of memory; the GPU backend uses it).
    """
    ck = query_key.shape[-2]
    mk = mem_keys.float()
    affinity = (2 * (mk.transpose(-1, -2) @ query_key.float()) - mk.pow(2).sum(-2).unsqueeze(-1)) / math.sqrt(ck)
    k = min(top_k, affinity.shape[-2])
    top_values, top_index = affinity.topk(k, dim=-2)  # (..., k, P)
    weights = top_values.softmax(dim=-2).to(mem_values.dtype)
    if method == "dense":
        dense = torch.zeros_like(affinity, dtype=mem_values.dtype).scatter(-2, top_index, weights)  # (..., N, P)
        out = mem_values.flatten(-3, -2) @ dense  # (..., O*Cv, P); reshape keeps O symbolic in a traced graph
        return out.reshape(*mem_values.shape[:-1], out.shape[-1])
    if method == "gather":
        if mem_values.dim() != 3:
            raise ValueError("read method 'gather' takes one memory: mem_values (O, Cv, N)")
        return (mem_values[:, :, top_index] * weights).sum(dim=2)  # (O, Cv, k, P) -> (O, Cv, P)
    raise ValueError(f"read method must be 'dense' or 'gather', got {method!r}")


def aggregate(probabilities: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Soft aggregation of per-object probabilities into log-odds with background first.

    background = prod(1 - p_i); [background, p_1..p_O] are clamped to [1e-7, 1 - 1e-7] and
    returned as logits log(p / (1 - p)); a softmax over `dim` gives the final probabilities.
    """
    probabilities = probabilities.float()  # under autocast, 1 - 1e-7 would round to 1 in fp16
    background = torch.prod(1 - probabilities, dim=dim, keepdim=True)
    p = torch.cat([background, probabilities], dim=dim).clamp(1e-7, 1 - 1e-7)
    return torch.log(p / (1 - p))


def freeze_batchnorm(module: nn.Module, *, train_affine: bool = False) -> int:
    """Put every batch-norm layer of `module` in eval mode (running statistics fixed) and,
    unless `train_affine`, stop gradients to its scale and shift. Returns how many layers.

    Call again after `module.train()`; `STCN.train` does so itself when `freeze_bn` is set.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(train_affine)
            n += 1
    return n


# --------------------------------------------------------------------------- the network


class STCN(nn.Module):
    """Space-time correspondence network, one method per exported stage."""

    def __init__(self, cfg: STCNConfig):
        super().__init__()
        self.cfg = cfg
        self.key_encoder = ResNetTrunk(
            cfg.key_block, cfg.key_layers, cfg.key_widths, stem=cfg.key_stem, in_channels=3
        )
        c4, c8, c16 = self.key_encoder.channels
        self.key_proj = nn.Conv2d(c16, cfg.key_dim, 3, padding=1)
        nn.init.orthogonal_(self.key_proj.weight)
        nn.init.zeros_(self.key_proj.bias)
        self.key_comp = nn.Conv2d(c16, cfg.value_dim, 3, padding=1)
        self.value_encoder = ValueEncoder(cfg, c16)
        self.decoder = Decoder(cfg, c8, c4)
        if cfg.freeze_bn:
            freeze_batchnorm(self)

    def train(self, mode: bool = True) -> STCN:
        super().train(mode)
        if self.cfg.freeze_bn:
            freeze_batchnorm(self)
        return self

    # -- stages -------------------------------------------------------------------------

    def encode_key(self, image: torch.Tensor):
        """image (B,3,H,W) -> key (B,Ck,h,w), qv (B,Cv,h,w), f16, f8, f4."""
        f4, f8, f16 = self.key_encoder(image)
        return self.key_proj(f16), self.key_comp(f16), f16, f8, f4

    def encode_value(
        self,
        image: torch.Tensor,
        f16: torch.Tensor,
        masks: torch.Tensor,
        others: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Memory values of O objects on one image: organs are the batch dimension.

        image (1|O,3,H,W), f16 (1|O,C16,h,w), masks (O,H,W) -> values (O,Cv,h,w).
        `others` defaults to the sum of the other objects' masks, masks.sum(0) - masks;
        pass it (O,H,W) to encode objects of different images in one batch (training).
        """
        if others is None:
            others = masks.sum(0, keepdim=True) - masks
        n = masks.shape[0]
        x = torch.cat(
            [image.expand(n, -1, -1, -1), masks.unsqueeze(1), others.unsqueeze(1)], dim=1
        )
        return self.value_encoder(x, f16.expand(n, -1, -1, -1))

    def skip_features(self, f8: torch.Tensor, f4: torch.Tensor):
        """The decoder's skip convolutions, which depend on the image only: f8, f4 -> s8, s4."""
        return self.decoder.skips(f8, f4)

    def read_memory(
        self,
        mem_keys: torch.Tensor,
        mem_values: torch.Tensor,
        query_key: torch.Tensor,
        *,
        top_k: int | None = None,
        method: Literal["dense", "gather"] = "dense",
    ) -> torch.Tensor:
        """Top-k memory readout; one affinity serves all objects.

        mem_keys (Ck,T,h,w) or (Ck,N), mem_values (O,Cv,T,h,w) or (O,Cv,N),
        query_key (Ck,h,w) -> readout (O,Cv,h,w), or (Ck,P) -> (O,Cv,P). N = T*h*w memory
        positions.
        affinity(m, q) = (2 k_m.k_q - |k_m|^2) / sqrt(Ck); the top_k largest over m are
        softmax-normalised and weight the memory values. The exported graph bakes top_k
        in and needs N >= top_k (true from one frame at 128 x 128 for k = 20).

        See `topk_read` for the two methods.
        """
        top_k = self.cfg.top_k if top_k is None else top_k
        ck = query_key.shape[0]
        readout = topk_read(mem_keys.reshape(ck, -1), mem_values.flatten(2), query_key.reshape(ck, -1), top_k,
                            method=method)
        return readout.reshape(*readout.shape[:2], *query_key.shape[1:])

    def decode(
        self, readout: torch.Tensor, qv: torch.Tensor, s8: torch.Tensor, s4: torch.Tensor
    ) -> torch.Tensor:
        """readout (O,Cv,h,w), qv (1|O,Cv,h,w), s8, s4 (1|O,..) -> logits (O,1,H,W)."""
        return self.decoder(readout, qv, s8, s4)

    @staticmethod
    def aggregate(probabilities: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """probabilities (O,H,W) -> logits (O+1,H,W), background first (see `aggregate`)."""
        return aggregate(probabilities, dim=dim)

    # -- training convenience ----------------------------------------------------------

    def forward(
        self, frames: torch.Tensor, first_masks: torch.Tensor, *, top_k: int | None = None
    ) -> torch.Tensor:
        """Propagate the first frame's object masks through a short clip (STCN training).

        frames (B,T,3,H,W), first_masks (B,O,H,W) -> aggregated logits (B,T-1,O+1,H,W) of
        frames 1..T-1. Frame t reads a memory of frames 0..t-1; a predicted frame enters
        the memory with its soft (aggregated softmax) masks.
        """
        b, t = frames.shape[:2]
        o = first_masks.shape[1]
        top_k = self.cfg.top_k if top_k is None else top_k
        key, qv, f16, f8, f4 = self.encode_key(frames.flatten(0, 1))
        s8, s4 = self.skip_features(f8, f4)
        split = lambda x: x.unflatten(0, (b, t))  # noqa: E731
        key, qv, f16, s8, s4 = map(split, (key, qv, f16, s8, s4))
        per_obj = lambda x: x.repeat_interleave(o, dim=0)  # noqa: E731  (b, ...) -> (b*o, ...)

        def values(j: int, masks: torch.Tensor) -> torch.Tensor:  # masks (b, o, H, W)
            others = masks.sum(1, keepdim=True) - masks
            v = self.encode_value(per_obj(frames[:, j]), per_obj(f16[:, j]), masks.flatten(0, 1), others.flatten(0, 1))
            return v.unflatten(0, (b, o))  # (b, o, Cv, h, w)

        # All clips of the batch at once: one value / decoder call per frame, batched reads.
        mem_k, mem_v = [key[:, 0]], [values(0, first_masks)]
        logits = []
        for j in range(1, t):
            mk = torch.stack(mem_k, 2).flatten(2)  # (b, Ck, N)
            mv = torch.stack(mem_v, 3).flatten(3)  # (b, o, Cv, N)
            readout = topk_read(mk, mv, key[:, j].flatten(2), top_k)  # (b, o, Cv, P)
            readout = readout.flatten(0, 1).unflatten(2, key.shape[-2:])  # (b*o, Cv, h, w)
            obj = self.decode(readout, per_obj(qv[:, j]), per_obj(s8[:, j]), per_obj(s4[:, j]))
            agg = aggregate(torch.sigmoid(obj[:, 0]).unflatten(0, (b, o)), dim=1)  # (b, o+1, H, W)
            logits.append(agg)
            if j < t - 1:
                mem_k.append(key[:, j])
                mem_v.append(values(j, agg.softmax(1)[:, 1:]))
        return torch.stack(logits, 1)


def build_stcn(config: str | STCNConfig = "paper") -> STCN:
    """STCN of a named (or given) config, randomly initialised."""
    if isinstance(config, str):
        try:
            config = STCN_CONFIGS[config]
        except KeyError:
            raise KeyError(f"unknown STCN config {config!r}; known: {sorted(STCN_CONFIGS)}") from None
    return STCN(config)

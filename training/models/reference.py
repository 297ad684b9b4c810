"""The reference networks: TransUNet (R50-ViT-B/16 hybrid) and DeepLabV3+ (EfficientNet).

Both segment one axial slice into 14 classes (background + 13 organs) and take the slice's
relative axial position z / num_slices as a second input. The position is broadcast to a
constant 1 x H x W plane and concatenated to the last decoder features right before the
segmentation head (REFERENCE section 5; the paper gives it to both networks).

Interface of both networks::

    forward(image: (B, 3, H, W) float in [0, 1], position: (B,) float in [0, 1])
        -> logits (B, 14, H, W)

Parts come from timm (ResNetV2 stages with weight-standardised convolutions and group norm,
ViT blocks, conv-norm-act) and segmentation_models_pytorch (DeepLabV3+); everything starts
from random initialisation, no weights are downloaded.

Variants come from `REFERENCE_CONFIGS` (`paper`, `tiny`) through `build_reference_pair`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base.heads import SegmentationHead
from timm.layers import ConvNormAct, GroupNormAct, StdConv2d, trunc_normal_
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import Block
from torch import nn

__all__ = [
    "TransUNetConfig",
    "DeepLabConfig",
    "ReferenceConfig",
    "REFERENCE_CONFIGS",
    "TransUNet",
    "DeepLabV3PlusPos",
    "build_transunet",
    "build_deeplab",
    "build_reference_pair",
    "ReferencePair",
    "position_plane",
    "count_parameters",
]


@dataclass(frozen=True)
class TransUNetConfig:
    """TransUNet R50-ViT hybrid. Defaults are the paper's R50-ViT-B/16 at 512 x 512."""

    image_size: int = 512
    in_channels: int = 3
    num_classes: int = 14
    # ResNetV2 (BiT) stem and stages: bottleneck units, output channels, group-norm groups.
    stem_channels: int = 64
    stage_depths: tuple[int, ...] = (3, 4, 9)
    stage_channels: tuple[int, ...] = (256, 512, 1024)
    norm_groups: int = 32
    # ViT on the 1/16 feature map (one token per 1/16 cell: hybrid patch size 16).
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.0
    # Cascaded upsampler: 3x3 conv from hidden to head_channels, then one decoder block per
    # entry of decoder_channels, the first n_skip of them fed a CNN skip (1/8, 1/4, 1/2).
    head_channels: int = 512
    decoder_channels: tuple[int, ...] = (256, 128, 64, 16)
    n_skip: int = 3
    use_position: bool = True

    @property
    def grid_size(self) -> int:
        return self.image_size // 16


@dataclass(frozen=True)
class DeepLabConfig:
    """DeepLabV3+ from segmentation_models_pytorch. Defaults: the paper's EfficientNet-B3."""

    encoder_name: str = "efficientnet-b3"
    encoder_depth: int = 5
    output_stride: int = 16
    decoder_channels: int = 256
    atrous_rates: tuple[int, int, int] = (12, 24, 36)
    in_channels: int = 3
    num_classes: int = 14
    use_position: bool = True


@dataclass(frozen=True)
class ReferenceConfig:
    """One named variant of the reference pair; `image_size` is the slice size fed to both."""

    name: str
    image_size: int
    transunet: TransUNetConfig
    deeplab: DeepLabConfig = field(default_factory=DeepLabConfig)


REFERENCE_CONFIGS: dict[str, ReferenceConfig] = {
    "paper": ReferenceConfig(
        name="paper",
        image_size=512,
        transunet=TransUNetConfig(image_size=512),
        deeplab=DeepLabConfig(),
    ),
    # Narrow and shallow, for tests and CPU demos: trains at 128 x 128 on two cores.
    # DeepLabV3+ keeps the EfficientNet family at tiny width: timm's TinyNet-E
    # (EfficientNet with width x0.51, depth x0.6), decoder width 64.
    "tiny": ReferenceConfig(
        name="tiny",
        image_size=128,
        transunet=TransUNetConfig(
            image_size=128,
            stem_channels=16,
            stage_depths=(1, 1, 1),
            stage_channels=(32, 64, 128),
            norm_groups=8,
            hidden_size=96,
            num_layers=2,
            num_heads=4,
            mlp_dim=192,
            head_channels=64,
            decoder_channels=(64, 32, 16, 8),
        ),
        deeplab=DeepLabConfig(
            encoder_name="tu-tinynet_e",
            decoder_channels=64,
            atrous_rates=(12, 24, 36),
        ),
    ),
}


def position_plane(position: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) positions -> (B, 1, H, W) constant planes with the batch and size of `like`."""
    return torch.ones_like(like[:, :1]) * position.to(like.dtype).reshape(-1, 1, 1, 1)


# --------------------------------------------------------------------------- TransUNet


class _DecoderBlock(nn.Module):
    """Upsample x2 (bilinear), concatenate the skip if any, two 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels + skip_channels, out_channels, 3)
        self.conv2 = ConvNormAct(out_channels, out_channels, 3)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class TransUNet(nn.Module):
    """R50-ViT hybrid encoder, cascaded upsampler with CNN skips, position-aware head.

    As in TransUNet: weight-standardised convs with group norm in the CNN, one token per
    1/16 cell (1x1 patch embedding), learned position embeddings for a fixed input size,
    pre-norm ViT blocks, then 3x3 conv to `head_channels` and four blocks of bilinear x2
    (align_corners=True) + skip + two 3x3 conv-BN-ReLU. One difference: the stem pads
    symmetrically (7x7/2 conv pad 3, 3x3/2 max-pool pad 1), so every feature map is
    exactly 1/2^k of the input and needs no run-time padding.
    """

    def __init__(self, cfg: TransUNetConfig):
        super().__init__()
        if cfg.image_size % 16:
            raise ValueError(f"TransUNet image_size must be a multiple of 16, got {cfg.image_size}")
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        if len(cfg.stage_depths) != 3 or len(cfg.stage_channels) != 3:
            raise ValueError("TransUNet uses three ResNetV2 stages (1/4, 1/8, 1/16)")
        if len(cfg.decoder_channels) != 4:
            raise ValueError("TransUNet's decoder has four x2 upsampling blocks (1/16 -> 1/1)")
        if not 0 <= cfg.n_skip <= 3:
            raise ValueError(f"n_skip must be 0..3, got {cfg.n_skip}")
        self.cfg = cfg

        # CNN: BiT-style ResNetV2 without pre-activation (weight-standardised conv + GN).
        cnn = ResNetV2(
            layers=list(cfg.stage_depths),
            channels=cfg.stage_channels,
            num_classes=0,
            global_pool="",
            in_chans=cfg.in_channels,
            stem_chs=cfg.stem_channels,
            stem_type="",
            preact=False,
            conv_layer=StdConv2d,
            norm_layer=partial(GroupNormAct, num_groups=cfg.norm_groups),
        )
        self.stem = cnn.stem  # conv 7x7/2 -> norm+ReLU (1/2 skip) -> max-pool
        self.stages = cnn.stages  # 1/4, 1/8, 1/16

        # ViT on the 1/16 map: 1x1 patch embedding, learned position embedding.
        n_tokens = cfg.grid_size**2
        self.patch_embed = nn.Conv2d(cfg.stage_channels[-1], cfg.hidden_size, kernel_size=1)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, cfg.hidden_size))
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=cfg.hidden_size,
                    num_heads=cfg.num_heads,
                    mlp_ratio=cfg.mlp_dim / cfg.hidden_size,
                    qkv_bias=True,
                    proj_drop=cfg.dropout,
                    attn_drop=cfg.attention_dropout,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),
                )
                for _ in range(cfg.num_layers)
            ]
        )
        self.encoder_norm = nn.LayerNorm(cfg.hidden_size, eps=1e-6)

        # Cascaded upsampler. Skips, deepest first: stage 2 (1/8), stage 1 (1/4), stem (1/2).
        skip_channels = [cfg.stage_channels[1], cfg.stage_channels[0], cfg.stem_channels]
        skip_channels = skip_channels[: cfg.n_skip] + [0] * (4 - cfg.n_skip)
        self.conv_more = ConvNormAct(cfg.hidden_size, cfg.head_channels, 3)
        ins = [cfg.head_channels, *cfg.decoder_channels[:-1]]
        self.decoder = nn.ModuleList(
            [_DecoderBlock(i, o, s) for i, o, s in zip(ins, cfg.decoder_channels, skip_channels)]
        )
        head_in = cfg.decoder_channels[-1] + (1 if cfg.use_position else 0)
        self.segmentation_head = nn.Conv2d(head_in, cfg.num_classes, kernel_size=3, padding=1)
        self._init_transformer()

    def _init_transformer(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, image: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = self.stem.conv(image)
        x = self.stem.norm(x)
        skips = [x]  # 1/2
        x = self.stem.pool(x)
        for stage in self.stages:
            x = stage(x)
            skips.append(x)  # 1/4, 1/8, 1/16
        skips = [skips[2], skips[1], skips[0]]  # 1/8, 1/4, 1/2: deepest first

        x = self.patch_embed(x)  # (B, hidden, h, w)
        b, c, h, w = x.shape
        if not torch.jit.is_tracing() and h * w != self.pos_embed.shape[1]:
            raise ValueError(
                f"TransUNet built for {cfg.image_size}x{cfg.image_size} input "
                f"({self.pos_embed.shape[1]} tokens) got {tuple(image.shape[-2:])} ({h * w} tokens)"
            )
        tokens = self.pos_drop(x.flatten(2).transpose(1, 2) + self.pos_embed)
        tokens = self.encoder_norm(self.blocks(tokens))
        x = tokens.transpose(1, 2).reshape(b, c, h, w)

        x = self.conv_more(x)
        for i, block in enumerate(self.decoder):
            x = block(x, skips[i] if i < cfg.n_skip else None)
        if cfg.use_position:
            x = torch.cat([x, position_plane(position, x)], dim=1)
        return self.segmentation_head(x)


# --------------------------------------------------------------------------- DeepLabV3+


class DeepLabV3PlusPos(nn.Module):
    """smp DeepLabV3+ whose segmentation head sees decoder features + the position plane.

    smp's own head is a 1x1 conv followed by bilinear x4 (align_corners=True); it is rebuilt
    with one more input channel. The decoder output is at 1/4 of the input size.
    """

    def __init__(self, cfg: DeepLabConfig):
        super().__init__()
        self.cfg = cfg
        model = smp.DeepLabV3Plus(
            encoder_name=cfg.encoder_name,
            encoder_depth=cfg.encoder_depth,
            encoder_weights=None,
            encoder_output_stride=cfg.output_stride,
            decoder_channels=cfg.decoder_channels,
            decoder_atrous_rates=cfg.atrous_rates,
            in_channels=cfg.in_channels,
            classes=cfg.num_classes,
        )
        self.encoder = model.encoder
        self.decoder = model.decoder
        head_in = cfg.decoder_channels + (1 if cfg.use_position else 0)
        self.segmentation_head = SegmentationHead(
            in_channels=head_in, out_channels=cfg.num_classes, kernel_size=1, upsampling=4
        )

    def forward(self, image: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        features = self.encoder(image)
        x = self.decoder(features)
        if self.cfg.use_position:
            x = torch.cat([x, position_plane(position, x)], dim=1)
        return self.segmentation_head(x)


# --------------------------------------------------------------------------- registry


def _resolve(config: str | ReferenceConfig) -> ReferenceConfig:
    if isinstance(config, ReferenceConfig):
        return config
    try:
        return REFERENCE_CONFIGS[config]
    except KeyError:
        raise KeyError(
            f"unknown reference config {config!r}; known: {sorted(REFERENCE_CONFIGS)}"
        ) from None


def build_transunet(config: str | ReferenceConfig | TransUNetConfig = "paper") -> TransUNet:
    cfg = config if isinstance(config, TransUNetConfig) else _resolve(config).transunet
    return TransUNet(cfg)


def build_deeplab(config: str | ReferenceConfig | DeepLabConfig = "paper") -> DeepLabV3PlusPos:
    cfg = config if isinstance(config, DeepLabConfig) else _resolve(config).deeplab
    return DeepLabV3PlusPos(cfg)


def build_reference_pair(
    config: str | ReferenceConfig = "paper",
) -> tuple[TransUNet, DeepLabV3PlusPos]:
    """The two CPS networks of one named (or given) config, randomly initialised."""
    cfg = _resolve(config)
    if cfg.transunet.image_size != cfg.image_size:
        raise ValueError(
            f"config {cfg.name!r}: TransUNet image_size {cfg.transunet.image_size} "
            f"differs from the pair's image_size {cfg.image_size}"
        )
    return TransUNet(cfg.transunet), DeepLabV3PlusPos(cfg.deeplab)


class ReferencePair(nn.Module):
    """The CPS pair as one module: (image, position) -> (summed softmax, member a's softmax,
    member b's softmax), each (B, 14, H, W). The one definition of the pair's output: the
    exported ``reference`` graph, training validation, pseudo-labelling and the torch
    backend all run it."""

    def __init__(self, net_a: nn.Module, net_b: nn.Module):
        super().__init__()
        self.a, self.b = net_a, net_b

    def forward(self, image: torch.Tensor, position: torch.Tensor):
        pa = torch.softmax(self.a(image, position).float(), 1)  # float: fp32 softmax under autocast
        pb = torch.softmax(self.b(image, position).float(), 1)
        return pa + pb, pa, pb


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


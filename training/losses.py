"""Segmentation losses (REFERENCE section 8).

Reference networks (paper): soft Dice + cross-entropy with label smoothing on labels, Dice
alone on the peer's hard prediction in the CPS branch -> `DiceCELoss`, `soft_dice_loss`.
Propagation network (STCN, on aggregated logits): online-hard-example cross-entropy plus
Lovasz-softmax -> `OhemLovaszLoss`, `ohem_cross_entropy`, `lovasz_softmax`.

Conventions: `logits` (B, C, H, W) unnormalised scores; `target` (B, H, W) integer class
indices, `ignore_index` marking pixels that count nowhere. Every function returns a scalar.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "soft_dice_loss",
    "DiceCELoss",
    "cross_pseudo_supervision",
    "ohem_select",
    "ohem_cross_entropy",
    "lovasz_grad",
    "lovasz_softmax",
    "OhemLovaszLoss",
    "OHEM_THRESHOLD",
]

# Keep pixels whose cross-entropy exceeds -log(0.5), i.e. the true class has p < 0.5.
OHEM_THRESHOLD = math.log(2.0)


def _valid_one_hot(
    target: torch.Tensor, num_classes: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,H,W) labels -> one-hot (B,C,H,W), zero at ignored pixels, and the valid mask (B,1,H,W)."""
    valid = target != ignore_index
    labels = torch.where(valid, target, torch.zeros_like(target))
    valid = valid.unsqueeze(1).to(torch.float32)
    one_hot = F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).to(torch.float32)
    return one_hot * valid, valid


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1.0,
    classes: Literal["all", "present"] = "all",
    include_background: bool = True,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Multi-class soft Dice loss, 1 - mean over classes of
    (2 sum(p g) + smooth) / (sum(p) + sum(g) + smooth), sums over the whole batch.

    `classes="present"` averages only over classes that occur in `target` (all classes
    when none qualifies); `include_background=False` leaves class 0 out.
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    one_hot, valid = _valid_one_hot(target, num_classes, ignore_index)
    probs = probs * valid
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    denominator = probs.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    keep = torch.ones(num_classes, dtype=torch.bool, device=logits.device)
    if not include_background:
        keep[0] = False
    if classes == "present":
        present = keep & (one_hot.sum(dims) > 0)
        keep = present if bool(present.any()) else keep
    elif classes != "all":
        raise ValueError(f"classes must be 'all' or 'present', got {classes!r}")
    return 1 - dice[keep].mean()


class DiceCELoss(nn.Module):
    """dice_weight * soft Dice + ce_weight * cross-entropy with label smoothing."""

    def __init__(
        self,
        *,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.1,
        smooth: float = 1.0,
        classes: Literal["all", "present"] = "all",
        ignore_index: int = -100,
    ):
        super().__init__()
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.label_smoothing = label_smoothing
        self.smooth = smooth
        self.classes = classes
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(
            logits.float(),
            target.long(),
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )
        dice = soft_dice_loss(
            logits,
            target,
            smooth=self.smooth,
            classes=self.classes,
            ignore_index=self.ignore_index,
        )
        return self.dice_weight * dice + self.ce_weight * ce


def cross_pseudo_supervision(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    *,
    loss: Literal["dice", "ce"] = "dice",
    threshold: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPS losses of a pair: each network against its peer's hard (argmax) prediction.

    `loss="dice"` is the paper's soft Dice over the classes present in the pseudo label;
    `"ce"` is the CPS paper's cross-entropy. With `threshold > 0` a peer pixel whose top
    softmax probability is below it counts nowhere (a confidence mask, as in FixMatch):
    early in training the peers' labels are mostly wrong, and learning from the confident
    pixels only keeps the pair from agreeing on background. Returns (loss of a, loss of b).
    """
    if loss not in ("dice", "ce"):
        raise ValueError(f"loss must be 'dice' or 'ce', got {loss!r}")
    ignore = -100

    def pseudo(logits: torch.Tensor) -> torch.Tensor:
        conf, label = logits.detach().float().softmax(1).max(1)
        return torch.where(conf >= threshold, label, torch.full_like(label, ignore))

    def one(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not bool((target != ignore).any()):
            return logits.sum() * 0.0
        if loss == "ce":
            return F.cross_entropy(logits.float(), target, ignore_index=ignore)
        return soft_dice_loss(logits, target, classes="present", ignore_index=ignore)

    return one(logits_a, pseudo(logits_b)), one(logits_b, pseudo(logits_a))


def ohem_select(pixel_losses: torch.Tensor, *, threshold: float, min_kept: int) -> torch.Tensor:
    """The hard pixels' losses: those above `threshold`, or the `min_kept` largest when
    fewer than `min_kept` pass it (all of them when there are fewer than `min_kept`)."""
    flat = pixel_losses.reshape(-1)
    min_kept = max(1, min(int(min_kept), flat.numel()))
    hard = flat > threshold
    if int(hard.sum()) >= min_kept:
        return flat[hard]
    return flat.topk(min_kept, sorted=False).values


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    threshold: float = OHEM_THRESHOLD,
    min_kept_fraction: float = 1 / 16,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Online hard example mining cross-entropy: the mean per-pixel CE over the pixels
    whose loss exceeds `threshold`, but over at least `min_kept_fraction` of the (valid)
    pixels, the hardest ones."""
    losses = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="none")
    losses = losses[target != ignore_index]
    if losses.numel() == 0:
        return logits.sum() * 0.0
    min_kept = int(losses.numel() * min_kept_fraction)
    return ohem_select(losses, threshold=threshold, min_kept=min_kept).mean()


def lovasz_grad(fg_sorted: torch.Tensor) -> torch.Tensor:
    """Weights of the Lovasz extension of the Jaccard loss for errors sorted decreasingly.

    With the first i pixels (in error order) taken as mispredicted, the Jaccard loss is
    1 - |fg without them| / |fg together with the background pixels among them|; the weight
    of pixel i is how much that loss grows when pixel i joins.
    """
    total = fg_sorted.sum()
    intersection = total - fg_sorted.cumsum(0)
    union = total + (1 - fg_sorted).cumsum(0)
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def _lovasz_flat(
    probs: torch.Tensor, labels: torch.Tensor, classes: Literal["all", "present"]
) -> torch.Tensor:
    """probs (P, C), labels (P,) -> mean over classes of the Lovasz-softmax loss."""
    losses = []
    for c in range(probs.shape[1]):
        fg = (labels == c).to(probs.dtype)
        if classes == "present" and not bool(fg.any()):
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, order = errors.sort(descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_grad(fg[order])))
    if not losses:  # no class present (only ignored pixels): nothing to learn from
        return probs.sum() * 0.0
    return torch.stack(losses).mean()


def lovasz_softmax(
    probabilities: torch.Tensor,
    target: torch.Tensor,
    *,
    classes: Literal["all", "present"] = "present",
    per_image: bool = False,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Lovasz-softmax loss (Berman et al., CVPR 2018) on class probabilities (B,C,H,W).

    For each class, pixel errors |[y = c] - p_c| are sorted decreasingly and dotted with
    `lovasz_grad` of the sorted foreground indicator; the losses are averaged over the
    classes (those present in the target by default). At one-hot probabilities it equals
    the mean of 1 - IoU over those classes.
    """
    if classes not in ("all", "present"):
        raise ValueError(f"classes must be 'all' or 'present', got {classes!r}")
    if per_image:
        losses = [
            lovasz_softmax(p[None], t[None], classes=classes, ignore_index=ignore_index)
            for p, t in zip(probabilities, target)
        ]
        return torch.stack(losses).mean()
    probs = probabilities.float().movedim(1, -1).reshape(-1, probabilities.shape[1])
    labels = target.reshape(-1)
    if ignore_index is not None:
        keep = labels != ignore_index
        probs, labels = probs[keep], labels[keep]
    return _lovasz_flat(probs, labels, classes)


class OhemLovaszLoss(nn.Module):
    """STCN's propagation loss on aggregated logits: OHEM cross-entropy + Lovasz-softmax."""

    def __init__(
        self,
        *,
        ohem_weight: float = 1.0,
        lovasz_weight: float = 1.0,
        threshold: float = OHEM_THRESHOLD,
        min_kept_fraction: float = 1 / 16,
        ignore_index: int = -100,
    ):
        super().__init__()
        self.ohem_weight = ohem_weight
        self.lovasz_weight = lovasz_weight
        self.threshold = threshold
        self.min_kept_fraction = min_kept_fraction
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ohem = ohem_cross_entropy(
            logits,
            target,
            threshold=self.threshold,
            min_kept_fraction=self.min_kept_fraction,
            ignore_index=self.ignore_index,
        )
        lovasz = lovasz_softmax(
            logits.float().softmax(dim=1), target, ignore_index=self.ignore_index
        )
        return self.ohem_weight * ohem + self.lovasz_weight * lovasz

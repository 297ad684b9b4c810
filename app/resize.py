"""Separable linear resizing of slice stacks by two small matrix products.

Same sampling as ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False,
antialias=False)``: output pixel centres mapped to input coordinates by half-pixel
offsets, edge values clamped. Used to bring slices to the bundle's input size and
probabilities back to the native in-plane size, one chunk of slices at a time.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix R such that R @ v resizes a length-n_in signal."""
    if n_in == n_out:
        return np.eye(n_in, dtype=np.float32)
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1 - frac)
    np.add.at(m, (rows, i1), frac)
    return m.astype(np.float32)


def resize_stack(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes of ``x`` (..., H, W) to ``out_hw`` bilinearly."""
    h, w = x.shape[-2:]
    oh, ow = out_hw
    if (h, w) == (oh, ow):
        return x
    lead = x.shape[:-2]
    m = int(np.prod(lead)) if lead else 1
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(m * h, w)
    ry = linear_matrix(h, oh)
    rx = linear_matrix(w, ow)
    # two plain 2-D products (numpy's batched matmul of small matrices is far slower)
    t = (x @ rx.T).reshape(m, h, ow).transpose(0, 2, 1).reshape(m * ow, h)
    out = (t @ ry.T).reshape(m, ow, oh).transpose(0, 2, 1)
    return np.ascontiguousarray(out).reshape(*lead, oh, ow)


def resize_labels_nearest(labels: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes (for training targets)."""
    h, w = labels.shape[-2:]
    oh, ow = out_hw
    if (h, w) == (oh, ow):
        return labels
    yi = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
    xi = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
    return labels[..., yi[:, None], xi[None, :]]


@lru_cache(maxsize=64)
def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two input indices and the weight of the second, per output position, of the
    same half-pixel linear sampling as ``linear_matrix``."""
    scale = n_in / n_out
    src = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def argmax_resized(scores: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Argmax over the channels of (C, H, W) scores after bilinear resizing to ``out_hw``,
    without resizing the scores.

    Where the four input pixels around an output pixel share their argmax, that label wins
    there too (each of its scores is the largest at every corner, so also in any convex
    combination): the label is copied. Only the output pixels between different labels,
    a thin band along the boundaries, get the interpolated scores of the channels present.
    The same result as ``resize_stack(scores, out_hw).argmax(0)`` up to exact ties."""
    win = scores.argmax(axis=0)
    present = np.unique(win)
    if len(present) == 1:
        return np.full(out_hw, present[0], np.uint8)
    h, w = scores.shape[-2:]
    if tuple(out_hw) == (h, w):
        return win.astype(np.uint8)
    y0, y1, fy = _taps(h, out_hw[0])
    x0, x1, fx = _taps(w, out_hw[1])
    c00, c01 = win[y0][:, x0], win[y0][:, x1]
    c10, c11 = win[y1][:, x0], win[y1][:, x1]
    out = c00.astype(np.uint8)
    edge = (c00 != c01) | (c00 != c10) | (c00 != c11)
    ys, xs = np.nonzero(edge)
    if ys.size:
        sub = scores[present]
        wy, wx = fy[ys], fx[xs]
        a0, a1, b0, b1 = y0[ys], y1[ys], x0[xs], x1[xs]
        val = (sub[:, a0, b0] * ((1 - wy) * (1 - wx)) + sub[:, a0, b1] * ((1 - wy) * wx)
               + sub[:, a1, b0] * (wy * (1 - wx)) + sub[:, a1, b1] * (wy * wx))
        out[ys, xs] = present.astype(np.uint8)[val.argmax(axis=0)]
    return out

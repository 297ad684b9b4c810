"""CT windowing: Hounsfield units -> three channels in [0, 1] (REFERENCE section 5).

Window definitions are data: a list of channels, each the union of its sub-windows given as
(width, level). They travel in the model bundle's manifest; the defaults below are the
authors'. Channel order: [abdomen, chest, spine].

Windowing works on a stack of slices at a time (``window_slices``) so that a whole
3 x N x 512 x 512 float32 volume is never materialised.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .resize import resize_stack


@dataclass(frozen=True)
class Window:
    name: str
    sub_windows: tuple[tuple[float, float], ...]  # (width, level) pairs

    @property
    def bounds(self) -> tuple[float, float]:
        lo = min(level - width / 2 for width, level in self.sub_windows)
        hi = max(level + width / 2 for width, level in self.sub_windows)
        return float(lo), float(hi)

    def to_json(self) -> dict:
        lo, hi = self.bounds
        return {"name": self.name, "sub_windows": [list(s) for s in self.sub_windows], "lo": lo, "hi": hi}

    @classmethod
    def from_json(cls, d: dict) -> "Window":
        return cls(d["name"], tuple((float(w), float(l)) for w, l in d["sub_windows"]))


DEFAULT_WINDOWS: tuple[Window, ...] = (
    Window("abdomen", ((400, 50), (150, 30))),  # soft tissue + liver -> [-150, 250] HU
    Window("chest", ((1500, -600), (350, 50))),  # lungs + mediastinum -> [-1350, 225] HU
    Window("spine", ((1800, 400),)),  # bone -> [-500, 1300] HU
)


def window_slices(hu: np.ndarray, windows=DEFAULT_WINDOWS, out: np.ndarray | None = None) -> np.ndarray:
    """(n, H, W) Hounsfield units -> (n, C, H, W) float32 in [0, 1], one channel per window."""
    hu = np.asarray(hu)
    if hu.ndim == 2:
        hu = hu[None]
    if hu.ndim != 3:
        raise ValueError(f"expected (n, H, W) slices, got shape {hu.shape}")
    n, h, w = hu.shape
    if out is None:
        out = np.empty((n, len(windows), h, w), dtype=np.float32)
    src = hu.astype(np.float32, copy=False)
    for c, win in enumerate(windows):
        lo, hi = win.bounds
        np.clip(src, lo, hi, out=out[:, c])
        out[:, c] -= lo
        out[:, c] *= 1.0 / (hi - lo)
    return out


def model_slices(volume: np.ndarray, idx, windows, hw: tuple[int, int]) -> np.ndarray:
    """Slices ``idx`` of a canonical HU volume as the networks take them: windowed and resized
    to the model input, (B, 3, H, W) float32 (the predictor, the assist, training, quantisation's
    calibration)."""
    return resize_stack(window_slices(volume[np.asarray(idx)], windows), hw)

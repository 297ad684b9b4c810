"""The propagation engine's state, each piece a small class (in the spirit of Cutie's
MemoryManager / ImageFeatureStore): :class:`MemoryBank`, one organ's STCN memory in one
pass, and :class:`FeatureCache`, the per-volume key features shared by both directions of
a range. :class:`PropagationStats` counts what a run computed. app.propagation creates them
afresh for every ``run()``, so nothing carries over from one volume to the next.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class PropagationStats:
    key_encodes: int = 0
    skip_encodes: int = 0
    value_encodes: int = 0
    decodes: int = 0
    decoded_cells: int = 0  # sum over decodes of window area, in key-grid cells
    value_cells: int = 0  # likewise for value encodes
    skip_cells: int = 0  # key-grid cells of the slices whose skip features were computed
    full_cells: int = 0  # what the same decodes would cost on the full frame
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("key_encodes", "skip_encodes", "value_encodes", "decodes",
                                            "decoded_cells", "value_cells", "skip_cells", "full_cells")}
        d["seconds"] = {k: round(v, 4) for k, v in self.seconds.items()}
        d["calls"] = dict(self.calls)
        return d

    def timer(self, name: str) -> "_Timer":
        """``with stats.timer("decode"): ...`` adds the block's seconds and one call to ``name``."""
        return _Timer(self, name)


class _Timer:
    def __init__(self, stats: PropagationStats, name: str):
        self.stats, self.name = stats, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.stats.seconds[self.name] += time.perf_counter() - self.t0
        self.stats.calls[self.name] += 1


@dataclass
class Frame:
    """One memory frame of one organ: keys (Ck, n) and values (1, Cv, n), the backend's arrays."""

    keys: object
    values: object
    is_ref: bool = False


class MemoryBank:
    """One organ's memory in one pass: reference frames (never evicted), memory frames added
    every ``mem_every`` slices and capped at ``max_frames`` by evicting the oldest
    non-reference frame, and an optional temporary slot holding the last frame."""

    def __init__(self, max_frames: int):
        self.max_frames = max_frames
        self.frames: list[Frame] = []
        self.temp: Frame | None = None

    def add(self, frame: Frame) -> None:
        """A memory frame (a reference when ``frame.is_ref``); clears the temporary slot."""
        self.frames.append(frame)
        self.temp = None
        if len(self.frames) > self.max_frames:
            for i, f in enumerate(self.frames):
                if not f.is_ref:
                    del self.frames[i]
                    break

    def set_temp(self, frame: Frame | None) -> None:
        self.temp = frame

    def readable(self) -> list[Frame]:
        """The frames a memory read sees: memory, then the temporary slot."""
        return self.frames + ([self.temp] if self.temp is not None else [])

    def __len__(self) -> int:
        return len(self.frames)


class FeatureCache:
    """Per-volume key-encoder outputs by slice: encoded in batches of ``batch`` slices along
    a pass's direction within [lo, hi], once per slice for both directions of a range; the
    decoder's skip features added on first use; evicted behind the schedule."""

    def __init__(self, backend, get_slices: Callable[[list[int]], np.ndarray], batch: int,
                 grid_cells: int, stats: PropagationStats):
        self.backend, self.get_slices, self.batch = backend, get_slices, batch
        self.grid_cells, self.stats = grid_cells, stats
        self._feats: dict[int, dict] = {}

    def get(self, t: int, direction: int, lo: int, hi: int) -> dict:
        """Slice t's features {key, qv, f16, f8, f4 (or s8, s4), image}."""
        if t not in self._feats:
            want = [s for s in range(t, t + direction * self.batch, direction)
                    if lo <= s <= hi and s not in self._feats]
            with self.stats.timer("key_encode"):
                imgs = self.backend.to_device(np.ascontiguousarray(self.get_slices(want), dtype=np.float32))
                out = self.backend.encode_key(imgs)
            self.stats.key_encodes += len(want)
            for j, s in enumerate(want):
                self._feats[s] = {k: v[j : j + 1] for k, v in out.items()}
                self._feats[s]["image"] = imgs[j : j + 1]
        return self._feats[t]

    def skips(self, feats: dict):
        """The decoder's skip features (s8, s4) of a slice's features, computed once."""
        if "s8" not in feats:
            with self.stats.timer("skip"):
                feats["s8"], feats["s4"] = self.backend.skip_features(feats["f8"], feats["f4"])
            self.stats.skip_encodes += 1
            self.stats.skip_cells += self.grid_cells
            del feats["f8"], feats["f4"]
        return feats["s8"], feats["s4"]

    def evict_below(self, t: int) -> None:
        for k in [k for k in self._feats if k < t]:
            del self._feats[k]

    def clear(self) -> None:
        self._feats.clear()

    def __contains__(self, t: int) -> bool:
        return t in self._feats

    def __len__(self) -> int:
        return len(self._feats)

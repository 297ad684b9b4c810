"""The propagation engine: bidirectional STCN mask propagation through a CT volume.

The memory bank, the per-volume feature cache and the run's counters are small classes
of app.memory, created afresh by every ``run()``. Written once, here, against a small
interface of stage functions (:class:`StageBackend`):
training validation runs it with the torch network behind that interface, the appliance
with exported ONNX graphs, the annotation assist with either. The memory read (affinity,
top-k, softmax, weighted sum) is done natively in numpy by :func:`read_memory`.

Schedule (REFERENCE section 5, with the cost changes listed below)
------------------------------------------------------------------
Reference slices r_0 < ... < r_m carry multi-organ masks. Ranges: r_0 -> 0 (backward),
r_i -> r_{i+1} (forward) and r_{i+1} -> r_i (backward) for every pair, r_m -> N-1
(forward). Each pass starts with the reference frame in memory (never evicted), adds a
memory frame every ``mem_every`` slices, keeps the last frame as a temporary slot, and caps
memory at ``max_memory`` frames by evicting the oldest non-reference frame.

Per organ and slice the passes that carried the organ vote: the organ's probability is the
mean of those passes' probabilities (a pass that never had the organ in memory casts no
vote; one that lost it votes 0). Background = prod(1 - p_o), then argmax. Reference slices
keep their reference masks.

What makes it cheap (each a switch of :class:`PropagationConfig`, so the benchmark can show
what each buys):

* ``skip_absent``: an organ absent from a range's reference is not decoded on that range.
* ``early_stop``: a pass stops decoding an organ once its mask has vanished for
  ``patience`` slices (organs span a fraction of the volume's length; the pass votes 0
  for it from there on).
* ``crop``: each organ is read out, decoded and value-encoded only inside a window around
  its last mask (on the 1/16 feature grid, ``margin`` cells around the mask's bounding box),
  so a small organ costs a fraction of a full-frame decode.
* Key features of a slice are computed once per range and shared by both directions; the
  decoder's skip convolutions on f8 / f4 are computed once per slice, not once per organ,
  and only for slices that some organ is decoded on; slices no organ reaches are never
  key-encoded at all.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import numpy as np

from .memory import FeatureCache, Frame, MemoryBank, PropagationStats
from .resize import argmax_resized, resize_stack


class StageBackend(Protocol):
    """The STCN stages. Arrays are the backend's own (numpy for ONNX Runtime, device tensors
    for torch): the engine only slices and reshapes them, moves masks in with
    ``to_device`` and decoder logits out with ``to_host``. ``stride`` is the key grid's."""

    stride: int

    def encode_key(self, images):
        """(B,3,H,W) -> {key (B,Ck,h,w), qv (B,Cv,h,w), f16 (B,C16,h,w), f8, f4}."""

    def skip_features(self, f8, f4):
        """(1,C,2h,2w), (1,C',4h,4w) -> decoder skip features s8, s4 on the same grids."""

    def encode_value(self, image, f16, masks, others):
        """(1,3,Hc,Wc), (1,C16,hc,wc), (O,Hc,Wc), (O,Hc,Wc) -> values (O,Cv,hc,wc)."""

    def read_memory(self, mem_keys: list, mem_values: list, query_key, top_k: int):
        """Frames' keys [(Ck, n_i)], values [(O, Cv, n_i)], query (Ck, P) -> (O, Cv, P)."""

    def decode(self, readout, qv, s8, s4):
        """(O,Cv,hc,wc), (1,Cv,hc,wc), (1,C8,2hc,2wc), (1,C4,4hc,4wc) -> logits (O,1,Hc,Wc)."""

    def to_device(self, array: np.ndarray): ...

    def to_host(self, x) -> np.ndarray: ...


class NumpyMemoryMixin:
    """For backends whose arrays are numpy: memory read and transfers done here."""

    def read_memory(self, mem_keys, mem_values, query_key, top_k):
        return read_memory(np.concatenate(mem_keys, axis=1), np.concatenate(mem_values, axis=2), query_key, top_k)

    def to_device(self, array):
        return array

    def to_host(self, x):
        return np.asarray(x)


# The switches that turn this engine's propagation into the published one.
PUBLISHED = {"skip_absent": False, "early_stop": False, "crop": False}


@dataclass
class PropagationConfig:
    top_k: int = 20
    mem_every: int = 5
    max_memory: int = 200  # frames per organ and pass, the reference included
    temp_slot: bool = False  # STCN keeps the last frame as a temporary slot; see README (cost)
    skip_absent: bool = True
    early_stop: bool = True
    patience: int = 2
    min_pixels: int = 4  # at model resolution: fewer pixels above 0.5 counts as vanished
    crop: bool = True
    margin: int = 1  # cells of the key grid around the mask's bounding box
    min_cells: int = 4  # smallest window side, in cells
    key_batch: int = 8
    # One decoder / value-encoder call for all live organs on the union of their windows
    # (cheaper where calls cost more than the pixels: small inputs, GPUs), instead of
    # one call per organ on its own window (cheaper where compute dominates).
    batch_organs: bool = False
    # The `reliable` and `fused` pipeline modes (app.predict): a sampled slice is a reference
    # for an organ when the organ covers at least `reliable_fraction` of its largest area on
    # the sampled slices and the two CPS members' masks of it agree (DSC) at least
    # `reliable_agreement`; `fuse_weight` is STCN's share when fused with interpolation.
    reliable_fraction: float = 0.2
    reliable_agreement: float = 0.5
    fuse_weight: float = 0.5

    def to_json(self) -> dict:
        return asdict(self)

    def with_overrides(self, overrides: dict) -> "PropagationConfig":
        """A copy with ``overrides`` applied; values may be strings (``--propagation-option``)
        and are converted to each field's type. An unknown key or a bad value is a ValueError
        naming it."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        values = {}
        for key, value in overrides.items():
            if key not in fields:
                raise ValueError(f"unknown propagation setting {key!r} (known: {', '.join(fields)})")
            values[key] = _convert(key, value, type(getattr(self, key)))
        return dataclasses.replace(self, **values)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(key: str, value, kind: type):
    """``value`` (a string from the command line, or already typed) as ``kind``."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE + _FALSE:
            return str(value).lower() in _TRUE
    elif kind is int and not isinstance(value, bool):
        try:
            if float(value) == int(float(value)):
                return int(float(value))
        except (TypeError, ValueError):
            pass
    elif kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"propagation setting {key}={value!r} is not a {kind.__name__}")


def read_memory(mem_keys: np.ndarray, mem_values: np.ndarray, query_key: np.ndarray, top_k: int) -> np.ndarray:
    """STCN memory read.

    mem_keys (Ck, M), mem_values (O, Cv, M), query_key (Ck, P) -> readout (O, Cv, P).
    Affinity = (2 k_m . k_q - |k_m|^2) / sqrt(Ck) (negative squared distance; the |k_q|^2
    term cancels in the softmax), top-k over the memory axis, softmax over those k.
    """
    ck, m = mem_keys.shape
    a = 2.0 * (mem_keys.T @ query_key) - np.einsum("cm,cm->m", mem_keys, mem_keys)[:, None]
    a *= 1.0 / math.sqrt(ck)  # (M, P)
    k = min(top_k, m)
    if k < m:
        idx = np.argpartition(-a, k - 1, axis=0)[:k]  # (k, P)
        top = np.take_along_axis(a, idx, axis=0)
    else:
        idx, top = None, a
    top = top - top.max(axis=0, keepdims=True)
    w = np.exp(top)
    w /= w.sum(axis=0, keepdims=True)  # (k, P)
    if idx is None:
        return np.einsum("ocm,mp->ocp", mem_values, w)
    gathered = mem_values[:, :, idx]  # (O, Cv, k, P)
    return np.einsum("ockp,kp->ocp", gathered, w)


def aggregate(probs: np.ndarray) -> np.ndarray:
    """Soft aggregation: (O, H, W) organ probabilities -> (O+1, H, W) normalised, background first."""
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    bg = np.prod(1 - p, axis=0, keepdims=True)
    stacked = np.concatenate([bg, p], axis=0)
    logits = np.log(stacked / (1 - stacked))
    logits -= logits.max(axis=0, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=0, keepdims=True)


def organ_distribution(probs: np.ndarray) -> np.ndarray:
    """(O, H, W) independent organ probabilities (the engine's votes) -> (O+1, H, W) a
    distribution, background = prod(1 - p) first, normalised per pixel."""
    p = np.clip(probs, 0, 1)
    dist = np.concatenate([np.prod(1 - p, axis=0, keepdims=True), p], axis=0)
    return dist / np.maximum(dist.sum(axis=0, keepdims=True), 1e-7)


def normalised_entropy(dist: np.ndarray) -> np.ndarray:
    """(K, H, W) non-negative scores -> (H, W) entropy of their normalisation, in 0..1."""
    dist = dist / np.maximum(dist.sum(axis=0, keepdims=True), 1e-7)
    ent = -(dist * np.log(np.maximum(dist, 1e-7))).sum(axis=0)
    return (ent / np.log(dist.shape[0])).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


Window = tuple[int, int, int, int]  # y0, y1, x0, x1 in key-grid cells


@dataclass
class _OrganState:
    organ: int
    window: Window
    memory: MemoryBank
    alive: bool = True
    misses: int = 0


class PropagationEngine:
    """Per-volume propagation state and schedule.

    ``get_slices(indices) -> (B, 3, H, W)`` supplies windowed slices at model resolution.
    ``references`` maps slice index -> (H, W) integer mask (0 = background, 1..C organs).
    """

    def __init__(self, backend: StageBackend, config: PropagationConfig | None = None, num_organs: int = 13):
        self.backend = backend
        self.cfg = config or PropagationConfig()
        self.num_organs = num_organs
        # per-run state: every field is set afresh by run() (see _start), so that nothing
        # carries over from one volume to the next
        self.stats = PropagationStats()
        self._cache: FeatureCache | None = None
        self._stride, self._hw, self._grid = 0, (0, 0), (0, 0)
        self._refs: dict[int, np.ndarray] = {}
        self._weights: dict[int, np.ndarray] | None = None
        self._votes = np.zeros((0, num_organs), np.float64)
        self._entries: dict[int, list] = defaultdict(list)

    # ---- windows --------------------------------------------------------------------
    def _full_window(self) -> Window:
        return (0, self._grid[0], 0, self._grid[1])

    def _window_of(self, mask: np.ndarray) -> Window | None:
        """Window (in cells) around the pixels of a (H, W) boolean mask, or None if empty."""
        if not self.cfg.crop:
            return self._full_window()
        ys, xs = np.nonzero(mask.any(axis=1)), np.nonzero(mask.any(axis=0))
        if ys[0].size == 0:
            return None
        s, m = self._stride, self.cfg.margin
        gh, gw = self._grid
        y0, y1 = ys[0][0] // s - m, ys[0][-1] // s + 1 + m
        x0, x1 = xs[0][0] // s - m, xs[0][-1] // s + 1 + m
        y0, y1 = self._fit(y0, y1, gh)
        x0, x1 = self._fit(x0, x1, gw)
        return (y0, y1, x0, x1)

    def _fit(self, a: int, b: int, n: int) -> tuple[int, int]:
        need = min(self.cfg.min_cells, n)
        if b - a < need:
            c = (a + b) // 2
            a, b = c - need // 2, c - need // 2 + need
        a, b = max(0, a), min(n, b)
        if b - a < need:
            a, b = (0, need) if a == 0 else (n - need, n)
        return int(a), int(b)

    @staticmethod
    def _crop(x: np.ndarray, win: Window, scale: int) -> np.ndarray:
        y0, y1, x0, x1 = win
        return x[..., y0 * scale : y1 * scale, x0 * scale : x1 * scale]

    # ---- memory -------------------------------------------------------------------
    @staticmethod
    def _union(wins: list[Window]) -> Window:
        return (min(w[0] for w in wins), max(w[1] for w in wins), min(w[2] for w in wins), max(w[3] for w in wins))

    def _encode_frames(self, feats: dict, items: list[tuple[Window, np.ndarray, np.ndarray]]) -> list[Frame]:
        """Memory frames for (window, target, others) items of one slice: one value-encoder
        call per item, or (``batch_organs``) one call for all on the union of their windows."""
        if not items:
            return []
        s, dev = self._stride, self.backend.to_device
        groups = [items] if self.cfg.batch_organs else [[it] for it in items]
        frames = []
        for group in groups:
            win = self._union([w for w, _, _ in group])
            masks = np.stack([self._crop(t, win, s) for _, t, _ in group])
            others = np.stack([self._crop(o, win, s) for _, _, o in group])
            with self.stats.timer("value_encode"):
                values = self.backend.encode_value(
                    self._crop(feats["image"], win, s), self._crop(feats["f16"], win, 1),
                    dev(np.ascontiguousarray(masks, dtype=np.float32)),
                    dev(np.ascontiguousarray(others, dtype=np.float32)),
                )
            self.stats.value_encodes += 1
            area = (win[1] - win[0]) * (win[3] - win[2])
            self.stats.value_cells += area * len(group)
            keys = self._crop(feats["key"][0], win, 1)
            keys = keys.reshape(keys.shape[0], -1)
            for i in range(len(group)):
                frames.append(Frame(keys, values[i : i + 1].reshape(1, values.shape[1], -1)))
        return frames

    def _decode(self, feats: dict, s8, s4, group: list[_OrganState]) -> list[tuple[Window, np.ndarray]]:
        """Read memory and decode a group of organs on the union of their windows."""
        win = self._union([st.window for st in group])
        qk = self._crop(feats["key"][0], win, 1)
        h, w = qk.shape[1:]
        qk = qk.reshape(qk.shape[0], -1)
        readouts = []
        with self.stats.timer("read_memory"):
            for st in group:
                frames = st.memory.readable()
                r = self.backend.read_memory([f.keys for f in frames], [f.values for f in frames], qk, self.cfg.top_k)
                readouts.append(r.reshape(1, -1, h, w))
        readout = readouts[0] if len(readouts) == 1 else getattr(self.backend, "concat", self._stack)(readouts)
        with self.stats.timer("decode"):
            logits = self.backend.to_host(self.backend.decode(
                readout, self._crop(feats["qv"], win, 1), self._crop(s8, win, 2), self._crop(s4, win, 4)))
        self.stats.decodes += 1
        self.stats.decoded_cells += h * w * len(group)
        self.stats.full_cells += self._grid[0] * self._grid[1] * len(group)
        return [(win, sigmoid(logits[i, 0])) for i in range(len(group))]

    @staticmethod
    def _stack(xs: list):
        if isinstance(xs[0], np.ndarray):
            return np.concatenate(xs, axis=0)
        raise TypeError("a backend with its own tensors must stack them: give it a concat() method")

    # ---- one pass -----------------------------------------------------------------
    def _pass(self, ref: int, stop: int, direction: int, lo: int, hi: int, far: int | None = None) -> None:
        """Propagate from reference slice ``ref`` to ``stop`` (inclusive), one direction.

        ``far``: the reference at the other end of a two-sided range; with reference weights
        a vote's weight falls linearly from ``ref`` to ``far``."""
        ref_mask = self._refs[ref]
        rel = None if self._weights is None else self._weights[ref]
        steps = range(ref + direction, stop + direction, direction)

        def weight(t: int, organ: int) -> float:
            if rel is None:
                return 1.0
            w = float(rel[organ - 1])
            return w * abs(far - t) / abs(far - ref) if far is not None else w

        total = np.isin(ref_mask, np.arange(1, self.num_organs + 1)).astype(np.float32)
        states: list[_OrganState] = []
        items = []
        for o in range(1, self.num_organs + 1):
            target = (ref_mask == o).astype(np.float32)
            present = bool(target.any())
            if rel is not None and (rel[o - 1] <= 0 or not present):
                if not present and rel[o - 1] > 0:  # reliably absent here: votes 0 on the way
                    for t in steps:
                        self._votes[t, o - 1] += weight(t, o)
                continue  # unreliable here: no vote
            if not present and self.cfg.skip_absent:
                continue
            win = self._window_of(target > 0) or self._full_window()
            states.append(_OrganState(o, win, MemoryBank(self.cfg.max_memory)))
            items.append((win, target, total - target))
        if not states:
            return
        feats = self._cache.get(ref, direction, lo, hi)
        for st, frame in zip(states, self._encode_frames(feats, items)):
            frame.is_ref = True
            st.memory.add(frame)
        for n_step, t in enumerate(steps, start=1):
            live = [st for st in states if st.alive]
            for st in states:
                if not st.alive:
                    self._votes[t, st.organ - 1] += weight(t, st.organ)
            if not live:
                continue
            feats = self._cache.get(t, direction, lo, hi)
            s8, s4 = self._cache.skips(feats)
            groups = [live] if self.cfg.batch_organs else [[st] for st in live]
            decoded = [d for g in groups for d in self._decode(feats, s8, s4, g)]
            # soft aggregation on a canvas, so overlapping organs compete as in STCN
            with self.stats.timer("aggregate"):
                canvas = np.zeros((len(live),) + self._hw, np.float32)
                for i, (win, prob) in enumerate(decoded):
                    y0, y1, x0, x1 = (v * self._stride for v in win)
                    canvas[i, y0:y1, x0:x1] = prob
                agg = aggregate(canvas)[1:]
                total = agg.sum(axis=0)
            is_mem = n_step % self.cfg.mem_every == 0
            want_frames = t != stop and (is_mem or self.cfg.temp_slot)
            pending: list[tuple[_OrganState, Window]] = []
            items = []
            for i, st in enumerate(live):
                p = agg[i]
                win = decoded[i][0]
                y0, y1, x0, x1 = (v * self._stride for v in win)
                w = weight(t, st.organ)
                self._entries[t].append((st.organ, win, p[y0:y1, x0:x1].astype(np.float16), w))
                self._votes[t, st.organ - 1] += w
                fg = p > 0.5
                if self.cfg.early_stop and int(fg.sum()) < self.cfg.min_pixels:
                    st.misses += 1
                    if st.misses >= self.cfg.patience:
                        st.alive = False
                        st.memory.set_temp(None)
                        continue
                else:
                    st.misses = 0
                st.window = self._window_of(fg) or st.window
                if want_frames:
                    pending.append((st, st.window))
                    items.append((st.window, p, total - p))
            for (st, _), frame in zip(pending, self._encode_frames(feats, items)):
                if is_mem:
                    st.memory.add(frame)
                else:
                    st.memory.set_temp(frame)

    # ---- the volume ---------------------------------------------------------------
    def run(
        self,
        num_slices: int,
        hw: tuple[int, int],
        get_slices: Callable[[list[int]], np.ndarray],
        references: dict[int, np.ndarray],
        reference_probs: dict[int, np.ndarray] | None = None,
        reference_weights: dict[int, np.ndarray] | None = None,
    ) -> "PropagationResult":
        """Propagate the reference masks through ``num_slices`` slices of size ``hw``.

        Without ``reference_weights`` every pass that carries an organ casts one vote per
        slice (the mean of their probabilities decides). With them (reference slice ->
        (num_organs,) weights, every reference given) votes are weighted: an organ present
        on a reference with weight w is propagated from it and votes w, scaled inside a
        two-sided range by the distance to the other end (linear, as interpolation would);
        an organ absent from a reference with weight w > 0 votes 0 with that weight (it is
        known to be absent there); an organ with weight 0 is neither propagated nor voted."""
        if not references:
            raise ValueError("propagation needs at least one reference slice")
        s = self.backend.stride
        if hw[0] % s or hw[1] % s:
            raise ValueError(f"model input {hw} is not a multiple of the key stride {s}")
        self.stats = PropagationStats()
        self._stride, self._hw, self._grid = s, tuple(hw), (hw[0] // s, hw[1] // s)
        self._cache = FeatureCache(self.backend, get_slices, self.cfg.key_batch, self._grid[0] * self._grid[1],
                                   self.stats)
        self._refs = {int(k): np.asarray(v) for k, v in references.items()}
        self._votes = np.zeros((num_slices, self.num_organs), np.float64)
        self._weights = None
        if reference_weights is not None:
            self._weights = {int(k): np.asarray(v, np.float64) for k, v in reference_weights.items()}
            if set(self._weights) != set(self._refs):
                raise ValueError("reference_weights must give a weight vector for every reference slice")
        self._entries = defaultdict(list)
        refs = sorted(self._refs)
        if refs[0] < 0 or refs[-1] >= num_slices:
            raise ValueError(f"reference slices {refs} outside 0..{num_slices - 1}")
        # r_0 -> 0
        if refs[0] > 0:
            self._pass(refs[0], 0, -1, 0, refs[0])
        self._cache.evict_below(refs[0])
        for a, b in zip(refs[:-1], refs[1:]):
            if b - a > 1:
                self._pass(a, b - 1, +1, a, b, far=b)
                self._pass(b, a + 1, -1, a, b, far=a)
            self._cache.evict_below(b)
        if refs[-1] < num_slices - 1:
            self._pass(refs[-1], num_slices - 1, +1, refs[-1], num_slices - 1)
        self._cache.clear()
        return PropagationResult(
            num_slices, tuple(hw), self.num_organs, self._refs, reference_probs or {},
            dict(self._entries), self._votes, self.stats, s,
        )


@dataclass
class PropagationResult:
    """Sparse per-slice organ probabilities at model resolution; composed per slice on demand."""

    num_slices: int
    hw: tuple[int, int]
    num_organs: int
    references: dict[int, np.ndarray]
    reference_probs: dict[int, np.ndarray]  # slice -> (C+1, H, W) probabilities, optional
    entries: dict[int, list]
    votes: np.ndarray  # (num_slices, num_organs) summed vote weights
    stats: PropagationStats
    stride: int

    def organ_probs(self, t: int) -> np.ndarray:
        """(num_organs, H, W) float32 probabilities of slice t at model resolution."""
        out = np.zeros((self.num_organs,) + self.hw, np.float32)
        if t in self.references:
            if t in self.reference_probs:
                return np.asarray(self.reference_probs[t][1:], np.float32)
            m = self.references[t]
            for o in range(1, self.num_organs + 1):
                out[o - 1] = m == o
            return out
        ids, p = self.compact_probs(t)
        out[ids - 1] = p
        return out

    def compact_probs(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(organ ids, (k, H, W) probabilities) of the organs that have any vote on slice t."""
        if t in self.references:
            full = self.organ_probs(t)
            ids = np.nonzero(full.reshape(self.num_organs, -1).max(axis=1) > 0)[0]
            return ids + 1, full[ids]
        entries = self.entries.get(t, [])
        ids = sorted({e[0] for e in entries})
        out = np.zeros((len(ids),) + self.hw, np.float32)
        row = {o: i for i, o in enumerate(ids)}
        s = self.stride
        for organ, (y0, y1, x0, x1), p, w in entries:
            out[row[organ], y0 * s : y1 * s, x0 * s : x1 * s] += p if w == 1.0 else w * p.astype(np.float32)
        votes = self.votes[t, np.asarray(ids, int) - 1] if ids else np.zeros(0)
        out /= np.where(votes > 0, votes, 1.0)[:, None, None]
        return np.asarray(ids, int), out

    def entropy(self, t: int, out_hw: tuple[int, int] | None = None) -> np.ndarray:
        """Normalised entropy (0..1) of slice t's [background, organs] distribution."""
        p = np.clip(self.organ_probs(t), 0, 1)
        if out_hw is not None and tuple(out_hw) != self.hw:
            p = np.clip(resize_stack(p, tuple(out_hw)), 0, 1)
        return normalised_entropy(np.concatenate([np.prod(1 - p, axis=0, keepdims=True), p], axis=0))

    def labels(self, t: int, out_hw: tuple[int, int] | None = None) -> np.ndarray:
        """Label slice t (uint8), resized to ``out_hw`` before the argmax when given."""
        if t in self.references and t not in self.reference_probs and out_hw in (None, self.hw):
            return self.references[t].astype(np.uint8)
        ids, p = self.compact_probs(t)
        if not len(ids):
            return np.zeros(out_hw or self.hw, np.uint8)
        bg = np.prod(1 - np.clip(p, 0, 1), axis=0, keepdims=True)
        win = argmax_resized(np.concatenate([bg, p], axis=0), tuple(out_hw or self.hw))
        return np.concatenate([[0], ids]).astype(np.uint8)[win]

"""Propagation engine mechanics with a stand-in backend whose output is known exactly."""
import numpy as np
import pytest

from app.propagation import NumpyMemoryMixin, PropagationConfig, PropagationEngine, aggregate, read_memory


class CopyBackend(NumpyMemoryMixin):
    """Keys are the cell's (y, x) position, values the cell's mask: with top-1 the readout
    copies the memory mask at the same position. Decoding gates on the image: where the
    image's channel 0 is dark the organ vanishes."""

    stride = 4

    def __init__(self):
        self.decoded_shapes = []

    def _pool(self, x):
        b, c, h, w = x.shape
        s = self.stride
        return x.reshape(b, c, h // s, s, w // s, s).mean(axis=(3, 5))

    def encode_key(self, images):
        b, _, h, w = images.shape
        gy, gx = np.meshgrid(np.arange(h // 4), np.arange(w // 4), indexing="ij")
        key = np.broadcast_to(np.stack([gy, gx]).astype(np.float32) * 10, (b, 2, h // 4, w // 4)).copy()
        qv = self._pool(images[:, :1])
        return {"key": key, "qv": qv, "f16": qv.copy(), "f8": np.zeros((b, 1, h // 2, w // 2), np.float32),
                "f4": np.zeros((b, 1, h, w), np.float32)}

    def skip_features(self, f8, f4):
        return f8, f4

    def encode_value(self, image, f16, masks, others):
        return self._pool(masks[:, None])

    def decode(self, readout, qv, s8, s4):
        self.decoded_shapes.append(readout.shape[-2:])
        gate = qv > 0.5
        logits = np.where(gate, 20 * (readout - 0.5), -20.0)
        return np.repeat(np.repeat(logits, 4, axis=2), 4, axis=3).astype(np.float32)


def volume(n=16, hw=(32, 32), dark_from=None):
    img = np.ones((n, 3, *hw), np.float32)
    if dark_from is not None:
        img[dark_from:] = 0
    return img


def ref_mask(hw=(32, 32)):
    m = np.zeros(hw, np.uint8)
    m[4:12, 4:16] = 1  # organ 1, cell aligned
    m[20:28, 16:24] = 3  # organ 3
    return m


def run(engine_cfg, refs, n=16, dark_from=None):
    vol = volume(n, dark_from=dark_from)
    backend = CopyBackend()
    engine = PropagationEngine(backend, PropagationConfig(top_k=1, **engine_cfg), num_organs=13)
    res = engine.run(n, (32, 32), lambda idx: vol[idx], refs)
    return res, backend, engine


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("crop", [True, False])
def test_copy_backend_propagates_reference_everywhere(crop, batch):
    m = ref_mask()
    res, backend, _ = run({"crop": crop, "margin": 1, "min_cells": 2, "batch_organs": batch}, {5: m})
    for t in range(16):
        assert np.array_equal(res.labels(t), m), t
    if batch:  # one decoder call per slice for both organs
        assert len(backend.decoded_shapes) == 15
    if crop and not batch:  # windows hug the organs: never the full 8 x 8 grid
        assert all(tuple(s) != (8, 8) for s in backend.decoded_shapes)
    elif not crop:
        assert all(tuple(s) == (8, 8) for s in backend.decoded_shapes)


@pytest.mark.parametrize("batch", [False, True])
def test_two_references_both_directions_and_vote_counts(batch):
    m = ref_mask()
    res, _, _ = run({"batch_organs": batch}, {3: m, 10: m})
    # slices strictly between the references get a vote from each direction
    assert all(res.votes[t, 0] == 2 for t in range(4, 10))
    assert all(res.votes[t, 0] == 1 for t in list(range(0, 3)) + list(range(11, 16)))
    assert res.votes[:, 1].sum() == 0  # organ 2 never present: never decoded, never voted


def test_organ_only_in_second_reference_comes_from_backward_pass():
    a = ref_mask()
    b = ref_mask()
    b[20:28, 16:24] = 0
    b[12:20, 24:32] = 5  # organ 5 only in the later reference
    a_only = a.copy()
    res, _, _ = run({}, {2: a_only, 12: b})
    mid = res.labels(7)
    assert (mid == 5).sum() == 64  # from the backward pass alone, not out-voted
    assert (mid == 1).sum() == 96
    # organ 3 carried only forward from slice 2 to 11, and it is present in slice 7
    assert (mid == 3).sum() == 64


def test_skip_absent_saves_decodes():
    m = ref_mask()
    skip, _, _ = run({}, {5: m})
    full, _, _ = run({"skip_absent": False, "early_stop": False}, {5: m})
    assert skip.stats.decodes == 2 * 15
    assert full.stats.decodes == 13 * 15
    assert np.array_equal(skip.labels(0), full.labels(0))


@pytest.mark.parametrize("batch", [False, True])
def test_early_stop_ends_vanished_organs_and_votes_zero(batch):
    m = ref_mask()
    res, _, _ = run({"patience": 2, "batch_organs": batch}, {3: m}, n=16, dark_from=8)
    assert res.labels(7).any() and not res.labels(12).any()
    # forward pass 4..15: decodes on 4..9 (two misses at 8, 9), then stops; backward 2..0
    assert res.stats.decodes == (1 if batch else 2) * (6 + 3)
    assert res.votes[15, 0] == 1  # the stopped pass still votes (zero)
    never, _, _ = run({"early_stop": False}, {3: m}, n=16, dark_from=8)
    assert never.stats.decodes == 2 * 15


def test_keys_encoded_once_per_slice_across_directions():
    m = ref_mask()
    res, _, _ = run({"key_batch": 4}, {3: m, 10: m}, n=16)
    assert res.stats.key_encodes == 16


def test_memory_cap_evicts_oldest_non_reference():
    m = ref_mask()
    res, _, engine = run({"mem_every": 1, "max_memory": 3}, {0: m}, n=10)
    assert all(np.array_equal(res.labels(t), m) for t in range(10))


def test_read_memory_matches_dense_softmax_when_k_covers_memory(rng):
    mk = rng.normal(size=(8, 30)).astype(np.float32)
    mv = rng.normal(size=(2, 5, 30)).astype(np.float32)
    qk = rng.normal(size=(8, 7)).astype(np.float32)
    a = -((mk[:, :, None] - qk[:, None, :]) ** 2).sum(0) / np.sqrt(8)
    w = np.exp(a - a.max(0)) / np.exp(a - a.max(0)).sum(0)
    np.testing.assert_allclose(read_memory(mk, mv, qk, top_k=30), np.einsum("ocm,mp->ocp", mv, w), atol=1e-5)
    # top-k keeps only the k best memory positions for each query position
    r1 = read_memory(mk, mv, qk, top_k=1)
    np.testing.assert_allclose(r1, mv[:, :, a.argmax(0)], atol=1e-6)


def test_aggregate_is_a_distribution_with_background_first():
    p = np.array([[[0.9]], [[0.2]]], np.float32)
    agg = aggregate(p)
    assert agg.shape == (3, 1, 1)
    np.testing.assert_allclose(agg.sum(0), 1, atol=1e-6)
    assert agg[1, 0, 0] > agg[2, 0, 0] > 0 and agg.argmax(0)[0, 0] == 1


def test_bad_arguments():
    backend = CopyBackend()
    engine = PropagationEngine(backend)
    with pytest.raises(ValueError, match="at least one reference"):
        engine.run(4, (32, 32), lambda i: volume(4)[i], {})
    with pytest.raises(ValueError, match="multiple of the key stride"):
        engine.run(4, (30, 32), lambda i: volume(4)[i], {0: ref_mask()})


def test_memory_bank_keeps_references_and_evicts_the_oldest_other_frame():
    from app.memory import Frame, MemoryBank

    bank = MemoryBank(max_frames=3)
    ref = Frame("k0", "v0", is_ref=True)
    bank.add(ref)
    bank.set_temp(Frame("t", "t"))
    frames = [Frame(f"k{i}", f"v{i}") for i in range(1, 5)]
    bank.add(frames[0])
    assert bank.temp is None  # a memory frame replaces the temporary slot
    for f in frames[1:]:
        bank.add(f)
    assert bank.frames == [ref, frames[2], frames[3]] and len(bank) == 3
    bank.set_temp(frames[0])
    assert bank.readable() == [ref, frames[2], frames[3], frames[0]]


def test_feature_cache_encodes_each_slice_once_in_batches_and_evicts():
    from app.memory import FeatureCache, PropagationStats

    backend, stats = CopyBackend(), PropagationStats()
    calls = []

    def get(idx):
        calls.append(list(idx))
        return volume(10)[idx]

    cache = FeatureCache(backend, get, batch=4, grid_cells=64, stats=stats)
    cache.get(2, +1, 0, 9)
    cache.get(4, +1, 0, 9)  # already there
    cache.get(7, -1, 0, 9)  # backwards: 7, 6 (5..2 done or beyond)
    assert calls == [[2, 3, 4, 5], [7, 6]] and stats.key_encodes == 6
    s8, _ = cache.skips(cache.get(3, +1, 0, 9))
    assert cache.skips(cache.get(3, +1, 0, 9))[0] is s8 and stats.skip_encodes == 1 and stats.skip_cells == 64
    cache.evict_below(5)
    assert 4 not in cache and 5 in cache and len(cache) == 3


def test_engine_state_is_per_run():
    """A reused engine gives the same labels and the same (not accumulated) stats."""
    m = ref_mask()
    vol = volume(16)
    engine = PropagationEngine(CopyBackend(), PropagationConfig(top_k=1), num_organs=13)
    first = engine.run(16, (32, 32), lambda idx: vol[idx], {3: m, 10: m})
    second = engine.run(16, (32, 32), lambda idx: vol[idx], {3: m, 10: m})
    assert first.stats is not second.stats
    assert first.stats.to_json()["decodes"] == second.stats.to_json()["decodes"] > 0
    assert first.stats.key_encodes == second.stats.key_encodes == 16
    assert all(np.array_equal(first.labels(t), second.labels(t)) for t in range(16))

"""Pinned outputs of the propagation engine: label hashes of seeded runs recorded before the
engine's refactoring (memory bank and feature cache moved to app/memory.py, weighted votes),
so that any change to what the engine computes for the existing schedules fails here.

The stand-in backend is numpy only (no ONNX Runtime), so the figures do not depend on a
runtime's kernels; it is soft (probabilities, not copies) so that windows, eviction, the
temporary slot and the votes all change the labels when they change."""
import hashlib

import numpy as np
import pytest

from app.propagation import PUBLISHED, NumpyMemoryMixin, PropagationConfig, PropagationEngine


class SoftBackend(NumpyMemoryMixin):
    """Keys: cell position plus a little of the image; values: the mask pooled per cell;
    decoding: the readout shifted by the image's brightness, upsampled, so organs drift,
    shrink and vanish along z the way a real volume makes them."""

    stride = 4

    def _pool(self, x):
        b, c, h, w = x.shape
        return x.reshape(b, c, h // 4, 4, w // 4, 4).mean(axis=(3, 5))

    def encode_key(self, images):
        b, _, h, w = images.shape
        gy, gx = np.meshgrid(np.arange(h // 4), np.arange(w // 4), indexing="ij")
        pos = np.broadcast_to(np.stack([gy, gx]).astype(np.float32), (b, 2, h // 4, w // 4))
        key = np.concatenate([pos * 3, self._pool(images[:, :1]) * 2], axis=1)
        qv = self._pool(images[:, :1])
        return {"key": key.astype(np.float32), "qv": qv, "f16": qv.copy(),
                "f8": np.zeros((b, 1, h // 2, w // 2), np.float32), "f4": np.zeros((b, 1, h, w), np.float32)}

    def skip_features(self, f8, f4):
        return f8, f4

    def encode_value(self, image, f16, masks, others):
        return (self._pool(masks[:, None]) - 0.3 * self._pool(others[:, None])).astype(np.float32)

    def decode(self, readout, qv, s8, s4):
        logits = 12 * (readout - 0.35) + 3 * (qv - 0.5)
        return np.repeat(np.repeat(logits, 4, axis=2), 4, axis=3).astype(np.float32)


def seeded_case(seed=3, n=20, hw=(32, 32)):
    rng = np.random.default_rng(seed)
    z = np.arange(n)[:, None, None]
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    img = 0.5 + 0.4 * np.sin(0.3 * z + 0.2 * yy[None] + 0.1 * xx[None]) + 0.05 * rng.standard_normal((n, *hw))
    vol = np.repeat(img[:, None].astype(np.float32), 3, axis=1)
    refs = {}
    for t in (4, 13):
        m = np.zeros(hw, np.uint8)
        for organ in (1, 2, 6):
            y, x = rng.integers(2, hw[0] - 12, 2)
            dy, dx = rng.integers(4, 11, 2)
            m[y : y + dy, x : x + dx] = organ
        refs[t] = m
    return vol, refs


def labels_hash(cfg: dict, refs_at=(4, 13)) -> str:
    vol, refs = seeded_case()
    engine = PropagationEngine(SoftBackend(), PropagationConfig(top_k=3, **cfg), num_organs=13)
    res = engine.run(len(vol), (32, 32), lambda idx: vol[np.asarray(idx)], {t: refs[t] for t in refs_at})
    labels = np.stack([res.labels(t) for t in range(len(vol))])
    return hashlib.sha256(labels.tobytes()).hexdigest()[:16]


PINNED = {
    "default": ({}, (4, 13)),
    "published": (dict(PUBLISHED), (4, 13)),
    "batched": ({"batch_organs": True}, (4, 13)),
    "memory": ({"mem_every": 1, "max_memory": 3, "temp_slot": True, "margin": 0, "min_cells": 2}, (4, 13)),
    "one_reference": ({"patience": 1}, (13,)),
}
HASHES = {
    "default": "70ec1c4a3b1936ba",
    "published": "fc2fae90978ca3b0",
    "batched": "9f437cf2444b636c",
    "memory": "9e03454c7cfd6a76",
    "one_reference": "d42dbe0781ca2840",
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_engine_outputs_unchanged(name):
    cfg, refs_at = PINNED[name]
    assert labels_hash(cfg, refs_at) == HASHES[name]


def test_pinned_runs_are_not_trivial():
    """Each pinned run differs from the others: the switches matter to its labels."""
    hashes = [labels_hash(cfg, at) for cfg, at in PINNED.values()]
    assert len(set(hashes)) == len(hashes)

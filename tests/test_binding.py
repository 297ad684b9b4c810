"""ONNX Runtime I/O binding (app.binding), run on the CPU provider: the code the CUDA provider
runs, with device 'cpu'. Device arrays index, crop, reshape and join exactly as numpy does;
propagation with features kept on the device gives exactly the unbound path's numbers; and
the only arrays that come back to the host are the decoder's logits."""
from __future__ import annotations

import numpy as np
import pytest

from app import binding
from app.backends import load_backends
from app.binding import ConcatCache, DeviceArray, DeviceContext
from app.bundle import load_bundle
from app.propagation import PUBLISHED, PropagationConfig, PropagationEngine


@pytest.fixture
def ctx():
    return DeviceContext(["CPUExecutionProvider"], "cpu", 0, threads=1)


def test_helper_models_are_valid_onnx():
    onnx = pytest.importorskip("onnx", reason="the onnx package (training extras) checks the hand-written protobuf")
    for model in (binding.slice_model(np.float32, 4), binding.slice_model(np.float16, 2),
                  binding.concat_model(np.float32, 3, -1)):
        onnx.checker.check_model(onnx.load_from_string(model), full_check=True)
    attr = onnx.load_from_string(binding.concat_model(np.float32, 2, -1)).graph.node[0].attribute[0]
    assert (attr.name, attr.i) == ("axis", -1)


def test_device_arrays_index_like_numpy_and_leading_views_copy_nothing(ctx):
    x = np.random.default_rng(0).standard_normal((3, 4, 10, 12)).astype(np.float32)
    d = ctx.upload(x)
    views = [np.s_[1:2], np.s_[2], np.s_[0:3], np.s_[..., 0:10, 0:12]]
    got = [d[index] for index in views]
    assert ctx.helper_calls == 0 and all(g.value is d.value for g in got)  # the same allocation, at an offset
    for g, index in zip(got, views):
        assert g.shape == x[index].shape and np.array_equal(g.numpy(), x[index]), index
    for index in (np.s_[..., 2:5, 3:9], np.s_[1:3, :, 4:6], np.s_[0, :, 1:2, :]):
        got = d[index]
        assert got.value is not d.value and np.array_equal(got.numpy(), x[index]), index
    keys = d[1][..., 2:7, 1:4].reshape(4, -1)
    assert np.array_equal(keys.numpy(), x[1, :, 2:7, 1:4].reshape(4, -1))
    assert np.array_equal(ctx.stack0([d[2:3], x[0:2]]).numpy(), np.concatenate([x[2:3], x[0:2]]))
    with pytest.raises(IndexError):
        d[..., ::2]


def test_joins_grow_by_one_concat_per_new_frame(ctx):
    rng = np.random.default_rng(1)
    frames = [ctx.upload(rng.standard_normal((1, 5, n)).astype(np.float32)) for n in (6, 4, 9, 3)]
    cache = ConcatCache(ctx)
    for n in range(1, 5):
        before = ctx.helper_calls
        got = cache.join(frames[:n], axis=2)
        assert np.array_equal(got.numpy(), np.concatenate([f.numpy() for f in frames[:n]], axis=2))
        assert ctx.helper_calls - before == (0 if n == 1 else 1)
    before = ctx.helper_calls
    cache.join(frames, axis=2)
    assert ctx.helper_calls == before  # read again, nothing joined
    swapped = frames[:3] + [ctx.upload(np.ones((1, 5, 2), np.float32))]  # a new temporary slot:
    before = ctx.helper_calls                                                # cut back, one join
    assert np.array_equal(cache.join(swapped, axis=2).numpy(), np.concatenate([f.numpy() for f in swapped], axis=2))
    assert ctx.helper_calls - before == 2
    evicted = [frames[0]] + frames[2:]  # the oldest non-reference frame evicted: joined afresh
    assert np.array_equal(cache.join(evicted, axis=2).numpy(),
                          np.concatenate([f.numpy() for f in evicted], axis=2))


def _case(n=14, hw=(128, 128), seed=4):
    rng = np.random.default_rng(seed)
    z = np.arange(n)[:, None, None]
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    img = 0.5 + 0.3 * np.sin(0.4 * z + 0.07 * yy[None] + 0.05 * xx[None]) + 0.05 * rng.standard_normal((n, *hw))
    vol = np.repeat(img[:, None].astype(np.float32), 3, axis=1)
    refs = {}
    for t in (3, 10):
        m = np.zeros(hw, np.uint8)
        for organ, (y, x, h, w) in zip((1, 2, 6), ((10, 12, 40, 30), (60, 70, 30, 45), (90, 20, 20, 20))):
            m[y + t : y + t + h, x : x + w] = organ
        refs[t] = m
    return vol, refs


def _run(stcn, cfg):
    vol, refs = _case()
    result = PropagationEngine(stcn, cfg).run(len(vol), vol.shape[2:], lambda idx: vol[idx], refs)
    probs = np.stack([result.organ_probs(t) for t in range(len(vol))])
    return probs, result.votes, result.stats


@pytest.mark.parametrize("read", ["graph", "numpy"])
def test_bound_propagation_equals_unbound_and_keeps_features_on_the_device(tiny_bundle, read, monkeypatch):
    bundle = load_bundle(tiny_bundle)
    _, plain, info = load_backends(bundle, device="cpu", threads=1, io_binding="off", memory_read=read)
    _, bound, bound_info = load_backends(bundle, device="cpu", threads=1, io_binding="on", memory_read=read)
    assert (info["io_binding"], bound_info["io_binding"]) == (False, True)
    assert bound_info["memory_read"] == ("onnx" if read == "graph" else "numpy")
    graph_reads = []
    if read == "graph":
        real_read = bound.read
        bound.read = lambda *xs: graph_reads.append(xs[0].shape[1]) or real_read(*xs)
    to_host = []
    real = DeviceArray.numpy
    monkeypatch.setattr(DeviceArray, "numpy", lambda self: to_host.append(self.shape) or real(self))
    configs = [PropagationConfig(early_stop=False), PropagationConfig(batch_organs=True, temp_slot=True, mem_every=2),
               PropagationConfig().with_overrides(PUBLISHED)]
    for cfg in configs:
        to_host.clear()
        want_p, want_v, want_stats = _run(plain, cfg)
        got_p, got_v, got_stats = _run(bound, cfg)
        assert got_stats.decodes == want_stats.decodes > 0 and got_stats.value_encodes == want_stats.value_encodes
        assert np.array_equal(got_v, want_v)
        assert np.array_equal(got_p, want_p), f"bound != unbound: max {np.abs(got_p - want_p).max()}"
        # image features (4-D) never come back; logits (O,1,H,W) do, and for the numpy read
        # (or a memory shorter than the graph's top_k) memory frames and query keys (2-D, 3-D)
        assert to_host and all(len(s) < 4 or s[1] == 1 for s in to_host), set(to_host)
    if read == "graph":  # memories of at least top_k entries were read by the graph, on the device
        assert graph_reads and min(graph_reads) >= bound.read_top_k


def test_predict_options_reach_the_backends(tiny_bundle):
    """``flare22 predict --io-binding on --memory-read graph`` (PredictOptions) binds on the CPU
    too, and labels a volume exactly as the unbound numpy-read default does."""
    from app.predict import PredictOptions, Predictor

    bundle = load_bundle(tiny_bundle)
    vol = np.random.default_rng(2).normal(40, 200, (10, 64, 64)).astype(np.float32)
    runs = {}
    for binding, read in (("auto", "auto"), ("on", "numpy"), ("on", "graph")):
        pred = Predictor(bundle, PredictOptions(mode="published", device="cpu", threads=1, io_binding=binding,
                                                memory_read=read))
        runs[binding, read] = (pred.info, pred.predict_volume(vol)[0])
    info = {k: (v[0]["io_binding"], v[0]["memory_read"]) for k, v in runs.items()}
    assert info == {("auto", "auto"): (False, "numpy"), ("on", "numpy"): (True, "numpy"), ("on", "graph"): (True, "onnx")}
    assert np.array_equal(runs["auto", "auto"][1], runs["on", "numpy"][1])

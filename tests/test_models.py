"""Reference networks and STCN: shapes, exact stage semantics, sizes, ONNX parity of each exported graph."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torchvision

from training.losses import OhemLovaszLoss
from training.models import REFERENCE_CONFIGS, STCN_CONFIGS, build_reference_pair, build_stcn
import export.bundle as xb
from export.graphs import GRAPHS, Dims, stcn_channels
from training.models.reference import ReferencePair, TransUNet, count_parameters
from training.models.stcn import STCN, aggregate, freeze_batchnorm, topk_read

TINY = 128


# --------------------------------------------------------------------------- reference pair


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    return build_reference_pair("tiny")


def test_tiny_pair_shapes_and_position_input_changes_output(tiny_pair):
    image = torch.rand(2, 3, TINY, TINY)
    for net in tiny_pair:
        net.eval()
        with torch.no_grad():
            low = net(image, torch.tensor([0.1, 0.1]))
            high = net(image, torch.tensor([0.9, 0.9]))
        assert low.shape == (2, 14, TINY, TINY)
        assert torch.isfinite(low).all()
        assert (low - high).abs().max() > 1e-4, type(net).__name__


def test_tiny_pair_is_small_and_trains(tiny_pair):
    for net in tiny_pair:
        assert count_parameters(net) < 1_000_000
        net.train()
        logits = net(torch.rand(2, 3, TINY, TINY), torch.rand(2))
        logits.logsumexp(1).mean().backward()
        grads = [p.grad for p in net.parameters() if p.requires_grad]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
        net.zero_grad()


def test_registry_errors_name_the_known_configs():
    with pytest.raises(KeyError, match="paper"):
        build_reference_pair("huge")
    with pytest.raises(KeyError, match="tiny"):
        build_stcn("huge")
    net = TransUNet(REFERENCE_CONFIGS["tiny"].transunet)
    with pytest.raises(ValueError, match="128x128"):
        net(torch.rand(1, 3, 64, 64), torch.rand(1))


def test_paper_parameter_counts():
    transunet, deeplab = build_reference_pair("paper")
    # REFERENCE section 5: about 105.9 M and 11.7 M.
    assert count_parameters(transunet) == pytest.approx(105.9e6, rel=0.005)
    assert count_parameters(deeplab) == pytest.approx(11.7e6, rel=0.005)
    stcn = build_stcn("paper")
    # REFERENCE section 6: 54.4 M = key 8.5 + value 21.7 + projection 0.6 + compression 4.7
    # + decoder 18.9 (paper table 3: 54,416,065, with CBAM).
    assert count_parameters(stcn) == pytest.approx(54.4e6, rel=0.002)
    parts = {
        "key_encoder": 8.5e6,
        "value_encoder": 21.7e6,
        "key_proj": 0.59e6,
        "key_comp": 4.7e6,
        "decoder": 18.9e6,
    }
    for name, expected in parts.items():
        assert count_parameters(getattr(stcn, name)) == pytest.approx(expected, rel=0.01), name


def test_reference_pair_sums_the_members_softmax(tiny_pair):
    pair = ReferencePair(*tiny_pair).eval()
    x, p = torch.rand(2, 3, TINY, TINY), torch.rand(2)
    with torch.no_grad():
        probs, pa, pb = pair(x, p)
        want_a = torch.softmax(tiny_pair[0](x, p), 1)
    assert torch.allclose(pa, want_a, atol=1e-6) and torch.allclose(probs, pa + pb, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.full((2, TINY, TINY), 2.0), atol=1e-5)


# --------------------------------------------------------------------------- STCN


@pytest.fixture(scope="module")
def tiny_stcn() -> STCN:
    torch.manual_seed(0)
    return build_stcn("tiny").eval()


@pytest.fixture(scope="module")
def tiny_features(tiny_stcn):
    image = torch.rand(1, 3, TINY, TINY)
    with torch.no_grad():
        key, qv, f16, f8, f4 = tiny_stcn.encode_key(image)
        s8, s4 = tiny_stcn.skip_features(f8, f4)
    return dict(image=image, key=key, qv=qv, f16=f16, f8=f8, f4=f4, s8=s8, s4=s4)


def test_paper_trunks_are_torchvision_resnets_up_to_layer3():
    stcn = build_stcn("paper")
    r50 = {k: v.shape for k, v in torchvision.models.resnet50(weights=None).state_dict().items()}
    r50 = {k: v for k, v in r50.items() if not k.startswith(("layer4", "fc"))}
    assert {k: v.shape for k, v in stcn.key_encoder.state_dict().items()} == r50
    r18 = {k: v.shape for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    r18 = {k: v for k, v in r18.items() if not k.startswith(("layer4", "fc"))}
    r18["conv1.weight"] = torch.Size([64, 5, 7, 7])  # image + mask + other masks
    assert {k: v.shape for k, v in stcn.value_encoder.trunk.state_dict().items()} == r18
    # Key projection: orthogonal rows, zero bias.
    w = stcn.key_proj.weight.flatten(1)
    assert torch.allclose(w @ w.T, torch.eye(w.shape[0]), atol=1e-4)
    assert stcn.key_proj.bias.abs().max() == 0


def test_stage_shapes(tiny_stcn, tiny_features):
    cfg = tiny_stcn.cfg
    f = tiny_features
    h = TINY // 16
    assert f["key"].shape == (1, cfg.key_dim, h, h)
    assert f["qv"].shape == (1, cfg.value_dim, h, h)
    assert f["f16"].shape == (1, tiny_stcn.key_encoder.channels[2], h, h)
    assert f["f8"].shape[-2:] == (2 * h, 2 * h) and f["f4"].shape[-2:] == (4 * h, 4 * h)
    masks = (torch.rand(3, TINY, TINY) > 0.5).float()
    with torch.no_grad():
        values = tiny_stcn.encode_value(f["image"], f["f16"], masks)
        readout = tiny_stcn.read_memory(f["key"][0].unsqueeze(1), values.unsqueeze(2), f["key"][0])
        logits = tiny_stcn.decode(readout, f["qv"], f["s8"], f["s4"])
    assert values.shape == (3, cfg.value_dim, h, h)
    assert readout.shape == (3, cfg.value_dim, h, h)
    assert logits.shape == (3, 1, TINY, TINY)


def test_encode_value_others_default_is_sum_of_the_other_masks(tiny_stcn, tiny_features):
    f = tiny_features
    masks = torch.rand(3, TINY, TINY)
    others = torch.stack([sum(masks[j] for j in range(3) if j != i) for i in range(3)])
    with torch.no_grad():
        implicit = tiny_stcn.encode_value(f["image"], f["f16"], masks)
        explicit = tiny_stcn.encode_value(f["image"], f["f16"], masks, others)
        swapped = tiny_stcn.encode_value(f["image"], f["f16"], masks, others.flip(0))
    assert torch.allclose(implicit, explicit, atol=1e-5)
    assert (implicit - swapped).abs().max() > 1e-4  # the others channel is really used


def test_objects_are_independent_batch_entries(tiny_stcn, tiny_features):
    f = tiny_features
    masks = (torch.rand(3, TINY, TINY) > 0.5).float()
    others = masks.sum(0, keepdim=True) - masks
    readout = torch.randn(3, tiny_stcn.cfg.value_dim, TINY // 16, TINY // 16)
    with torch.no_grad():
        values = tiny_stcn.encode_value(f["image"], f["f16"], masks)
        logits = tiny_stcn.decode(readout, f["qv"], f["s8"], f["s4"])
        for i in range(3):
            one_v = tiny_stcn.encode_value(f["image"], f["f16"], masks[i : i + 1], others[i : i + 1])
            one_l = tiny_stcn.decode(readout[i : i + 1], f["qv"], f["s8"], f["s4"])
            assert torch.allclose(values[i : i + 1], one_v, atol=1e-5)
            assert torch.allclose(logits[i : i + 1], one_l, atol=1e-5)


def test_decode_equals_unsplit_decoder(tiny_stcn, tiny_features):
    """skip_features + decode == STCN's decoder with the skip convolutions inside."""
    f, d = tiny_features, tiny_stcn.decoder
    readout = torch.randn(2, tiny_stcn.cfg.value_dim, TINY // 16, TINY // 16)
    up = lambda x, s: torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear")  # noqa: E731
    with torch.no_grad():
        x = d.compress(torch.cat([readout, f["qv"].expand(2, -1, -1, -1)], 1))
        x = d.fuse8(d.skip8(f["f8"]) + up(x, 2))
        x = d.fuse4(d.skip4(f["f4"]) + up(x, 2))
        expected = up(d.pred(torch.relu(x)), 4)
        got = tiny_stcn.decode(readout, f["qv"], f["s8"], f["s4"])
    assert torch.allclose(got, expected, atol=1e-5)


def _memory(ck=8, t=3, o=2, cv=5, hw=(4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(ck, t, *hw, generator=g),
        torch.randn(o, cv, t, *hw, generator=g),
        torch.randn(ck, *hw, generator=g),
    )


def test_read_memory_with_all_positions_is_softmax_of_negative_squared_distance(tiny_stcn):
    mk, mv, qk = _memory()
    ck, n = mk.shape[0], mk[0].numel()
    dist2 = torch.cdist(mk.reshape(ck, -1).T, qk.reshape(ck, -1).T) ** 2  # (N, HW)
    weights = torch.softmax(-dist2 / ck**0.5, dim=0)
    expected = (mv.flatten(2) @ weights).reshape(2, 5, 4, 4)
    for method in ("dense", "gather"):
        got = tiny_stcn.read_memory(mk, mv, qk, top_k=n, method=method)
        assert torch.allclose(got, expected, atol=1e-5), method


def test_read_memory_top_1_copies_the_nearest_memory_value(tiny_stcn):
    mk, mv, qk = _memory()
    ck = mk.shape[0]
    nearest = torch.cdist(mk.reshape(ck, -1).T, qk.reshape(ck, -1).T).argmin(0)  # (HW,)
    expected = mv.flatten(2)[:, :, nearest].reshape(2, 5, 4, 4)
    assert torch.allclose(tiny_stcn.read_memory(mk, mv, qk, top_k=1), expected, atol=1e-6)


def test_read_memory_layouts_methods_and_numpy_engine_agree(tiny_stcn):
    from app.propagation import read_memory as numpy_read_memory

    mk, mv, qk = _memory(t=4, hw=(5, 5))
    dense = tiny_stcn.read_memory(mk, mv, qk, top_k=7)
    gather = tiny_stcn.read_memory(mk, mv, qk, top_k=7, method="gather")
    flat = tiny_stcn.read_memory(mk.flatten(1), mv.flatten(2), qk.flatten(1), top_k=7)
    assert torch.allclose(dense, gather, atol=1e-5)
    assert torch.allclose(dense.flatten(2), flat, atol=1e-6)
    engine = numpy_read_memory(mk.flatten(1).numpy(), mv.flatten(2).numpy(), qk.flatten(1).numpy(), 7)
    assert np.allclose(engine, flat.numpy(), atol=1e-5)


def test_aggregate_is_log_odds_of_background_and_objects():
    p = torch.tensor([[[0.2, 1.0]], [[0.5, 0.0]]])  # (O=2, 1, 2)
    logits = aggregate(p)
    assert logits.shape == (3, 1, 2)
    background = torch.tensor([[[0.8 * 0.5, 0.0]]])
    expected = torch.logit(torch.cat([background, p]).clamp(1e-7, 1 - 1e-7))
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.isfinite(logits).all()
    assert STCN.aggregate(p.movedim(0, 1), dim=1).movedim(1, 0).allclose(logits)


def test_freeze_batchnorm_keeps_statistics_and_stops_gradients():
    net = build_stcn(dataclasses.replace(STCN_CONFIGS["tiny"], freeze_bn=True)).train()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    assert net.key_encoder.conv1.training  # everything else trains
    before = bns[0].running_mean.clone()
    net.encode_key(torch.rand(2, 3, TINY, TINY))
    assert torch.equal(before, bns[0].running_mean)
    # Without freezing, the same layer's statistics move.
    free = build_stcn("tiny").train()
    bn = next(m for m in free.modules() if isinstance(m, torch.nn.BatchNorm2d))
    free.encode_key(torch.rand(2, 3, TINY, TINY))
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert freeze_batchnorm(free) == len(bns)


def test_training_forward_propagates_a_clip_and_backpropagates():
    torch.manual_seed(0)
    net = build_stcn("tiny").train()
    frames = torch.rand(2, 3, 3, TINY, TINY)
    first = torch.zeros(2, 2, TINY, TINY)
    first[:, 0, 20:60, 20:60] = 1
    first[:, 1, 70:100, 60:90] = 1
    logits = net(frames, first)
    assert logits.shape == (2, 2, 3, TINY, TINY)  # frames 1, 2; background + 2 objects
    target = torch.zeros(2, 2, TINY, TINY, dtype=torch.long)
    target[:, :, 20:60, 20:60] = 1
    target[:, :, 70:100, 60:90] = 2
    loss = OhemLovaszLoss()(logits.flatten(0, 1), target.flatten(0, 1))
    loss.backward()
    for part in (net.key_encoder.conv1, net.key_proj, net.value_encoder.trunk.conv1, net.decoder.pred):
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(GRAPHS))
def test_exported_graph_matches_onnxruntime(name, tmp_path):
    """Each graph through the production export path (export.graphs + export.bundle) and
    its parity check: ONNX Runtime against torch at the table's two parity cases."""
    torch.manual_seed(0)
    a, b = build_reference_pair("tiny")
    net = build_stcn("tiny")
    graph = GRAPHS[name]
    module = graph.module(a, b, net).eval()
    dims = Dims((TINY, TINY), stcn_channels(net.cfg))
    example = graph.sample(dims, np.random.default_rng(0), graph.example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xb.export_onnx(graph, module, example, dims, tmp_path / "g.onnx")
    row = xb.check_parity(graph, module, tmp_path / "g.onnx", dims, seed=1)
    assert row["ok"] and row["max_abs_diff"] <= xb.ATOL, row
    assert not any(m.training for m in module.modules())  # export leaves the graph in eval mode


def test_topk_read_batched_equals_one_memory_at_a_time():
    """The training forward reads a batch of memories with the same function."""
    g = torch.Generator().manual_seed(0)
    mk, mv, qk = torch.randn(3, 8, 50, generator=g), torch.randn(3, 2, 6, 50, generator=g), torch.randn(3, 8, 9, generator=g)
    batched = topk_read(mk, mv, qk, 7)
    for i in range(3):
        assert torch.allclose(batched[i], topk_read(mk[i], mv[i], qk[i], 7), atol=1e-5)
        assert torch.allclose(batched[i], topk_read(mk[i], mv[i], qk[i], 7, method="gather"), atol=1e-5)


@pytest.mark.slow  # 13 s on two idle cores, over 20 s on a busy machine
def test_paper_networks_run_one_512_slice():
    torch.manual_seed(0)
    image, position = torch.rand(1, 3, 512, 512), torch.rand(1)
    with torch.no_grad():
        for net in build_reference_pair("paper"):
            assert net.eval()(image, position).shape == (1, 14, 512, 512)
        stcn = build_stcn("paper").eval()
        key, qv, f16, f8, f4 = stcn.encode_key(image)
        assert (key.shape, qv.shape, f16.shape) == ((1, 64, 32, 32), (1, 512, 32, 32), (1, 1024, 32, 32))
        assert (f8.shape, f4.shape) == ((1, 512, 64, 64), (1, 256, 128, 128))
        s8, s4 = stcn.skip_features(f8, f4)
        values = stcn.encode_value(image, f16, (torch.rand(2, 512, 512) > 0.5).float())
        readout = stcn.read_memory(key[0].unsqueeze(1), values.unsqueeze(2), key[0])
        logits = stcn.decode(readout, qv, s8, s4)
    assert values.shape == (2, 512, 32, 32) and logits.shape == (2, 1, 512, 512)

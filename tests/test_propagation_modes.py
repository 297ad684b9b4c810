"""The pipeline's modes (app.predict.MODES): settings, reliability, the engine's weighted
votes, and every mode end to end on a phantom with the session's tiny random bundle."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.bundle import load_bundle
from app.errors import Flare22Error
from app.predict import (DEFAULT_MODE, MODES, PredictOptions, Predictor, member_dice, reliability,
                         resolve_settings, sample_candidates)
from app.propagation import PropagationConfig, PropagationEngine

from .test_propagation import CopyBackend, ref_mask, volume

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# settings


def test_with_overrides_types_and_unknown_keys():
    cfg = PropagationConfig()
    got = cfg.with_overrides({"top_k": "7", "crop": "false", "reliable_fraction": "0.5", "early_stop": False})
    assert (got.top_k, got.crop, got.reliable_fraction, got.early_stop) == (7, False, 0.5, False)
    assert cfg.top_k == 20 and cfg.crop is True  # the original is untouched
    with pytest.raises(ValueError, match="'top_kk'"):
        cfg.with_overrides({"top_kk": 3})
    with pytest.raises(ValueError, match="top_k='many' is not a int"):
        cfg.with_overrides({"top_k": "many"})
    with pytest.raises(ValueError, match="crop='maybe' is not a bool"):
        cfg.with_overrides({"crop": "maybe"})
    assert not hasattr(PropagationConfig, "published")  # dead: the published switches live in PUBLISHED


def test_resolve_settings_order_command_line_over_manifest_over_default():
    manifest = {"sampling": {"every": 5, "max": 64, "mode": "interp"}, "propagation": {"top_k": 9}}
    mode, sampling, cfg = resolve_settings(manifest, None, {})
    assert (mode, sampling, cfg.top_k) == ("interp", {"every": 5, "max": 64}, 9)
    mode, sampling, cfg = resolve_settings(manifest, "reliable", {"every": "2", "top_k": 4})
    assert (mode, sampling["every"], cfg.top_k) == ("reliable", 2, 4)
    assert resolve_settings({"sampling": {"every": 5, "max": 64}}, None, {})[0] == DEFAULT_MODE
    assert resolve_settings({}, "propagate", {})[0] == "largest"  # the old name
    _, _, pub = resolve_settings(manifest, "published", {})
    assert (pub.skip_absent, pub.early_stop, pub.crop) == (False, False, False)
    for bad, match in (({"every": 0}, "every=0"), ({"max": "x"}, "max='x'"), ({"nope": 1}, "'nope'")):
        with pytest.raises(ValueError, match=match):
            resolve_settings(manifest, None, bad)
    with pytest.raises(ValueError, match="unknown mode 'sideways'"):
        resolve_settings(manifest, "sideways", {})


def test_member_dice_and_reliability():
    pa = np.zeros((4, 2, 4), np.float32)
    pb = np.zeros_like(pa)
    pa[0], pb[0] = 1, 1
    pa[1, :, :2], pa[0, :, :2] = 2, 0  # member a: organ 1 on 4 pixels
    pb[1, 0, :2], pb[0, 0, :2] = 2, 0  # member b: organ 1 on 2 of them
    pb[2, 1, 3], pb[0, 1, 3] = 2, 0  # member b alone: organ 2 on 1 pixel
    np.testing.assert_allclose(member_dice(pa, pb, 3), [2 * 2 / 6, 0.0, 1.0])
    areas = np.array([[100, 0, 5], [40, 0, 50], [10, 0, 50]])
    dsc = np.array([[0.9, 1.0, 0.9], [0.3, 1.0, 0.8], [0.9, 1.0, 0.8]])
    w = reliability(areas, dsc, fraction=0.2, agreement=0.5)
    # organ 1: reliable at 0 (its DSC), disputed at 1, too small at 2; organ 2 absent: votes 0
    # with weight 1 everywhere; organ 3: too small at 0, reliable at 1 and 2
    np.testing.assert_allclose(w, [[0.9, 1, 0], [0, 1, 0.8], [0, 1, 0.8]])


# ---------------------------------------------------------------------------------------
# the engine's weighted votes


def weighted_run(refs, weights, n=16):
    vol = volume(n)
    engine = PropagationEngine(CopyBackend(), PropagationConfig(top_k=1, min_cells=2), num_organs=13)
    return engine.run(n, (32, 32), lambda idx: vol[idx], refs, reference_weights=weights)


def test_weighted_votes_fall_linearly_towards_a_reference_without_the_organ():
    m = ref_mask()
    empty = np.zeros_like(m)
    ones = np.ones(13)
    res = weighted_run({2: m, 10: empty}, {2: ones, 10: ones})
    for t in range(3, 10):  # forward from 2 carries organ 1 with weight (10-t)/8, backward votes 0
        p = res.organ_probs(t)[0]
        assert p[6, 6] == pytest.approx((10 - t) / 8, abs=1e-3), t
        assert res.votes[t, 0] == pytest.approx(1.0)
    assert res.labels(5)[6, 6] == 1 and res.labels(7)[6, 6] == 0  # the organ ends half-way
    assert not res.labels(12).any()  # beyond the empty reference: known absent


def test_weight_zero_neither_propagates_nor_votes():
    m = ref_mask()
    w_a = np.ones(13)
    w_a[0] = 0.0  # organ 1 disputed on the first reference
    res = weighted_run({2: m, 10: m}, {2: w_a, 10: np.ones(13)})
    for t in range(3, 10):  # organ 1 only from the backward pass, at full strength
        assert res.organ_probs(t)[0][6, 6] == pytest.approx(1.0, abs=1e-3)
        assert res.votes[t, 0] == pytest.approx((t - 2) / 8)
    assert (res.labels(1) == 1).sum() == 0 and (res.labels(1) == 3).sum() == 64
    with pytest.raises(ValueError, match="every reference"):
        weighted_run({2: m, 10: m}, {2: w_a})


# ---------------------------------------------------------------------------------------
# every mode end to end


@pytest.fixture(scope="module")
def phantom_volume():
    from evaluation.phantom import generate

    return generate(5, (23, 64, 64)).image


@pytest.fixture(scope="module")
def mode_runs(tiny_bundle, phantom_volume):
    bundle = load_bundle(tiny_bundle)
    runs = {}
    for mode in MODES:
        opt = PredictOptions(mode=mode, device="cpu", threads=1, uncertainty=True, propagation={"every": 3})
        runs[mode] = Predictor(bundle, opt).predict_volume(phantom_volume)
    return runs


def test_every_mode_runs_and_reports(mode_runs, phantom_volume):
    cands = sample_candidates(23, 3).tolist()
    for mode, (labels, report) in mode_runs.items():
        assert labels.shape == phantom_volume.shape and labels.dtype == np.uint8, mode
        assert report["mode"] == mode
        if mode != "dense":
            assert report["sampled"] == cands, mode
        assert ("propagation" in report) == (mode in ("largest", "published", "reliable", "fused")), mode
        if mode in ("reliable", "fused"):
            assert set(map(int, report["references"])) == set(cands)
        u = report.get("uncertainty_map")
        if mode != "dense":
            assert u.shape == labels.shape and u.dtype == np.uint8, mode  # 0 = certain .. 255


def test_sampled_slices_keep_the_pair_and_baselines_fill_between(mode_runs):
    dense = mode_runs["dense"][0]
    cands = sample_candidates(23, 3)
    for mode in ("interp", "nearest", "shape", "reliable", "fused"):
        assert np.array_equal(mode_runs[mode][0][cands], dense[cands]), mode
    nearest = mode_runs["nearest"][0]
    for t in range(23):
        near = cands[np.abs(cands - t).argmin()]
        assert np.array_equal(nearest[t], dense[near]), t
    # interpolation: ends copy the nearest sampled slice (the last sample is 22 = N - 1)
    assert cands[0] == 0 and cands[-1] == 22
    assert not np.array_equal(mode_runs["interp"][0], nearest)  # it does blend somewhere
    pub = mode_runs["published"][1]["propagation"]
    assert pub["decoded_cells"] == pub["full_cells"]


def test_bundle_default_mode_and_bad_manifest_mode(tiny_bundle, tmp_path):
    bundle = load_bundle(tiny_bundle)
    bundle.manifest = {**bundle.manifest, "sampling": {**bundle.manifest["sampling"], "mode": "nearest"}}
    assert Predictor(bundle, PredictOptions(device="cpu", threads=1)).mode == "nearest"
    assert Predictor(bundle, PredictOptions(mode="interp", device="cpu", threads=1)).mode == "interp"
    bundle.manifest["sampling"]["mode"] = "sideways"
    with pytest.raises(Flare22Error, match="unknown mode 'sideways'"):
        Predictor(bundle, PredictOptions(device="cpu", threads=1))


def test_cli_mode_and_bad_propagation_option(tiny_bundle, phantom_cases, tmp_path):
    def predict(*extra):
        return subprocess.run([sys.executable, "-m", "flare22", "predict", "-i", str(phantom_cases), "-o",
                               str(tmp_path / "out"), "--bundle", str(tiny_bundle), "--threads", "1", "--quiet",
                               *extra], cwd=REPO, capture_output=True, text=True, timeout=300)

    bad = predict("--propagation-option", "top_kk=3")
    assert bad.returncode == 2 and "unknown propagation setting 'top_kk'" in bad.stderr
    assert "Traceback" not in bad.stderr
    ok = predict("--mode", "interp", "--propagation-option", "every=2")
    assert ok.returncode == 0, ok.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "Phantom_0001.json").read_text())
    assert report["mode"] == "interp" and report["sampled"] == sample_candidates(24, 2).tolist()


# ---------------------------------------------------------------------------------------
# cost accounting and the mode table


def test_cost_model_counts_every_mode_and_scales_cells():
    from evaluation.benchmark import cost_model

    macs = {"reference": 2e9, "stcn_key": 1e9, "stcn_skip": 1e6, "stcn_value": 3e6, "stcn_decode": 5e6}
    assert cost_model(macs, {"mode": "dense"}, 10) == {"reference": 20.0}
    assert cost_model(macs, {"mode": "interp", "sampled": [0, 5, 9]}, 10) == {"reference": 6.0}
    prop = {"key_encodes": 7, "skip_cells": 100, "value_cells": 20, "decoded_cells": 300}
    got = cost_model(macs, {"mode": "reliable", "sampled": [0, 9], "propagation": prop}, 10, cell_scale=16)
    assert got == pytest.approx({"reference": 4.0, "key_encode": 7.0, "skip": 1.6, "value_encode": 0.96,
                                 "decode": 24.0})


@pytest.mark.slow
def test_mode_table_script(tiny_bundle, tmp_path):
    out = tmp_path / "table"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "mode_table.py"), "--bundle", str(tiny_bundle),
                           "--phantoms", "1", "--no-real", "--no-paper", "--repeats", "1", "--out", str(out),
                           "--variants", "dense", "nearest:every=5", "interp:every=3"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "mode_table.json").read_text())
    s = res["summary"]["phantoms"]
    assert list(s) == ["dense", "nearest:every=5", "interp:every=3"]
    assert s["dense"]["time_ratio"] == 1.0 and s["dense"]["gmac_ratio"] == 1.0
    # the pair on every 5th / 3rd of 48 slices: a fifth / a third of dense's counted GMAC
    assert s["nearest:every=5"]["gmac_ratio"] == pytest.approx(9 / 48)
    assert s["interp:every=3"]["gmac_ratio"] == pytest.approx(16 / 48)
    assert all(0 <= v["dsc"] <= 1 for v in s.values())
    assert "| interp:every=3 |" in (out / "mode_table.md").read_text()


def test_shape_interpolation_moves_and_ends_organs():
    """The pipeline's ``shape`` mode and the assist share app.shapes: known slices are kept,
    a shape moves between them, an organ on one side only is gone by the midpoint."""
    from app.shapes import ShapeInterpolator

    a = np.zeros((16, 16), np.uint8)
    a[2:10, 2:10] = 1
    a[12:14, 12:14] = 2  # organ 2 only on the lower slice
    b = np.zeros_like(a)
    b[6:14, 6:14] = 1
    si = ShapeInterpolator({10: a, 14: b}, [10, 14])  # a mapping of known slices, as the pipeline passes
    assert np.array_equal(si.scores(10, 13).argmax(0), a)
    assert np.array_equal(si.scores(14, 13).argmax(0), b)
    mid = si.scores(12, 13).argmax(0)
    assert mid[8, 8] == 1 and mid[3, 3] == 0 and mid[13, 13] == 0  # the square sits half-way
    assert (mid == 1).sum() == 64  # same size, moved
    assert (si.scores(11, 13).argmax(0) == 2).any()
    assert not (mid == 2).any()  # the organ of one side shrinks away by the midpoint
    assert si.scores(11, 13).shape == (14, 16, 16) and (si.scores(11, 13)[3:] < -1e3).all()

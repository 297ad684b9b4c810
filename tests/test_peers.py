"""bench/peers.py without nnunetv2: the winner's plans built in code, the grid and tile
arithmetic, the ratio table and the argument checks. Nothing here is timed."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "peers.py")
peers = importlib.util.module_from_spec(spec)
sys.modules["bench_peers"] = peers
spec.loader.exec_module(peers)


def test_plans_are_the_winners_small_network():
    plans, dataset = peers.winner_plans(threads=2)
    cfg = plans["configurations"]["3d_fullres"]
    arch = cfg["architecture"]["arch_kwargs"]
    assert cfg["patch_size"] == [32, 128, 192]
    assert cfg["spacing"] == [4.0, 1.2, 1.2]
    assert arch["features_per_stage"] == [16, 32, 64, 128, 256]  # base 16, doubled, capped at 256
    assert arch["n_stages"] == len(arch["kernel_sizes"]) == len(arch["strides"]) == 5
    assert arch["kernel_sizes"][0] == [1, 3, 3] and all(k == [3, 3, 3] for k in arch["kernel_sizes"][1:])
    assert arch["strides"][0] == [1, 1, 1]  # the first stage does not downsample
    assert len(arch["n_conv_per_stage_decoder"]) == arch["n_stages"] - 1
    assert arch["nonlin_kwargs"]["negative_slope"] == 0.01 and arch["norm_op_kwargs"]["affine"] is True
    # the patch is divisible by the total downsampling on every axis, as nnU-Net requires
    for axis, size in enumerate(cfg["patch_size"]):
        factor = 1
        for s in arch["strides"]:
            factor *= s[axis]
        assert size % factor == 0, (axis, size, factor)
    assert len(dataset["labels"]) == peers.NUM_CLASSES == 14
    assert sorted(dataset["labels"].values()) == list(range(14))
    # the winner's resampling: trilinear in, nearest back, threads bounded as asked
    assert cfg["resampling_fn_data_kwargs"]["mode"] == "linear"
    assert cfg["resampling_fn_probabilities_kwargs"]["mode"] == "nearest"
    assert cfg["resampling_fn_probabilities_kwargs"]["num_threads"] == 2
    assert peers.winner_plans(threads=1)[0]["configurations"]["3d_fullres"]["resampling_fn_data_kwargs"][
        "num_threads"] == 1


def test_every_winner_setting_names_its_source():
    missing = [k for k in peers.WINNER if k not in peers.SOURCES]
    assert not missing
    assert all("Ziyan-Huang/FLARE22" in v and "line" in v for v in peers.SOURCES.values())


def test_grid_and_tiles_of_a_512x512x200_case():
    grid = peers.resampled_shape((200, 512, 512), (2.5, 0.8, 0.8))
    assert grid == (125, 341, 341)
    # z: ceil((125 - 32) / 16) + 1 = 7; y: ceil((341 - 128) / 64) + 1 = 5; x: ceil((341 - 192) / 96) + 1 = 3
    assert peers.tile_count(grid) == 105
    assert peers.tile_count(grid, step=1.0) == 4 * 3 * 2
    assert peers.tile_count((15, 107, 107)) == 1  # padded up to one patch
    assert peers.winner_tile_bound(grid) == 7 * 9


def test_ratio_rows_pair_the_same_case_only():
    results = [
        {"case": "a", "contender": "nnunet", "seconds": 100.0},
        {"case": "a", "contender": "ours-paper", "seconds": 50.0},
        {"case": "b", "contender": "nnunet", "seconds": 80.0},
        {"case": "b", "contender": "ours-paper", "seconds": 60.0},
        {"case": "c", "contender": "nnunet", "seconds": None},  # failed: no ratio for c
        {"case": "c", "contender": "ours-paper", "seconds": 10.0},
    ]
    (row,) = peers.ratio_rows(results, ("ours-paper",), ("nnunet",))
    assert row["per_case"] == [0.5, 0.75]
    assert row["median"] == pytest.approx(0.625)
    (empty,) = peers.ratio_rows(results[:1], ("ours-paper",), ("nnunet",))
    assert empty["per_case"] == [] and empty["median"] is None


def test_our_contender_specs():
    assert peers.ours_spec("paper") == {"name": "ours-paper", "kind": "ours", "bundle": "paper",
                                        "runtime": "ort", "precision": "fp32"}
    assert peers.ours_spec("paper/openvino")["name"] == "ours-paper-openvino"
    assert peers.ours_spec("tiny/ort/int8")["name"] == "ours-tiny-ort-int8"
    assert peers.ours_spec("tiny/openvino/int8")["precision"] == "int8"
    assert peers.ours_spec("paper/openvino/bf16")["name"] == "ours-paper-openvino-bf16"
    for bad in ("huge", "paper/tensorrt", "paper/ort/fp16", "paper/ort/fp32/x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            peers.ours_spec(bad)


@pytest.mark.parametrize("argv, message", [
    (["--threads", "3"], "--threads must be 1 or 2"),
    (["--slices", "4"], "--slices must be at least 8"),
    (["--threads", "0"], "must be at least 1"),
    (["--ours", "paper/tensorrt"], "SIZE[/RUNTIME[/PRECISION]]"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        peers.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_peer_environment_is_one_line(tmp_path, capsys):
    code = peers.main(["--peer-python", str(tmp_path / "nope" / "python"), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "make peers-setup" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing prepared before the check


def test_network_from_the_plans():
    """Needs nnunetv2 (the ``peers`` extra, `make peers-setup`): builds the network from the
    plans and checks its output and the predictor's tile count against ours."""
    pytest.importorskip("nnunetv2", reason="nnunetv2 is installed only in .venv-peers (make peers-setup)")
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, dataset = peers.winner_plans(threads=1)
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, peers.NUM_CLASSES,
                                 deep_supervision=False).eval()
    with torch.inference_mode():
        out = net(torch.zeros(1, 1, *cm.patch_size))
    assert tuple(out.shape) == (1, peers.NUM_CLASSES, *cm.patch_size)
    predictor = nnUNetPredictor(tile_step_size=peers.WINNER["tile_step_size"], device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.manual_initialization(net, pm, cm, [net.state_dict()], dataset, "peers", (0, 1, 2))
    assert len(predictor._internal_get_sliding_window_slicers((125, 341, 341))) == peers.tile_count((125, 341, 341))

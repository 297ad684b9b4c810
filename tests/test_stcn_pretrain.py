"""STCN pretraining on unlabelled slices (issue 15): masks made from the image, deformed
frames that carry their masks along, a pretraining stage that reads no label and resumes
exactly; and the demo's iteration budgets."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from evaluation.phantom import write_dataset
from training import demo
from training import train_propagation as TP
from training.data import intensity_region, load_folder, random_blob, random_warp, self_mask, warp


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    write_dataset(root / "lab", 2, seed=21)
    write_dataset(root / "unl", 2, seed=22, unlabeled=True)
    return root


def test_identity_warp_and_mask_follow_the_image():
    rng = np.random.default_rng(0)
    img = rng.random((3, 32, 32)).astype(np.float32)
    lab = np.zeros((32, 32), np.uint8)
    lab[8:16, 10:20] = 1
    ident = random_warp((32, 32), rng, rotate_deg=0, scale=(1, 1), shift=0, shear=0, elastic=0)
    i2, l2 = warp(img, lab, ident)
    assert np.allclose(i2, img, atol=1e-5) and np.array_equal(l2, lab)
    # a pure shift moves image and mask together
    coords = ident.copy()
    coords[1] -= 3  # sample 3 columns to the left: content moves right by 3
    i3, l3 = warp(img, lab, coords)
    assert np.array_equal(l3[:, 13:23], lab[:, 10:20]) and np.allclose(i3[:, :, 5:], img[:, :, 2:-3], atol=1e-5)
    w = random_warp((32, 32), np.random.default_rng(1))
    assert w.shape == (2, 32, 32) and np.abs(w - ident).max() > 0.5


def test_self_masks_have_usable_sizes():
    rng = np.random.default_rng(3)
    img = np.zeros((3, 64, 64), np.float32)
    img[:, 10:54, 10:54] = 0.5
    img[:, 20:34, 20:40] = 0.9  # a bright "organ"
    hits = [intensity_region(img, rng) for _ in range(10)]
    assert any(h is not None for h in hits)
    for h in hits:
        if h is not None:
            assert 0.003 * 64 * 64 <= h.sum() <= 0.2 * 64 * 64
    b = random_blob((64, 64), rng)
    assert 0.005 * 64 * 64 <= b.sum() <= 0.1 * 64 * 64
    assert self_mask(img, rng).dtype == bool


def test_self_mask_clips(folders, tmp_path):
    vols = load_folder(folders / "unl", labelled=False, cache_dir=tmp_path)
    s = TP.SelfMaskClipSampler(vols, seed=0)
    img, mem, tgt = s.batch(3, 64, True)
    assert img.shape == (3, 3, 3, 64, 64) and mem.shape == (3, 2, 64, 64) and tgt.shape == (3, 3, 64, 64)
    assert np.array_equal(mem[:, 0] > 0, tgt[:, 0] == 1) and np.array_equal(mem[:, 1] > 0, tgt[:, 0] == 2)
    assert (tgt[:, 0] == 1).any(axis=(1, 2)).all()  # every clip has a target
    assert set(np.unique(tgt)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="unlabelled"):
        TP.SelfMaskClipSampler([], seed=0)


def test_pretraining_stage_runs_reads_no_label_and_resumes(folders, tmp_path):
    cfg = TP.PropagationTrainConfig(model="tiny", iterations=2, pretrain_iterations=2, batch=2, val_every=1000,
                                    log_every=1, labelled=str(folders / "lab"), unlabelled=str(folders / "unl"),
                                    cache_dir=str(tmp_path / "cache"), device="cpu")
    TP.train(cfg, tmp_path / "a", progress=False)
    rows = [json.loads(r) for r in open(tmp_path / "a" / "log.jsonl")]
    stages = [r["stage"] for r in rows if r["event"] == "train"]
    assert stages == ["pretrain", "pretrain", "main", "main"]
    lrs = [r["lr"] for r in rows if r["event"] == "train"]
    assert lrs[0] == lrs[1] == lrs[2]  # the main stage's schedule starts after pretraining
    short = dataclasses.replace(cfg, val_every=2)
    TP.train(short, tmp_path / "b", progress=False, stop_after=1)
    TP.train(short, tmp_path / "b", resume=str(tmp_path / "b" / "last.pt"), progress=False)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["models"]["stcn"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["models"]["stcn"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_demo_budgets_are_iterations_and_a_folder_keeps_its_own(tmp_path):
    class A:
        quick, ref_iterations, prop_iterations, prop_pretrain_iterations, seed = False, None, None, None, 0

    full = demo.budgets(A())
    assert full["ref_iterations"] == demo.FULL["ref_iterations"] and "minutes" not in json.dumps(full)
    A.quick = True
    quick = demo.budgets(A())
    assert quick["ref_iterations"] < full["ref_iterations"] and quick["cases"]["train"] < full["cases"]["train"]
    cmds = demo.train_commands("python", tmp_path / "data", tmp_path, quick)
    for c in cmds.values():
        assert "--max-minutes" not in c and "--iterations" in c and "--seed" in c
    demo.check_budgets(tmp_path, quick)
    demo.check_budgets(tmp_path, quick)  # same budgets: reused
    with pytest.raises(SystemExit, match="other budgets"):
        demo.check_budgets(tmp_path, full)


def test_along_z_warp_grows_through_the_clip():
    rng = np.random.default_rng(4)
    img = np.repeat(rng.random((1, 3, 32, 32)).astype(np.float32), 3, axis=0)
    lab = np.zeros((3, 32, 32), np.int64)
    lab[:, 10:22, 8:20] = 2
    lab[:, 4:8, 24:30] = 5
    w_img, w_lab = TP.along_z_warp(img, lab, np.random.default_rng(0))
    assert w_img.shape == img.shape and w_lab.shape == lab.shape
    assert np.array_equal(w_img[0], img[0]) and np.array_equal(w_lab[0], lab[0])  # frame 0: the memory, untouched
    assert set(np.unique(w_lab)) <= {0, 2, 5}  # labels resampled, never blended
    change = [int((w_lab[j] != lab[0]).sum()) for j in (1, 2)]
    assert 0 < change[0] < change[1]  # half the displacement on frame 1, all of it on frame 2


def test_labelled_clips_second_object(folders, tmp_path):
    vols = load_folder(folders / "lab", labelled=True, cache_dir=tmp_path)
    warped = TP.ClipSampler(vols, seed=0, z_warp=1.0, second="rest")
    for _ in range(4):
        img, mem, tgt = warped.clip(3, 64, False)
        assert img.shape == (3, 3, 64, 64) and tgt.shape == (3, 64, 64)
        assert mem[0].any() and np.array_equal(mem[0], tgt[0] == 1) and np.array_equal(mem[1], tgt[0] == 2)
    # the same draws (same seed, no warp): "rest" makes object 2 every other organ of the
    # slices, "organ" one of them
    grew = 0
    for seed in range(6):
        _, _, one = TP.ClipSampler(vols, seed=seed, second="organ").clip(3, 64, False)
        _, _, rest = TP.ClipSampler(vols, seed=seed, second="rest").clip(3, 64, False)
        assert np.array_equal(one == 1, rest == 1)
        assert not ((one == 2) & (rest != 2)).any()
        grew += int((rest == 2).sum() > (one == 2).sum())
    assert grew >= 3


def test_view_crops_keep_the_target_organ(folders, tmp_path):
    vols = load_folder(folders / "lab", labelled=True, cache_dir=tmp_path)
    s = TP.ClipSampler(vols, seed=1, view=128)
    for _ in range(6):
        img, mem, tgt = s.clip(3, 64, False)
        assert img.shape == (3, 3, 64, 64) and tgt.shape == (3, 64, 64)
        assert mem[0].any() and np.array_equal(mem[0], tgt[0] == 1)  # the organ lies in the crop
    corners = {s._corner(np.array([40, 50]), 64, 128) for _ in range(50)}
    assert corners <= set(range(0, 41)) and len(corners) > 5  # rows 40..50 inside every crop
    assert {s._corner(np.array([0, 127]), 64, 128) for _ in range(20)} <= set(range(0, 65))  # too big: any crop inside

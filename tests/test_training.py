"""Trainers: the loss falls, --resume continues exactly, DDP runs on 2 CPU processes, and
bad training data is refused before training starts, naming the case."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from app.errors import GeometryError, InputError
from evaluation.phantom import write_dataset
from training import train_propagation as TP
from training import train_reference as TR
from training.data import load_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_dataset(root / "lab", 3, seed=11)
    write_dataset(root / "unl", 2, seed=12, unlabeled=True)
    write_dataset(root / "val", 1, seed=13)
    return root


def ref_cfg(folders, cache, **kw):
    base = dict(model="tiny", iterations=6, batch_labelled=2, batch_unlabelled=1, val_every=1000, log_every=1,
                labelled=str(folders / "lab"), unlabelled=str(folders / "unl"), cache_dir=str(cache), device="cpu")
    base.update(kw)
    return TR.ReferenceTrainConfig(**base)


def losses(log):
    import json

    return [r["loss"] for r in map(json.loads, open(log)) if r["event"] == "train"]


def test_reference_loss_falls(folders, tmp_path):
    cfg = ref_cfg(folders, tmp_path / "cache", iterations=24, lr=2e-3, augment=False, cps_weight=0.0)
    TR.train(cfg, tmp_path / "run", progress=False)
    ls = losses(tmp_path / "run" / "log.jsonl")
    assert len(ls) == 24
    assert np.mean(ls[-4:]) < 0.8 * np.mean(ls[:4])
    assert (tmp_path / "run" / "best.pt").exists()


def test_reference_resume_is_exact(folders, tmp_path):
    cfg = ref_cfg(folders, tmp_path / "cache", iterations=4, val_every=2)
    TR.train(cfg, tmp_path / "a", progress=False)
    TR.train(cfg, tmp_path / "d", progress=False, stop_after=2)  # interrupted after iteration 2
    assert torch.load(tmp_path / "d" / "last.pt", weights_only=False)["iteration"] == 2
    TR.train(cfg, tmp_path / "d", resume=str(tmp_path / "d" / "last.pt"), progress=False)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["models"]
    d = torch.load(tmp_path / "d" / "last.pt", weights_only=False)["models"]
    for net in ("a", "b"):
        for k in a[net]:
            assert torch.equal(a[net][k], d[net][k]), (net, k)


def test_reference_validation_scores_with_project_scorer(folders, tmp_path):
    cfg = ref_cfg(folders, tmp_path / "cache", iterations=2, val=str(folders / "val"), val_every=2)
    summary = TR.train(cfg, tmp_path / "run", progress=False)
    assert 0.0 <= summary["best_val_dsc"] <= 1.0
    import json

    val = [r for r in map(json.loads, open(tmp_path / "run" / "log.jsonl")) if r["event"] == "val"]
    assert val and set(val[0]["per_organ"]) <= {str(i) for i in range(1, 14)}


def test_propagation_loss_falls_and_resumes(folders, tmp_path):
    cfg = TP.PropagationTrainConfig(model="tiny", iterations=20, batch=2, lr=2e-3, val_every=1000, log_every=1,
                                    labelled=str(folders / "lab"), cache_dir=str(tmp_path / "cache"), device="cpu")
    TP.train(cfg, tmp_path / "run", progress=False)
    ls = losses(tmp_path / "run" / "log.jsonl")
    assert np.mean(ls[-5:]) < np.mean(ls[:5])
    import dataclasses

    short = dataclasses.replace(cfg, iterations=4, val_every=2, log_every=20)
    TP.train(short, tmp_path / "a", progress=False)
    TP.train(short, tmp_path / "b", progress=False, stop_after=2)
    TP.train(short, tmp_path / "b", resume=str(tmp_path / "b" / "last.pt"), progress=False)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["models"]["stcn"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["models"]["stcn"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_curriculum_rises_then_falls():
    cfg = TP.PropagationTrainConfig(iterations=100)
    skips = [TP.max_skip(i, cfg) for i in range(100)]
    assert skips[0] == 3 and max(skips) == 7 and skips[-1] == 3


def test_cps_weight_waits_for_its_start_then_ramps_to_full():
    cfg = TR.ReferenceTrainConfig(iterations=100, cps_weight=2.0, cps_start=0.5, rampup=0.2)
    ws = [TR.cps_rampup(i, cfg) for i in range(100)]
    assert ws[:50] == [0.0] * 50  # labels alone for the first half
    assert ws[50] == pytest.approx(2.0 * np.exp(-5))
    assert all(b >= a for a, b in zip(ws, ws[1:]))
    assert ws[70] == ws[99] == pytest.approx(2.0)
    at_once = TR.ReferenceTrainConfig(iterations=100, cps_weight=1.5, rampup=0.3, cps_start=0.0)
    assert TR.cps_rampup(0, at_once) == pytest.approx(1.5 * np.exp(-5))
    assert TR.cps_rampup(15, at_once) == pytest.approx(1.5 * np.exp(-1.25))
    default = TR.ReferenceTrainConfig(iterations=100)  # the measured schedule: half on labels first
    assert TR.cps_rampup(49, default) == 0.0 and TR.cps_rampup(70, default) == pytest.approx(default.cps_weight)


def test_cps_run_is_the_labelled_only_run_until_its_start(folders, tmp_path):
    """Before the CPS weight rises the unlabelled slices are left out, so a delayed-CPS run
    and a labelled-only run are the same, step for step: a paired comparison."""
    common = dict(iterations=6, val_every=3, augment=True)
    TR.train(ref_cfg(folders, tmp_path / "cache", unlabelled="", cps_weight=0.0, **common),
             tmp_path / "sup", progress=False, stop_after=3)
    TR.train(ref_cfg(folders, tmp_path / "cache", cps_start=0.5, **common), tmp_path / "cps", progress=False)
    sup = torch.load(tmp_path / "sup" / "last.pt", weights_only=False)
    cps = torch.load(tmp_path / "cps" / "last.pt", weights_only=False)
    assert sup["iteration"] == 3 and cps["iteration"] == 6
    log = [json.loads(r) for r in open(tmp_path / "cps" / "log.jsonl")]
    cps_terms = [r["cps"] for r in log if r["event"] == "train"]
    assert cps_terms[:3] == [0.0] * 3 and all(c > 0 for c in cps_terms[3:])
    # the checkpoint at iteration 3 of the CPS run is the labelled-only one
    TR.train(ref_cfg(folders, tmp_path / "cache", cps_start=0.5, **common), tmp_path / "cps3",
             progress=False, stop_after=3)
    mid = torch.load(tmp_path / "cps3" / "last.pt", weights_only=False)
    for net in ("a", "b"):
        assert all(torch.equal(sup["models"][net][k], mid["models"][net][k]) for k in sup["models"][net])


def test_cps_terms_cover_all_slices_or_the_unlabelled_ones():
    from training.losses import cross_pseudo_supervision

    torch.manual_seed(3)
    a, b = torch.randn(6, 14, 8, 8), torch.randn(6, 14, 8, 8)  # 2 labelled, then 4 unlabelled
    every = TR.cps_terms((a, b), 2, TR.ReferenceTrainConfig())
    unl = TR.cps_terms((a, b), 2, TR.ReferenceTrainConfig(cps_on="unlabelled"))
    assert torch.equal(every[0], cross_pseudo_supervision(a, b)[0])
    assert torch.equal(unl[0], cross_pseudo_supervision(a[2:], b[2:])[0])
    assert not torch.equal(every[0], unl[0])
    with pytest.raises(ValueError, match="cps_on"):
        TR.cps_terms((a, b), 2, TR.ReferenceTrainConfig(cps_on="labelled"))
    with pytest.raises(ValueError, match="cps_loss"):  # before training starts
        TR.train(TR.ReferenceTrainConfig(cps_loss="l2"), "/nonexistent/run", progress=False)


def test_ddp_two_cpu_processes(folders, tmp_path):
    env = {**os.environ, "FLARE22_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "flare22", "train-reference", "--labelled", str(folders / "lab"), "--out", str(tmp_path / "ddp"),
           "--iterations", "3", "--val-every", "3", "--device", "cpu", "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    assert state["iteration"] == 3
    import json

    start = [r for r in map(json.loads, open(tmp_path / "ddp" / "log.jsonl")) if r["event"] == "start"]
    assert start[0]["world"] == 2


def test_unlabelled_folder_given_as_labelled(folders, tmp_path):
    with pytest.raises(InputError, match="no labels/ folder"):
        load_folder(folders / "unl", labelled=True, cache_dir=tmp_path)


def test_label_out_of_range_and_grid_mismatch_name_the_case(folders, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folders / "lab", bad)
    lab_path = bad / "labels" / "Phantom_0002.nii.gz"
    lab = sitk.ReadImage(str(lab_path))
    arr = sitk.GetArrayFromImage(lab)
    arr[0, 0, 0] = 17
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(lab)
    sitk.WriteImage(out, str(lab_path))
    with pytest.raises(InputError, match="Phantom_0002") as e:
        load_folder(bad, labelled=True, cache_dir=tmp_path / "c1")
    assert "0..13" in str(e.value)
    out.SetSpacing((9.0, 9.0, 9.0))
    arr[0, 0, 0] = 0
    out2 = sitk.GetImageFromArray(arr)
    out2.SetSpacing((9.0, 9.0, 9.0))
    sitk.WriteImage(out2, str(lab_path))
    with pytest.raises(GeometryError, match="Phantom_0002"):
        load_folder(bad, labelled=True, cache_dir=tmp_path / "c2")
    (bad / "labels" / "Phantom_0003.nii.gz").unlink()
    with pytest.raises(InputError, match="Phantom_0003"):
        load_folder(bad, labelled=True, cache_dir=tmp_path / "c3")


def test_slice_weight_rules():
    from training.data import Volume, slice_weights

    lab = np.zeros((4, 8, 8), np.uint8)
    lab[0:3, 0, 0] = 1  # liver on 3 of 4 slices
    lab[1, 4, 4] = 4  # pancreas on 1
    lab[3, 2, 2] = 7  # right adrenal on 1
    vol = Volume("v", np.zeros((4, 8, 8), np.int16), lab, (1.0, 1.0, 1.0))
    small = slice_weights([vol], 3.0, rule="small")[0]
    assert small.tolist() == [1.0, 4.0, 1.0, 4.0]
    rare = slice_weights([vol], 3.0, rule="rarity")[0]
    # shares: liver 3/4, pancreas 1/4, adrenal 1/4 -> r = 1/3, 1, 1
    np.testing.assert_allclose(rare, [2.0, 4.0, 2.0, 4.0])
    with pytest.raises(ValueError, match="rule"):
        slice_weights([vol], rule="nope")

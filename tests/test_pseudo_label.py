"""Pseudo labels with uncertainty estimation: the scores on hand-made masks, the labelling
run with stand-in models of known output, real (random-weight) checkpoints and a bundle,
shards, resumption, and one tiny train -> label -> retrain cycle."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch")

from app.ctio import atomic_write_image, check_same_grid, read_ct  # noqa: E402
from app.labels import NUM_CLASSES  # noqa: E402
from evaluation.phantom import write_dataset  # noqa: E402
from app.windowing import DEFAULT_WINDOWS  # noqa: E402
from training import cycle as cyc  # noqa: E402
from training import pseudo_label as pl  # noqa: E402
from training import trainer as T  # noqa: E402
from training.data import load_folder  # noqa: E402
from training.models.reference import build_reference_pair  # noqa: E402
from training.train_reference import ReferenceTrainConfig  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine is shared: one torch thread is several times faster than two there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------
# scores on hand-made masks


def masks_1x4(*rows):
    """Masks of one 1 x 4 slice each: masks_1x4([1,1,1,1], [1,1,0,3]) -> (M, 1, 1, 4)."""
    return np.array(rows, np.uint8)[:, None, None, :]


def test_vote_plurality_and_ties_to_the_lowest_label():
    m = np.array([[0, 1, 2, 3, 5], [1, 1, 2, 0, 4], [1, 2, 9, 3, 6]], np.uint8)
    np.testing.assert_array_equal(pl.vote(m), [1, 1, 2, 3, 4])
    # M = 2: any disagreement with background is background; organ vs organ: the lower id
    np.testing.assert_array_equal(pl.vote(np.array([[0, 1, 5], [1, 0, 2]], np.uint8)), [0, 0, 2])


def test_dsc_multiclass_hand_made():
    assert pl.dsc_multiclass(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])) == pytest.approx(2 / 3, abs=1e-12)
    # organs present in either: liver Dice 1, spleen Dice 0 -> 1/2
    assert pl.dsc_multiclass(np.array([1, 3, 0]), np.array([1, 0, 0])) == pytest.approx(0.5, abs=1e-12)
    assert pl.dsc_multiclass(np.zeros(5), np.zeros(5)) is None  # both empty: no DSC
    assert pl.dsc_multiclass(np.zeros(3), np.array([0, 2, 2])) == 0.0


def test_paper_score_docstring_example_exactly():
    y1 = [1, 1, 1, 1, 0, 0]
    y2 = [1, 1, 0, 0, 3, 3]
    m = masks_1x4(y1, y2).reshape(2, 1, 1, 6)
    np.testing.assert_array_equal(pl.vote(m)[0, 0], [1, 1, 0, 0, 0, 0])
    assert pl.paper_score(m) == pytest.approx(7 / 12, abs=1e-12)


def test_paper_score_empty_slices_skip_or_one():
    # slice 0: both models liver everywhere (DSC 1, 1); slice 1: model 0 empty, model 1 a
    # liver pixel -> vote empty: pair (0, 1) empty/empty, pair (1, 1) DSC 0
    m = np.zeros((2, 2, 1, 4), np.uint8)
    m[:, 0] = 1
    m[1, 1, 0, 0] = 1
    assert pl.paper_score(m, empty_slices="skip") == pytest.approx(2 / 3, abs=1e-12)  # (1 + 1 + 0) / 3
    assert pl.paper_score(m, empty_slices="one") == pytest.approx(3 / 4, abs=1e-12)  # (1 + 1 + 1 + 0) / 4
    empty = np.zeros((3, 4, 2, 2), np.uint8)
    assert pl.paper_score(empty, empty_slices="skip") == 1.0 == pl.paper_score(empty, empty_slices="one")
    with pytest.raises(ValueError):
        pl.paper_score(m, empty_slices="zero")


def test_iou_majority_hand_made():
    # vote = [1, 1, 0, 0]; model 0 = vote; model 1 = [1, 1, 1, 0] (liver IoU 2/3);
    # model 2 = [1, 0, 0, 2]: liver IoU 1/2, kidney on an empty target 0; other organs 1
    m = masks_1x4([1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 2])
    avg = np.array([1, 1, 0, 0], np.uint8)[None, None]
    terms = 13 * 3
    expected = (terms - 4 + 1 + 2 / 3 + 1 / 2 + 0) / terms  # 35 terms of 1, then the 4 above
    assert pl.iou_majority_score(m, avg) == pytest.approx(expected, abs=1e-12)
    # the model misses an organ that the target has: 0 for that organ
    assert pl.iou_majority_score(masks_1x4([0, 0, 0, 0]), avg) == pytest.approx(12 / 13, abs=1e-12)
    assert pl.iou_majority_score(np.zeros((2, 3, 4, 4), np.uint8)) == 1.0


def test_consensus_batches_equal_one_pass(rng):
    m = rng.integers(0, 4, size=(3, 10, 6, 7)).astype(np.uint8)
    avg = pl.vote(m)
    whole = pl.Consensus(3)
    whole.update(m, avg)
    parts = pl.Consensus(3)
    for s in (slice(0, 3), slice(3, 4), slice(4, 10)):
        parts.update(m[:, s], avg[s])
    for k, v in whole.scores().items():
        assert parts.scores()[k] == pytest.approx(v, abs=1e-12)
    # per-slice loop of the definition
    per = [pl.dsc_multiclass(m[j, k], avg[k]) for k in range(10) for j in range(3)]
    assert whole.paper() == pytest.approx(np.mean([d for d in per if d is not None]), abs=1e-12)


def test_shard_arguments_and_environment():
    assert pl.parse_shard("2/8") == (2, 8)
    for bad in ("8/8", "-1/2", "1", "a/b"):
        with pytest.raises(ValueError):
            pl.parse_shard(bad)
    assert pl.shard_from_env({}) == (0, 1)
    assert pl.shard_from_env({"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)
    assert pl.shard_from_env({"RANK": "0", "WORLD_SIZE": "1", "SLURM_ARRAY_TASK_ID": "5",
                              "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1"}) == (4, 8)
    assert pl.shard_from_env({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "4",
                              "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2"}) == (3, 4)


# ---------------------------------------------------------------------------------------
# the labelling run with stand-in models of known output


class Threshold:
    """Stand-in model: organ 1 where the abdomen window exceeds t, background elsewhere."""

    def __init__(self, t: float, size=(8, 8)):
        self.t, self.input_size, self.windows = t, size, DEFAULT_WINDOWS

    def __call__(self, images, positions):
        assert images.shape[1:] == (3, *self.input_size) and positions.shape == images.shape[:1]
        fg = (images[:, 0] > self.t).astype(np.float32)
        probs = np.zeros((len(images), NUM_CLASSES, *self.input_size), np.float32)
        probs[:, 0], probs[:, 1] = 1 - fg, fg
        return probs


STANDINS = {"a": Threshold(0.5), "b": Threshold(0.5), "c": Threshold(0.6)}


def write_ct(path: Path, hu: np.ndarray) -> None:
    """A CT on a flipped, anisotropic grid (so the label must find its way back onto it)."""
    img = sitk.GetImageFromArray(hu.astype(np.int16))
    img.SetSpacing((0.8, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    atomic_write_image(img, path)


# abdomen window [-150, 250] HU: 170 -> 0.8 (a, b, c: organ), 70 -> 0.55 (a, b only), -70 -> 0.2
# paper scores: v1 1, v2 (1 + 1 + 0) / 3, v3 all empty 1, v4 c finds half: (1 + 1 + 2/3) / 3
EXPECTED = {"Case_0001": (1.0, 1.0), "Case_0002": (2 / 3, 38 / 39), "Case_0003": (1.0, 1.0),
            "Case_0004": (8 / 9, 77 / 78)}


@pytest.fixture
def standin_cases(tmp_path, monkeypatch):
    d = tmp_path / "unlabeled" / "images"
    shape = (4, 16, 16)
    hu4 = np.full(shape, 70.0)
    hu4[:, :8] = 170.0
    for i, hu in enumerate((np.full(shape, 170.0), np.full(shape, 70.0), np.full(shape, -70.0), hu4), 1):
        write_ct(d / f"Case_{i:04d}_0000.nii.gz", hu)
    calls = []

    def fake_load(path, device="auto", threads=None):
        calls.append(path)
        return STANDINS[Path(path).name]

    monkeypatch.setattr(pl, "load_model", fake_load)
    return tmp_path / "unlabeled", calls


def standin_cfg(unlabeled, out, **kw):
    return pl.PseudoLabelConfig(models=["a", "b", "c"], unlabeled=str(unlabeled), out=str(out),
                                **{"threshold": 0.8, "shard": (0, 1), "progress": False, "batch": 3, **kw})


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_scores_threshold_split_and_manifest(standin_cases, tmp_path):
    unlabeled, _ = standin_cases
    out = tmp_path / "pl"
    summary = pl.pseudo_label(standin_cfg(unlabeled, out))
    assert sorted(summary["computed"]) == sorted(EXPECTED) and summary["manifest"]["kept"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"] == {"cases": 4, "done": 4, "kept": 3, "rejected": 1,
                                                           "failed": 0, "missing": 0}
    for row in manifest["cases"]:
        paper, iou = EXPECTED[row["case"]]
        assert row["score"] == row["paper"] == pytest.approx(paper, abs=1e-12)
        assert row["iou_majority"] == pytest.approx(iou, abs=1e-12)
        assert row["kept"] == (paper >= 0.8) and row["threshold"] == 0.8 and row["score_kind"] == "paper"
        assert row["models"] == [str(Path(m).resolve()) for m in "abc"]
    fg = {r["case"]: r["foreground_voxels"] for r in manifest["cases"]}
    assert fg == {"Case_0001": 4 * 256, "Case_0002": 4 * 256, "Case_0003": 0, "Case_0004": 4 * 256}
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["kept"]) for r in rows] == [("Case_0001", "True"), ("Case_0002", "False"),
                                                      ("Case_0003", "True"), ("Case_0004", "True")]
    assert float(rows[1]["score"]) == pytest.approx(2 / 3, abs=1e-12) and rows[1]["models"].count(";") == 2
    # folders: kept -> labelled/ (image + label), rejected -> rejected/images/
    assert listing(out / "labelled" / "images") == ["Case_0001_0000.nii.gz", "Case_0003_0000.nii.gz",
                                                    "Case_0004_0000.nii.gz"]
    assert listing(out / "labelled" / "labels") == ["Case_0001.nii.gz", "Case_0003.nii.gz", "Case_0004.nii.gz"]
    assert listing(out / "rejected" / "images") == ["Case_0002_0000.nii.gz"]
    # the pseudo label lies on the input's grid and is the vote
    image = unlabeled / "images" / "Case_0004_0000.nii.gz"
    lab, lprops = read_ct(out / "labelled" / "labels" / "Case_0004.nii.gz", label=True)
    _, iprops = read_ct(image)
    check_same_grid(lprops, iprops, what="pseudo label")
    assert lab.shape == (4, 16, 16) and (lab == 1).all()
    assert (out / "labelled" / "images" / image.name).read_bytes() == image.read_bytes()
    # a labelled FLARE folder that the trainers read as it is
    vols = load_folder(out / "labelled", labelled=True, cache_dir=tmp_path / "cache")
    assert [v.name for v in vols] == ["Case_0001", "Case_0003", "Case_0004"]
    assert [int(np.asarray(v.labels).sum()) for v in vols] == [4 * 256, 0, 4 * 256]
    assert load_folder(out / "rejected", labelled=False, cache_dir=tmp_path / "cache")[0].name == "Case_0002"


def test_rerun_skips_done_volumes_and_refiles_on_a_new_threshold(standin_cases, tmp_path):
    unlabeled, calls = standin_cases
    out = tmp_path / "pl"
    pl.pseudo_label(standin_cfg(unlabeled, out))
    assert len(calls) == 3
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()}
    again = pl.pseudo_label(standin_cfg(unlabeled, out))
    assert again["computed"] == [] and len(again["skipped"]) == 4 and len(calls) == 3  # no model loaded
    assert {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()} == mtimes
    # another score and threshold: re-split from the records, no model run
    pl.pseudo_label(standin_cfg(unlabeled, out, score="iou-majority", threshold=0.99))
    assert len(calls) == 3
    assert listing(out / "labelled" / "labels") == ["Case_0001.nii.gz", "Case_0003.nii.gz"]
    assert listing(out / "rejected" / "images") == ["Case_0002_0000.nii.gz", "Case_0004_0000.nii.gz"]
    m = json.loads((out / "manifest.json").read_text())
    assert [r["kept"] for r in m["cases"]] == [True, False, True, False] and m["settings"]["score"] == "iou-majority"
    # a lost record is recomputed, and only that one
    (out / "records" / "Case_0002.json").unlink()
    third = pl.pseudo_label(standin_cfg(unlabeled, out))
    assert third["computed"] == ["Case_0002"] and len(calls) == 6
    # other models on the same output folder: refused, not mixed
    run_json = (out / "run.json").read_text()
    with pytest.raises(pl.Flare22Error, match="other models"):
        pl.pseudo_label(pl.PseudoLabelConfig(models=["a", "b"], unlabeled=str(unlabeled), out=str(out),
                                             threshold=0.8, shard=(0, 1), progress=False))
    assert (out / "run.json").read_text() == run_json and len(calls) == 6


def test_two_shards_merge_to_the_single_run(standin_cases, tmp_path):
    unlabeled, _ = standin_cases
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    pl.pseudo_label(standin_cfg(unlabeled, single))
    first = pl.pseudo_label(standin_cfg(unlabeled, sharded, shard=(0, 2)))
    assert first["computed"] == ["Case_0001", "Case_0003"]
    partial = json.loads((sharded / "manifest.json").read_text())
    assert not partial["complete"] and partial["missing"] == ["Case_0002", "Case_0004"]
    second = pl.pseudo_label(standin_cfg(unlabeled, sharded, shard=(1, 2)))
    assert second["computed"] == ["Case_0002", "Case_0004"]
    merged = pl.merge(sharded)
    assert merged == json.loads((single / "manifest.json").read_text()) and merged["complete"]
    assert (sharded / "manifest.csv").read_text() == (single / "manifest.csv").read_text()
    for sub in ("labelled/images", "labelled/labels", "rejected/images"):
        assert listing(sharded / sub) == listing(single / sub)


def test_unreadable_volume_is_recorded_and_retried(standin_cases, tmp_path):
    unlabeled, _ = standin_cases
    (unlabeled / "images" / "Case_0009_0000.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "pl"
    s = pl.pseudo_label(standin_cfg(unlabeled, out))
    assert s["failed"] == ["Case_0009"] and len(s["computed"]) == 4
    m = pl.merge(out)
    assert not m["complete"] and m["counts"]["failed"] == 1
    assert "Case_0009" in m["cases"][-1]["error"] and m["cases"][-1]["kept"] is False
    assert pl.pseudo_label(standin_cfg(unlabeled, out))["failed"] == ["Case_0009"]  # retried, fails again


def test_cli_merge_and_required_arguments(standin_cases, tmp_path, capsys):
    from flare22.cli import main

    unlabeled, _ = standin_cases
    out = tmp_path / "pl"
    assert main(["pseudo-label", "--models", "a", "b", "c", "--unlabeled", str(unlabeled), "--out", str(out),
                 "--threshold", "0.8", "--shard", "0/1", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kept"] == 3
    (out / "manifest.json").unlink()
    assert main(["pseudo-label", "--merge", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["counts"]["kept"] == 3
    assert main(["pseudo-label", "--out", str(out)]) == 2


# ---------------------------------------------------------------------------------------
# real networks: random-weight checkpoints, a corrupted one, a bundle


def save_pair(path: Path, a, b) -> Path:
    T.save_checkpoint(path, kind="reference", config=ReferenceTrainConfig(model="tiny"), iteration=0,
                      models={"a": a, "b": b}, optimizers={}, schedulers={})
    return path


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    torch.manual_seed(3)
    a, b = build_reference_pair("tiny")
    ckpt = save_pair(root / "m0.pt", a, b)
    shutil.copy(ckpt, root / "m1.pt")
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # weights replaced by noise of each tensor's own scale
        for net in (a, b):
            for p in net.parameters():
                scale = float(p.std()) if p.numel() > 1 else 0.1
                p.copy_(torch.randn(p.shape, generator=gen) * max(scale, 0.05))
    noise = save_pair(root / "noise.pt", a, b)
    write_dataset(root / "unl", 2, seed=7, shape_zyx=(8, 40, 40), prefix="Case", unlabeled=True)
    return {"root": root, "ckpt": ckpt, "copy": root / "m1.pt", "noise": noise, "unl": root / "unl"}


def real_run(real, models, name, threshold=1.0):
    out = real["root"] / name
    pl.pseudo_label(pl.PseudoLabelConfig(models=[str(m) for m in models], unlabeled=str(real["unl"]), out=str(out),
                                         threshold=threshold, shard=(0, 1), device="cpu", progress=False))
    return json.loads((out / "manifest.json").read_text())


def test_identical_models_score_exactly_one_and_are_kept(real):
    m = real_run(real, [real["ckpt"], real["copy"]], "same")
    assert [r["kept"] for r in m["cases"]] == [True, True]
    for r in m["cases"]:
        assert r["paper"] == r["paper_empty_one"] == r["iou_majority"] == 1.0
        assert r["foreground_voxels"] > 0  # the random network predicts organs: the 1.0 is not empty/empty


def test_a_corrupted_model_lowers_the_scores(real):
    same = real_run(real, [real["ckpt"], real["copy"]], "same2")
    bad = real_run(real, [real["ckpt"], real["copy"], real["noise"]], "noisy")
    assert [r["case"] for r in bad["cases"]] == [r["case"] for r in same["cases"]]
    for r in bad["cases"]:
        assert r["paper"] < 0.99 and r["iou_majority"] < 1.0 and not r["kept"]
    assert np.mean([r["score"] for r in bad["cases"]]) < np.mean([r["score"] for r in same["cases"]]) - 0.01
    # two agreeing models outvote the corrupted one: the pseudo labels do not change
    for case in ("Case_0001", "Case_0002"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(real["root"] / "same2" / "aggregated" / f"{case}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(real["root"] / "noisy" / "aggregated" / f"{case}.nii.gz")))
        np.testing.assert_array_equal(a, b)


def test_bundle_model_agrees_with_its_checkpoint(real):
    from export.bundle import export_bundle

    bundle = export_bundle(real["root"] / "bundle", reference=real["ckpt"], programs=False, quiet=True)
    model = pl.load_model(bundle, "cpu")
    assert isinstance(model, pl.BundleModel) and model.input_size == (128, 128)
    m = real_run(real, [real["ckpt"], bundle], "mixed", threshold=0.0)
    for r in m["cases"]:
        assert r["paper"] > 0.98 and r["kept"]


# ---------------------------------------------------------------------------------------
# one tiny cycle, end to end, and its restart


def test_cycle_inputs_join_kept_labels_and_pass_on_the_rejected(standin_cases, tmp_path):
    unlabeled, _ = standin_cases
    write_dataset(tmp_path / "lab", 2, seed=1, shape_zyx=(4, 16, 16), prefix="Lab")
    out = tmp_path / "cycles"
    pl.pseudo_label(standin_cfg(unlabeled, out / "cycle_0" / "pseudo"))  # keeps 1, 3, 4; rejects 2
    cfg = cyc.CycleConfig(labelled=str(tmp_path / "lab"), unlabeled=str(unlabeled), out=str(out))
    assert cyc.cycle_inputs(cfg, 0) == (cfg.labelled, cfg.unlabeled)
    labelled, pool = cyc.cycle_inputs(cfg, 1)
    vols = load_folder(labelled, labelled=True, cache_dir=tmp_path / "cache")
    assert [v.name for v in vols] == ["Case_0001", "Case_0003", "Case_0004", "Lab_0001", "Lab_0002"]
    assert int(np.asarray(vols[2].labels).sum()) == 4 * 256
    assert pool == str(out / "cycle_0" / "pseudo" / "rejected")
    assert listing(Path(pool) / "images") == ["Case_0002_0000.nii.gz"]
    with pytest.raises(pl.Flare22Error, match="manifest.json is missing"):
        cyc.cycle_inputs(cfg, 2)
    clash = cyc.CycleConfig(labelled=str(out / "cycle_0" / "pseudo" / "labelled"), unlabeled="", out=str(out))
    with pytest.raises(pl.Flare22Error, match="in both"):
        cyc.cycle_inputs(clash, 1)



def test_cycle_end_to_end_and_restart(tmp_path, monkeypatch):
    write_dataset(tmp_path / "lab", 2, seed=21, shape_zyx=(8, 40, 40), prefix="Lab")
    write_dataset(tmp_path / "unl", 3, seed=22, shape_zyx=(8, 40, 40), prefix="Case", unlabeled=True)
    write_dataset(tmp_path / "val", 1, seed=23, shape_zyx=(8, 40, 40), prefix="Val")
    out = tmp_path / "cycles"
    base = dict(labelled=str(tmp_path / "lab"), unlabeled=str(tmp_path / "unl"), out=str(out), models=2,
                iterations=3, val=str(tmp_path / "val"), device="cpu", cache_dir=str(tmp_path / "cache"),
                progress=False)
    trained = []
    real_train = cyc.train

    def counting_train(cfg, out_dir, resume=None, progress=True):
        trained.append(Path(out_dir).relative_to(out).as_posix())
        return real_train(cfg, out_dir, resume=resume, progress=progress)

    monkeypatch.setattr(cyc, "train", counting_train)
    cyc.run_cycles(cyc.CycleConfig(**base, cycles=1, threshold=1.0))
    assert trained == ["cycle_0/model_0", "cycle_0/model_1"]
    c0 = out / "cycle_0"
    for f in ("model_0/best.pt", "model_1/best.pt", "pseudo/manifest.json", "validation.json", "summary.json"):
        assert (c0 / f).is_file(), f
    # choose a threshold that keeps the best-agreeing volume(s): the rerun re-splits cycle 0
    # from its records without retraining, then runs cycle 1
    scores = [r["score"] for r in json.loads((c0 / "pseudo" / "manifest.json").read_text())["cases"]]
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    cfg = cyc.CycleConfig(**base, cycles=2, threshold=max(scores))
    first = cyc.run_cycles(cfg)
    assert trained == ["cycle_0/model_0", "cycle_0/model_1", "cycle_1/model_0", "cycle_1/model_1"]
    kept = [r["case"] for r in json.loads((c0 / "pseudo" / "manifest.json").read_text())["cases"] if r["kept"]]
    assert 1 <= len(kept) <= 3
    c1 = out / "cycle_1"
    assert listing(c1 / "train" / "labels") == sorted(["Lab_0001.nii.gz", "Lab_0002.nii.gz"]
                                                      + [f"{k}.nii.gz" for k in kept])
    assert all((c1 / "train" / "images" / p).is_symlink() for p in listing(c1 / "train" / "images"))
    s1 = json.loads((c1 / "summary.json").read_text())
    assert s1["labelled_cases"] == 2 + len(kept) and s1["pool_cases"] == 3 - len(kept)
    assert (c1 / "pseudo" / "manifest.json").exists() == (len(kept) < 3)
    val = s1["validation"]
    assert len(val["models"]) == 2 and 0.0 <= val["ensemble"]["mean_dsc"] <= 1.0
    assert len(json.loads((out / "cycles.json").read_text())["cycles"]) == 2
    # restart: nothing left to train, the same summaries; also from --start-cycle 1
    again = cyc.run_cycles(cfg)
    assert len(trained) == 4 and again == first
    assert cyc.run_cycles(cyc.CycleConfig(**base, cycles=2, threshold=max(scores), start_cycle=1)) == first[1:]
    from flare22.cli import main

    argv = ["cycle", "--labelled", base["labelled"], "--unlabeled", base["unlabeled"], "--out", str(out),
            "--cycles", "2", "--models", "2", "--threshold", repr(max(scores)), "--iterations", "3",
            "--val", base["val"], "--device", "cpu", "--cache-dir", base["cache_dir"], "--no-progress"]
    assert main(argv) == 0
    assert len(trained) == 4
    # another threshold re-splits cycle 0, and cycle 1's models no longer match its data: refused
    inputs = json.loads((c1 / "inputs.json").read_text())
    assert inputs["labelled"] == sorted(["Lab_0001", "Lab_0002", *kept]) and len(inputs["pool"]) == 3 - len(kept)
    with pytest.raises(pl.Flare22Error, match="delete"):
        cyc.run_cycles(cyc.CycleConfig(**base, cycles=2, threshold=max(scores) + 0.01))
    assert len(trained) == 4

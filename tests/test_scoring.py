"""FLARE22 scoring (evaluation/scoring.py): organiser semantics on tiny label blocks, the surfel
NSD against DeepMind's `surface_distance` package (a test-only dependency), files and CLI."""
from __future__ import annotations

import csv
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from evaluation import scoring
from flare22 import cli
from app.errors import InputError
from app.labels import NSD_TOLERANCE_MM, ORGANS

ANISO = (2.5, 0.7, 1.3)  # (sz, sy, sx) mm
SHARED_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "labels"


@pytest.fixture
def reference_nsd(monkeypatch):
    """NSD from the `surface_distance` package (arrays in our (z, y, x) order, spacing likewise).

    surface-distance 0.1 uses `np.Inf` (gone in NumPy 2) when one mask has no surface, and the
    deprecated `scipy.ndimage.filters` namespace: patched and silenced here, in the test only.
    """
    import surface_distance

    monkeypatch.setattr(np, "Inf", np.inf, raising=False)

    def nsd(gt: np.ndarray, pred: np.ndarray, spacing, tolerance: float) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            distances = surface_distance.compute_surface_distances(
                gt.astype(bool), pred.astype(bool), spacing)
            return float(surface_distance.compute_surface_dice_at_tolerance(distances, tolerance))

    return nsd


def blob(rng: np.random.Generator, shape, fill: float = 0.3, sigma: float = 1.5) -> np.ndarray:
    """Smooth random field thresholded to about `fill` of the voxels: lumpy blobs, not noise."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, 1 - fill)


def perturbed(rng: np.random.Generator, mask: np.ndarray, amount: float = 0.25) -> np.ndarray:
    """`mask` with some lumps added and some cut away, so the surfaces partly disagree."""
    return mask ^ blob(rng, mask.shape, fill=amount, sigma=1.0)


# --------------------------------------------------------------------------------------
# Surface elements and NSD against surface_distance
# --------------------------------------------------------------------------------------
def test_area_table_equals_surface_distance_table_for_all_256_codes():
    from surface_distance import lookup_tables

    # surface_distance gives corner (a, b, c) the bit 7 - (4a + 2b + c); ours is 4a + 2b + c.
    reversed_bits = [int(f"{code:08b}"[::-1], 2) for code in range(256)]
    for spacing in [(1.0, 1.0, 1.0), ANISO, (5.0, 0.6, 0.9)]:
        theirs = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
        ours = scoring.surfel_area_table(spacing)
        np.testing.assert_allclose(ours, theirs[reversed_bits], rtol=0, atol=1e-12)
    assert ours[0] == ours[255] == 0.0


def test_neighbour_codes_of_one_voxel():
    mask = np.zeros((1, 1, 1), bool)
    mask[0, 0, 0] = True
    codes = scoring.neighbour_codes(mask)
    assert codes.shape == (2, 2, 2)
    # corner (dz, dy, dx) of the cube at position p is voxel p - 1 + (dz, dy, dx)
    assert codes[1, 1, 1] == 1 << 0 and codes[0, 0, 0] == 1 << 7 and codes[0, 1, 1] == 1 << 4


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", [ANISO, (3.0, 0.8, 0.8)])
def test_nsd_agrees_with_surface_distance_on_random_blobs(reference_nsd, seed, spacing):
    rng = np.random.default_rng(seed)
    gt = blob(rng, (14, 22, 19))
    pred = perturbed(rng, gt)
    values = []
    for tolerance in sorted(set(NSD_TOLERANCE_MM.values())) + [0.5, 1.3]:
        ours = scoring.surface_dice(gt, pred, spacing, tolerance)
        theirs = reference_nsd(gt, pred, spacing, tolerance)
        assert abs(ours - theirs) < 1e-4, (tolerance, ours, theirs)
        values.append(ours)
    assert any(0.05 < v < 0.95 for v in values), values  # the comparison is not trivial


def _edge_cases():
    shape = (7, 9, 8)
    full = np.ones(shape, bool)
    corner = np.zeros(shape, bool)
    corner[0, 0, 0] = True
    neighbour = np.zeros(shape, bool)
    neighbour[0, 0, 1] = True
    slab = np.zeros(shape, bool)
    slab[3, 2:7, 1:6] = True
    slab_moved = np.roll(slab, 1, axis=0)
    far = np.zeros(shape, bool)
    far[6, 8, 7] = True
    touching = blob(np.random.default_rng(7), shape, fill=0.6)
    return {
        "full volume vs touching blob": (full, touching),
        "voxel vs neighbour voxel": (corner, neighbour),
        "one-slice slab vs next slice": (slab, slab_moved),
        "far apart single voxels": (corner, far),
        "identical": (touching, touching),
        "prediction empty": (slab, np.zeros(shape, bool)),
        "ground truth empty": (np.zeros(shape, bool), slab),
    }


@pytest.mark.parametrize("name", list(_edge_cases()))
def test_nsd_agrees_with_surface_distance_on_edge_cases(reference_nsd, name):
    gt, pred = _edge_cases()[name]
    for tolerance in (0.5, 0.7, 1.3, 2.0, 2.5, 3.0):
        assert scoring.surface_dice(gt, pred, ANISO, tolerance) == pytest.approx(
            reference_nsd(gt, pred, ANISO, tolerance), abs=1e-4)


def test_nsd_of_a_voxel_and_its_neighbour_by_hand():
    # 8 equal corner surfels each; 4 coincide, the other 4 lie sx = 1.5 mm from the other surface.
    gt = np.zeros((3, 3, 4), bool)
    gt[1, 1, 1] = True
    pred = np.roll(gt, 1, axis=2)
    spacing = (2.0, 1.0, 1.5)
    assert scoring.surface_dice(gt, pred, spacing, 1.49) == pytest.approx(0.5, abs=1e-12)
    assert scoring.surface_dice(gt, pred, spacing, 1.5) == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(scoring.surface_dice(gt & False, pred & False, spacing, 1.0))


# --------------------------------------------------------------------------------------
# score_case: organiser rules on tiny label volumes
# --------------------------------------------------------------------------------------
def _case():
    """Organ 1 predicted exactly, organ 2 only in the ground truth, organ 3 only predicted."""
    gt = np.zeros((6, 8, 8), np.uint8)
    pred = np.zeros_like(gt)
    gt[1:3, 1:4, 1:4] = pred[1:3, 1:4, 1:4] = 1
    gt[3:5, 5:7, 5:7] = 2
    pred[4:6, 1:3, 5:8] = 3
    return pred, gt


def test_both_empty_scores_one():
    pred, gt = _case()
    scores = scoring.score_case(pred, gt, ANISO)
    assert set(scores) == set(ORGANS)
    for organ in range(4, 14):
        assert scores[organ] == (1.0, 1.0)
    assert scores[1] == (1.0, 1.0)


def test_ground_truth_present_prediction_empty_scores_zero():
    pred, gt = _case()
    assert scoring.score_case(pred, gt, ANISO)[2] == (0.0, 0.0)


def test_ground_truth_empty_prediction_present_scores_zero():
    pred, gt = _case()
    assert scoring.score_case(pred, gt, ANISO)[3] == (0.0, 0.0)


def test_dice_of_hand_made_masks(reference_nsd):
    gt = np.zeros((4, 5, 5), np.uint8)
    gt[1:3, 1:3, 1:3] = 7  # 8 voxels
    pred = np.zeros_like(gt)
    pred[1:2, 1:3, 1:3] = 7  # 4 of them; the missing slice lies 2.5 mm > 2 mm away
    dsc, nsd = scoring.score_case(pred, gt, ANISO)[7]
    assert dsc == pytest.approx(2 * 4 / (8 + 4), abs=1e-12)
    expected = reference_nsd(gt == 7, pred == 7, ANISO, NSD_TOLERANCE_MM[7])
    assert nsd == pytest.approx(expected, abs=1e-4)
    assert nsd < 1.0


def _tube(organ: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth on slices 2..5, prediction on slices 0..4 (misses the top labelled slice)."""
    gt = np.zeros((10, 6, 6), np.uint8)
    pred = np.zeros_like(gt)
    gt[2:6, 1:4, 1:4] = organ  # 4 slices x 9 voxels
    pred[0:5, 1:4, 1:4] = organ  # 5 slices x 9 voxels, 3 of them shared
    return pred, gt


def test_axial_crop_of_aorta_and_its_official_off_by_one(reference_nsd):
    spacing = (3.5, 1.0, 1.0)  # slices farther apart than every tolerance: the top cap counts
    pred, gt = _tube(1)  # liver: never cropped
    assert scoring.score_case(pred, gt, spacing)[1][0] == pytest.approx(2 * 27 / (36 + 45))

    for organ in (5, 6, 10):
        pred, gt = _tube(organ)
        dsc, nsd = scoring.score_case(pred, gt, spacing)[organ]
        assert dsc == pytest.approx(2 * 27 / (36 + 27))  # both cropped to slices 2..5
        tolerance = NSD_TOLERANCE_MM[organ]
        expected = reference_nsd(gt[2:6] == organ, pred[2:6] == organ, spacing, tolerance)
        assert nsd == pytest.approx(expected, abs=1e-4)
        assert nsd < 1.0
        # the official bounds [z_min:z_max] drop slice 5, where the two masks differ
        official = scoring.score_case(pred, gt, spacing, official_crop_off_by_one=True)
        assert official[organ] == (1.0, 1.0)


def test_off_by_one_crop_of_a_one_slice_organ_is_nan_as_in_the_official_script():
    gt = np.zeros((5, 4, 4), np.uint8)
    gt[2, 1:3, 1:3] = 10
    pred = gt.copy()
    assert scoring.score_case(pred, gt, ANISO)[10] == (1.0, 1.0)
    dsc, nsd = scoring.score_case(pred, gt, ANISO, official_crop_off_by_one=True)[10]
    assert math.isnan(dsc) and math.isnan(nsd)


def test_prediction_outside_the_cropped_range_scores_zero():
    gt = np.zeros((8, 4, 4), np.uint8)
    pred = np.zeros_like(gt)
    gt[1:3, 1:3, 1:3] = 6
    pred[5:7, 1:3, 1:3] = 6
    assert scoring.score_case(pred, gt, ANISO)[6] == (0.0, 0.0)


def test_score_case_rejects_unequal_shapes():
    with pytest.raises(ValueError, match="one shape"):
        scoring.score_case(np.zeros((2, 3, 4), np.uint8), np.zeros((2, 3, 5), np.uint8), ANISO)


# --------------------------------------------------------------------------------------
# Files, folders and the command line
# --------------------------------------------------------------------------------------
def write_labels(path: Path, array: np.ndarray, spacing_zyx=ANISO, origin=(0.0, 0.0, 0.0),
                 direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def folders(tmp_path):
    """Two cases. A: organ 1 exact, organ 4 half predicted. B: organ 5 with a longer prediction."""
    gt_a = np.zeros((4, 6, 6), np.uint8)
    gt_a[1:3, 1:5, 1:5] = 1
    gt_a[0, 0:2, 0:2] = 4
    pred_a = gt_a.copy()
    pred_a[0, 0:2, 0:1] = 0  # organ 4: 2 of 4 voxels -> DSC 2*2/6
    pred_b, gt_b = _tube(5)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    for case, gt, pred in (("A", gt_a, pred_a), ("B", gt_b, pred_b)):
        write_labels(gt_dir / f"{case}.nii.gz", gt)
        write_labels(pred_dir / f"{case}.nii.gz", pred)
    return pred_dir, gt_dir, tmp_path / "out" / "scores.csv"


def test_evaluate_folders_end_to_end(folders, reference_nsd):
    pred_dir, gt_dir, out_csv = folders
    summary = scoring.evaluate_folders(pred_dir, gt_dir, out_csv, workers=2)
    rows = read_csv(out_csv)
    with open(out_csv) as f:
        assert f.readline().strip().split(",") == scoring.csv_columns()
    assert [r["case"] for r in rows] == ["A", "B"]
    a, b = rows
    assert a["1_liver_DSC"] == a["1_liver_NSD"] == "1.0000"
    assert a["4_pancreas_DSC"] == "0.6667"
    assert b["5_aorta_DSC"] == f"{2 * 27 / 63:.4f}"
    assert b["1_liver_DSC"] == a["5_aorta_NSD"] == "1.0000"  # absent from both
    assert a["missing"] == b["missing"] == "0"
    expected_nsd = reference_nsd(_tube(5)[1][2:6] == 5, _tube(5)[0][2:6] == 5, ANISO, 2.0)
    assert float(b["5_aorta_NSD"]) == pytest.approx(round(expected_nsd, 4), abs=1e-12)
    # means over cases of the rounded values; overall mean over all organs and cases
    assert summary.organ_means[4][0] == pytest.approx((0.6667 + 1.0) / 2)
    assert summary.organ_means[1] == (1.0, 1.0)
    all_dsc = [float(r[f"{o}_{n}_DSC"]) for r in rows for o, n in ORGANS.items()]
    assert summary.mean_dsc == pytest.approx(sum(all_dsc) / len(all_dsc))
    # one process gives the same file
    serial_csv = out_csv.with_name("serial.csv")
    scoring.evaluate_folders(pred_dir, gt_dir, serial_csv, workers=1)
    assert serial_csv.read_text() == out_csv.read_text()
    assert not list(out_csv.parent.glob(".*partial"))


def test_missing_prediction_is_scored_as_empty_and_flagged(folders):
    pred_dir, gt_dir, out_csv = folders
    (pred_dir / "B.nii.gz").unlink()
    write_labels(pred_dir / "C.nii.gz", np.zeros((2, 2, 2), np.uint8))  # no ground truth
    summary = scoring.evaluate_folders(pred_dir, gt_dir, out_csv, workers=2)
    rows = {r["case"]: r for r in read_csv(out_csv)}
    assert set(rows) == {"A", "B"}
    assert rows["B"]["missing"] == "1" and rows["A"]["missing"] == "0"
    assert rows["B"]["5_aorta_DSC"] == rows["B"]["5_aorta_NSD"] == "0.0000"  # present in GT
    assert rows["B"]["1_liver_DSC"] == rows["B"]["1_liver_NSD"] == "1.0000"  # absent in GT
    assert summary.missing == ["B"]
    assert summary.extra_predictions == ["C"]
    assert "1 missing predictions: B" in summary.table()


@pytest.mark.parametrize("what", ["size", "spacing", "origin", "direction"])
def test_prediction_off_the_ground_truth_grid_is_an_input_error(tmp_path, what):
    gt = np.zeros((3, 4, 5), np.uint8)
    gt[1, 1:3, 1:3] = 1
    write_labels(tmp_path / "gt" / "case7.nii.gz", gt)
    wrong = {
        "size": dict(array=np.zeros((3, 4, 6), np.uint8)),
        "spacing": dict(array=gt, spacing_zyx=(2.5, 0.7, 1.4)),
        "origin": dict(array=gt, origin=(0.0, 0.5, 0.0)),
        "direction": dict(array=gt, direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1)),
    }[what]
    pred_path = write_labels(tmp_path / "pred" / "case7.nii.gz", **wrong)
    with pytest.raises(InputError) as caught:
        scoring.evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "s.csv", workers=1)
    assert caught.value.path == str(pred_path)
    assert "case case7" in str(caught.value) and what in str(caught.value)
    assert not (tmp_path / "s.csv").exists()


def test_input_error_from_a_worker_process_reaches_the_caller(folders):
    pred_dir, gt_dir, out_csv = folders
    write_labels(pred_dir / "B.nii.gz", _tube(5)[0], spacing_zyx=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="case B: prediction spacing"):
        scoring.evaluate_folders(pred_dir, gt_dir, out_csv, workers=2)


def test_empty_ground_truth_folder_is_an_input_error(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    with pytest.raises(InputError, match="no ground-truth files"):
        scoring.evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "s.csv")


def test_cli_evaluate(folders, capsys):
    pred_dir, gt_dir, out_csv = folders
    argv = ["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out_csv),
            "--workers", "2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "5 aorta" in printed and "mean" in printed and str(out_csv) in printed
    inclusive = read_csv(out_csv)[1]["5_aorta_DSC"]
    assert cli.main(argv + ["--official-off-by-one"]) == 0
    assert inclusive == f"{6 / 7:.4f}" and read_csv(out_csv)[1]["5_aorta_DSC"] == "1.0000"


def test_scoring_never_imports_torch():
    code = "import sys, evaluation.scoring, app.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=True)
    assert done.stdout.strip() == "False"


# --------------------------------------------------------------------------------------
# Real labels and a full-size case
# --------------------------------------------------------------------------------------
@pytest.mark.shared
@pytest.mark.skipif(not SHARED_LABELS.is_dir(), reason=f"{SHARED_LABELS} absent")
def test_real_labels_against_surface_distance(reference_nsd):
    for path in sorted(SHARED_LABELS.glob("*.nii.gz")):
        image = sitk.ReadImage(str(path))
        gt = sitk.GetArrayFromImage(image).astype(np.uint8)
        spacing = tuple(reversed(image.GetSpacing()))
        # a plausible prediction: organs shifted by one voxel in x, one organ eroded away
        pred = np.roll(gt, 1, axis=2)
        pred[ndimage.binary_erosion(pred == 3, iterations=2)] = 0
        scores = scoring.score_case(pred, gt, spacing)
        for organ in np.unique(gt[gt > 0]):
            organ = int(organ)
            g, p = gt == organ, pred == organ
            if organ in (5, 6, 10):
                z = np.flatnonzero(g.any(axis=(1, 2)))
                g, p = g[z[0]:z[-1] + 1], p[z[0]:z[-1] + 1]
            expected = reference_nsd(g, p, spacing, NSD_TOLERANCE_MM[organ])
            assert scores[organ][1] == pytest.approx(expected, abs=1e-4), (path.name, organ)


def synthetic_abdomen(shape=(200, 512, 512), shift: float = 0.0, seed: int = 0) -> np.ndarray:
    """13 ellipsoids, one per organ; `shift` moves and grows them (a stand-in prediction)."""
    volume = np.zeros(shape, np.uint8)
    rng = np.random.default_rng(seed)
    for organ in ORGANS:
        centre = np.array([rng.uniform(0.2, 0.8) * shape[0], rng.uniform(0.2, 0.8) * shape[1],
                           rng.uniform(0.2, 0.8) * shape[2]]) + shift * np.array([1, 2, -2])
        radii = np.array([rng.uniform(8, 40), rng.uniform(10, 80), rng.uniform(10, 80)])
        radii *= 1 + 0.05 * shift
        lo = np.maximum(np.floor(centre - radii).astype(int), 0)
        hi = np.minimum(np.ceil(centre + radii).astype(int) + 1, shape)
        z, y, x = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        inside = sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), centre, radii)) <= 1
        volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][inside] = organ
    return volume


@pytest.mark.slow
def test_full_size_case_timing(reference_nsd):
    """One 512 x 512 x 200 case with 13 organs; prints the time (run with -s to see it)."""
    gt, pred = synthetic_abdomen(), synthetic_abdomen(shift=1.0)
    spacing = (2.5, 0.8, 0.8)
    scoring.surfel_area_table(spacing)  # warm-up: the table is built once per process
    start = time.perf_counter()
    scores = scoring.score_case(pred, gt, spacing)
    seconds = time.perf_counter() - start
    print(f"\nscore_case, 512x512x200, 13 organs: {seconds:.2f} s")
    assert all(0.7 < scores[o][0] < 1.0 for o in ORGANS), scores
    for organ in (7, 8, 9):  # full-size agreement on the small organs (the reference is slow)
        expected = reference_nsd(gt == organ, pred == organ, spacing, NSD_TOLERANCE_MM[organ])
        assert scores[organ][1] == pytest.approx(expected, abs=1e-4)
    assert seconds < 60

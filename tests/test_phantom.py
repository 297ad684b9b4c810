"""The synthetic abdomen phantom: anatomy present, plausible HU, determinism, geometry."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk

from evaluation import phantom
from flare22.cli import main as cli_main
from app.labels import ORGANS

SMALL = (48, 64, 64)


@pytest.fixture(scope="module")
def small_cases() -> dict[int, phantom.Case]:
    return {seed: phantom.generate(seed, SMALL) for seed in range(8)}


def _organ_mean(case: phantom.Case, label: int) -> float:
    return float(case.image[case.labels == label].mean())


def test_every_organ_present_at_64x64x48(small_cases):
    for seed, case in small_cases.items():
        counts = np.bincount(case.labels.ravel(), minlength=14)
        assert counts.size == 14, f"seed {seed}: label values above 13: {np.unique(case.labels)}"
        for label, name in ORGANS.items():
            floor = 4 if "adrenal" in name else 30
            assert counts[label] >= floor, f"seed {seed}: {name} has {counts[label]} voxels"


def test_types_shape_and_physical_size(small_cases):
    for case in small_cases.values():
        assert case.image.dtype == np.int16 and case.labels.dtype == np.uint8
        assert case.image.shape == SMALL and case.labels.shape == SMALL
        sx, sy, sz = case.grid.spacing_xyz
        assert sx == sy
        assert 307.0 <= 64 * sx <= 512.0  # the field of view of a 512 grid at 0.6-1.0 mm
        assert 225.0 <= 47 * sz <= 435.0  # lung bases to pelvis


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_size_inplane_spacing_is_clinical(seed):
    case = phantom.generate(seed, (2, 512, 512))
    sx, sy, _ = case.grid.spacing_xyz
    assert 0.6 <= sx <= 1.0 and sx == sy


@pytest.mark.parametrize("seed", [3, 4])
def test_drawn_slice_count_follows_a_clinical_slice_spacing(seed):
    case = phantom.generate(seed, (None, 24, 24))
    nz = case.image.shape[0]
    sz = case.grid.spacing_xyz[2]
    assert 1.5 <= sz <= 5.0
    assert 220.0 <= (nz - 1) * sz <= 440.0
    assert all(np.count_nonzero(case.labels == k) > 0 for k in ORGANS)


def test_hu_plausible(small_cases):
    for seed, case in small_cases.items():
        img, lab = case.image, case.labels
        assert img.min() >= -1024 and img.max() <= 3071
        corners = np.concatenate([img[:, :2, :2].ravel(), img[:, :2, -2:].ravel()])
        assert corners.mean() < -900, f"seed {seed}: air outside the body at {corners.mean():.0f} HU"
        assert 20 <= _organ_mean(case, 1) <= 100, f"seed {seed}: liver"
        assert 15 <= _organ_mean(case, 3) <= 110, f"seed {seed}: spleen"
        assert _organ_mean(case, 9) <= 40, f"seed {seed}: gallbladder"
        assert 20 <= _organ_mean(case, 5) <= 320, f"seed {seed}: aorta"
        for kidney in (2, 13):
            assert 20 <= _organ_mean(case, kidney) <= 250, f"seed {seed}: kidney {kidney}"
        assert img.max() >= 300, f"seed {seed}: no bone"
        body = img > -500
        assert np.any(body & (img < -60)), f"seed {seed}: no fat"


def test_contrast_enhanced_aorta_outshines_liver():
    means = [(_organ_mean(c, 5), _organ_mean(c, 1)) for c in (phantom.generate(s, (24, 48, 48)) for s in range(12))]
    brighter = sum(aorta > liver + 30 for aorta, liver in means)
    assert brighter >= 6, means  # about 80 % of the cases are contrast enhanced


def test_anatomical_sides(small_cases):
    """Liver and right kidney on the patient's right (small x), spleen and left kidney on the
    left, right kidney lower than left, esophagus high, aorta left of the IVC."""
    for seed, case in small_cases.items():
        centre = {k: np.array(np.nonzero(case.labels == k)).mean(axis=1) for k in ORGANS}  # (z, y, x)
        mid_x = case.labels.shape[2] / 2
        assert centre[1][2] < mid_x and centre[2][2] < mid_x, f"seed {seed}"
        assert centre[3][2] > mid_x and centre[13][2] > mid_x, f"seed {seed}"
        assert centre[2][0] < centre[13][0], f"seed {seed}: right kidney not lower"
        assert centre[10][0] > centre[4][0], f"seed {seed}: esophagus below the pancreas"
        assert centre[5][2] > centre[6][2], f"seed {seed}: aorta not left of the IVC"
        assert centre[9][1] < centre[2][1], f"seed {seed}: gallbladder not anterior to the right kidney"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_adrenal_glands_are_visible_in_fat(seed):
    """Each gland sits in fat, not inside the liver at the liver's density (the right one
    once did: an organ no model could see)."""
    from scipy import ndimage

    case = phantom.generate(seed, (48, 128, 128))
    for label in (7, 8):  # right, left adrenal gland
        gland = case.labels == label
        ring = ndimage.binary_dilation(gland, iterations=1) & ~gland
        assert np.mean(case.labels[ring] == 0) > 0.5, f"seed {seed}: {ORGANS[label]} not in fat"
        assert case.image[gland].mean() - case.image[ring].mean() > 40, f"seed {seed}: {ORGANS[label]} invisible"


def test_same_seed_same_bytes():
    a = phantom.generate(11, SMALL)
    b = phantom.generate(11, SMALL)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.labels.tobytes() == b.labels.tobytes()
    assert a.grid == b.grid


def test_different_seeds_differ(small_cases):
    a, b = small_cases[0], small_cases[1]
    assert a.grid != b.grid
    assert not np.array_equal(a.labels, b.labels)
    c = phantom.generate(12, SMALL, spacing=a.grid.spacing_xyz)  # even on a common grid
    assert not np.array_equal(a.image, c.image)


def test_resolution_changes_sampling_not_anatomy():
    coarse, fine = phantom.generate(2, (48, 64, 64)), phantom.generate(2, (96, 128, 128))
    for k in (1, 2, 3, 5, 11, 13):
        volumes = []
        centroids = []
        for case in (coarse, fine):
            mask = case.labels == k
            sp = np.array(case.grid.spacing_xyz)
            volumes.append(mask.sum() * sp.prod())
            zyx = np.array(np.nonzero(mask)).mean(axis=1)
            centroids.append(np.array(case.grid.origin_xyz) + sp * zyx[::-1])
        assert volumes[0] == pytest.approx(volumes[1], rel=0.15), ORGANS[k]
        assert np.linalg.norm(centroids[0] - centroids[1]) < 6.0, ORGANS[k]


def test_small_case_is_fast():
    phantom.generate(0, SMALL)
    best = min(_timed(lambda: phantom.generate(5, SMALL)) for _ in range(3))
    assert best < 1.0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _is_signed_permutation(direction) -> bool:
    d = np.asarray(direction).reshape(3, 3)
    return bool(np.all(np.isin(d, (-1.0, 0.0, 1.0))) and np.all(np.abs(d).sum(0) == 1) and np.all(np.abs(d).sum(1) == 1))


def test_random_orientation_keeps_the_physical_content():
    seen = set()
    for seed in range(10):
        canonical_img, canonical_lab = phantom.make_case(seed, (20, 24, 28))
        img, lab = phantom.make_case(seed, (20, 24, 28), random_orientation=True)
        assert _is_signed_permutation(img.GetDirection())
        assert img.GetDirection() == lab.GetDirection() and img.GetOrigin() == lab.GetOrigin()
        assert img.GetSpacing() == lab.GetSpacing() and img.GetSize() == lab.GetSize()
        seen.add(img.GetDirection())
        for oriented, canonical in ((img, canonical_img), (lab, canonical_lab)):
            back = sitk.DICOMOrient(oriented, "LPS")
            np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(canonical))
            np.testing.assert_allclose(back.GetOrigin(), canonical.GetOrigin(), atol=1e-6)
            np.testing.assert_allclose(back.GetSpacing(), canonical.GetSpacing(), atol=1e-9)
            np.testing.assert_allclose(back.GetDirection(), np.eye(3).ravel())
        # one voxel, by hand: same physical point, same value
        i, j, k = 3, 5, 7
        point = canonical_img.TransformIndexToPhysicalPoint((i, j, k))
        index = img.TransformPhysicalPointToIndex(point)
        assert img[index] == canonical_img[i, j, k]
    assert len(seen) >= 5, "the orientation draw is not varied"


def test_every_one_of_the_48_orientations_round_trips():
    case = phantom.generate(0, (6, 7, 8))
    img, _ = case.images()
    directions = set()
    for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        for bits in range(8):
            flips = tuple(bool(bits >> b & 1) for b in range(3))
            oriented = phantom.reorient(img, perm, flips)
            directions.add(oriented.GetDirection())
            back = sitk.DICOMOrient(oriented, "LPS")
            np.testing.assert_array_equal(sitk.GetArrayFromImage(back), case.image)
            np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-6)
    assert len(directions) == 48


def test_canonical_case_has_identity_direction():
    img, lab = phantom.make_case(0, (8, 16, 16))
    assert img.GetDirection() == tuple(np.eye(3).ravel())
    assert img.GetPixelID() == sitk.sitkInt16 and lab.GetPixelID() == sitk.sitkUInt8


def test_write_dataset_layout(tmp_path):
    records = phantom.write_dataset(tmp_path, 2, seed=3, shape_zyx=(24, 32, 32), prefix="Phantom")
    assert [r["name"] for r in records] == ["Phantom_0001", "Phantom_0002"]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "Phantom_0001_0000.nii.gz", "Phantom_0002_0000.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["Phantom_0001.nii.gz", "Phantom_0002.nii.gz"]
    for name in ("Phantom_0001", "Phantom_0002"):
        img = sitk.ReadImage(str(tmp_path / "images" / f"{name}_0000.nii.gz"))
        lab = sitk.ReadImage(str(tmp_path / "labels" / f"{name}.nii.gz"))
        assert img.GetSize() == lab.GetSize() == (32, 32, 24)
        np.testing.assert_allclose(img.GetSpacing(), lab.GetSpacing())
        np.testing.assert_allclose(img.GetOrigin(), lab.GetOrigin())
        np.testing.assert_allclose(img.GetDirection(), lab.GetDirection())
        assert img.GetPixelID() == sitk.sitkInt16 and lab.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayFromImage(lab))) <= set(range(14))
    # the written case is the one its recorded seed generates
    again = phantom.generate(records[0]["seed"], (24, 32, 32))
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "images" / "Phantom_0001_0000.nii.gz")))
    np.testing.assert_array_equal(written, again.image)
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*")), "temporary files left behind"


def test_write_dataset_unlabeled(tmp_path):
    phantom.write_dataset(tmp_path, 1, seed=0, shape_zyx=(16, 24, 24), prefix="Case", unlabeled=True)
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["Case_0001_0000.nii.gz"]
    assert not (tmp_path / "labels").exists()


def test_cli_phantom(tmp_path, capsys):
    rc = cli_main(["phantom", "--out", str(tmp_path), "-n", "2", "--seed", "7", "--size", "32", "28", "20",
                   "--random-orientation", "--prefix", "FLARE22_Tr"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 2 and [c["name"] for c in report["cases"]] == ["FLARE22_Tr_0001", "FLARE22_Tr_0002"]
    for case in report["cases"]:
        img = sitk.ReadImage(case["image"])
        assert sorted(img.GetSize()) == sorted((32, 28, 20))
        assert _is_signed_permutation(img.GetDirection())
    assert (tmp_path / "labels" / "FLARE22_Tr_0002.nii.gz").is_file()


def test_cli_rejects_bad_sizes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["phantom", "--out", str(tmp_path), "--size", "1", "64", "48"])
    assert cli_main(["phantom", "--out", str(tmp_path), "--size", "0", "64", "48"]) == 2


def test_bad_shape_raises():
    with pytest.raises(ValueError):
        phantom.generate(0, (48, 64))
    with pytest.raises(ValueError):
        phantom.generate(0, (48, None, 64))
    with pytest.raises(ValueError):
        phantom.generate(0, (8, 16, 16), spacing=(1.0, 0.0, 2.0))

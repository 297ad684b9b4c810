import gzip
import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from app.ctio import (
    CTProperties,
    case_name,
    check_same_grid,
    from_canonical,
    list_cases,
    read_ct,
    read_label_like,
    write_labels,
)
from app.errors import GeometryError, InputError

from .conftest import shared_cases


def signed_permutations():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            d = np.zeros((3, 3))
            for i, (w, s) in enumerate(zip(perm, signs)):
                d[w, i] = s  # column i = world direction of index axis i
            yield d


def canonical_volume(rng, shape=(7, 9, 11)):
    return rng.integers(-1000, 1500, size=shape).astype(np.int16)


def image_in_orientation(canonical: np.ndarray, direction: np.ndarray, spacing_zyx=(2.5, 0.8, 0.7)) -> sitk.Image:
    """An image whose voxels are ``canonical`` stored along ``direction``."""
    from app.ctio import _canonical_mapping

    src_axes, flips, _ = _canonical_mapping(direction.ravel())
    props = CTProperties("x", (0, 0, 0), (0, 0, 0), (0, 0, 0), tuple(direction.ravel()), "", src_axes, flips)
    arr = from_canonical(canonical, props)
    img = sitk.GetImageFromArray(arr)
    # spacing of index axis i is the spacing of the world axis it runs along
    world_of_index = [int(np.argmax(np.abs(direction[:, i]))) for i in range(3)]
    sp_xyz = spacing_zyx[::-1]
    img.SetSpacing(tuple(float(sp_xyz[w]) for w in world_of_index))
    img.SetDirection(tuple(direction.ravel()))
    img.SetOrigin((10.0, -20.0, 30.5))
    return img


def test_48_orientations_round_trip_exactly(tmp_path, rng):
    canonical = canonical_volume(rng)
    labels = (canonical % 14).astype(np.uint8)
    seen = 0
    for k, d in enumerate(signed_permutations()):
        img = image_in_orientation(canonical, d)
        # an independent check of the mapping: ITK's own reorientation to LPS
        assert np.array_equal(sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS")), canonical)
        src = tmp_path / f"case{k:02d}_0000.nii.gz"
        sitk.WriteImage(img, str(src))
        arr, props = read_ct(src)
        assert np.array_equal(arr, canonical), f"orientation {d.tolist()}"
        assert props.spacing_zyx == pytest.approx((2.5, 0.8, 0.7), abs=1e-6)
        out = write_labels(labels, props, tmp_path / f"case{k:02d}.nii.gz")
        back = sitk.ReadImage(str(out))
        img = sitk.ReadImage(str(src))  # as stored (NIfTI keeps float32 spacing)
        assert back.GetSize() == img.GetSize()
        assert back.GetSpacing() == img.GetSpacing()
        assert back.GetOrigin() == img.GetOrigin()
        assert back.GetDirection() == img.GetDirection()
        assert back.GetPixelIDValue() == sitk.sitkUInt8
        assert np.array_equal(sitk.GetArrayFromImage(back), from_canonical(labels, props))
        seen += 1
    assert seen == 48


def test_oblique_direction_restored_exactly(tmp_path, rng):
    canonical = canonical_volume(rng)
    a = np.deg2rad(12.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    flip = np.diag([1.0, -1.0, 1.0])
    d = rot @ flip
    img = sitk.GetImageFromArray(canonical)
    img.SetDirection(tuple(d.ravel()))
    img.SetSpacing((0.7, 0.8, 2.5))
    src = tmp_path / "obl_0000.nii.gz"
    sitk.WriteImage(img, str(src))
    arr, props = read_ct(src)
    assert props.oblique
    assert np.array_equal(arr, canonical[:, ::-1, :])  # nearest axis-aligned: y flipped
    out = write_labels((arr > 0).astype(np.uint8), props, tmp_path / "obl.nii.gz")
    back = sitk.ReadImage(str(out))
    assert np.allclose(back.GetDirection(), sitk.ReadImage(str(src)).GetDirection(), atol=1e-6)
    assert back.GetSize() == img.GetSize()


@pytest.mark.parametrize(
    "dtype", [np.int16, np.int32, np.uint16, np.float32, np.float64, np.int8, np.uint8]
)
def test_pixel_types(tmp_path, rng, dtype):
    canonical = rng.integers(0, 100, size=(4, 5, 6)).astype(dtype)
    src = tmp_path / "p_0000.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(canonical), str(src))
    arr, props = read_ct(src)
    assert np.array_equal(arr.astype(np.float64), canonical.astype(np.float64))
    assert props.pixel_type


def test_nan_and_inf_are_replaced_by_air(tmp_path):
    vol = np.zeros((3, 4, 5), np.float32)
    vol[0, 0, 0] = np.nan
    vol[1, 1, 1] = np.inf
    # ITK's NIfTI reader already turns NaN into 0; MetaImage keeps them, so test there
    src = tmp_path / "n_0000.mha"
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(src))
    arr, props = read_ct(src)
    assert props.nonfinite == 2
    assert np.all(np.isfinite(arr)) and arr[0, 0, 0] == -1024 and arr[1, 1, 1] == -1024


def test_mostly_nan_volume_rejected(tmp_path):
    vol = np.full((3, 4, 5), np.nan, np.float32)
    src = tmp_path / "bad_0000.mha"
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(src))
    with pytest.raises(InputError, match="NaN or infinite"):
        read_ct(src)


def test_bad_inputs_name_the_file(tmp_path, rng):
    missing = tmp_path / "missing_0000.nii.gz"
    with pytest.raises(InputError, match="does not exist") as e:
        read_ct(missing)
    assert str(missing) in str(e.value)

    empty = tmp_path / "empty_0000.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_ct(empty)

    text = tmp_path / "text_0000.nii.gz"
    text.write_bytes(gzip.compress(b"this is not an image at all" * 20))
    with pytest.raises(InputError, match="unreadable"):
        read_ct(text)

    good = tmp_path / "good_0000.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(canonical_volume(rng, (20, 30, 30))), str(good))
    truncated = tmp_path / "trunc_0000.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="unreadable") as e:
        read_ct(truncated)
    assert "trunc_0000" in str(e.value)

    flat = tmp_path / "flat_0000.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), str(flat))
    with pytest.raises(InputError, match="2D"):
        read_ct(flat)

    four = tmp_path / "four_0000.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False), str(four))
    with pytest.raises(InputError, match="4D"):
        read_ct(four)

    vec = tmp_path / "vec_0000.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 2), np.int16), isVector=True), str(vec))
    with pytest.raises(InputError, match="components"):
        read_ct(vec)


def test_write_rejects_wrong_shape(tmp_path, rng):
    src = tmp_path / "a_0000.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(canonical_volume(rng)), str(src))
    _, props = read_ct(src)
    with pytest.raises(GeometryError, match="shape"):
        write_labels(np.zeros((7, 9, 10), np.uint8), props, tmp_path / "a.nii.gz")
    assert not list(tmp_path.glob("a.nii.gz*")) and not list(tmp_path.glob(".a.nii.gz*"))


def test_label_grid_check(tmp_path, rng):
    vol = canonical_volume(rng)
    src = tmp_path / "a_0000.nii.gz"
    img = sitk.GetImageFromArray(vol)
    sitk.WriteImage(img, str(src))
    lab = sitk.GetImageFromArray((vol > 0).astype(np.uint8))
    lab.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(lab, str(tmp_path / "a.nii.gz"))
    _, props = read_ct(src)
    with pytest.raises(GeometryError, match="spacing"):
        read_label_like(tmp_path / "a.nii.gz", props)


def test_label_values_out_of_range(tmp_path):
    lab = tmp_path / "l.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 4, 5), -3, np.int16)), str(lab))
    with pytest.raises(InputError, match="0..13"):
        read_ct(lab, label=True)


def test_case_names_and_listing(tmp_path):
    for n in ["A_0000.nii.gz", "B_0000.nii", "C_0000.mha", "D.nii.gz", ".hidden_0000.nii.gz", "E_0001.nii.gz"]:
        (tmp_path / n).write_bytes(b"x")
    assert [p.name for p in list_cases(tmp_path)] == ["A_0000.nii.gz", "B_0000.nii", "C_0000.mha"]
    assert case_name("FLARETs_0001_0000.nii.gz") == "FLARETs_0001"
    assert case_name("x/Case_00001_0000.mha") == "Case_00001"


@pytest.mark.parametrize("case", shared_cases() or ["none"])
def test_real_volumes_keep_geometry(shared_data, tmp_path, case):
    src = shared_data / "images" / f"{case}_0000.nii.gz"
    arr, props = read_ct(src)
    labels = read_label_like(shared_data / "labels" / f"{case}.nii.gz", props)
    assert labels.shape == arr.shape
    out = write_labels(labels, props, tmp_path / f"{case}.nii.gz")
    a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "labels" / f"{case}.nii.gz")))
    assert np.array_equal(sitk.GetArrayFromImage(b), ref)
    check_same_grid(read_ct(out, label=True)[1], props, what="written labels")

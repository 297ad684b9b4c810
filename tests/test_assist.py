"""Annotation assist: drawn slices kept, undrawn organs absent, bad annotations refused."""
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from app.assist import FusionConfig, fill_modes, fuse, interpolate, largest_area_slices, nearest_copy, propagate_annotations
from app.shapes import ShapeInterpolator, signed_distance
from evaluation.phantom import generate
from app.propagation import PropagationConfig

from .test_propagation import CopyBackend


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("assist")
    c = generate(5, (24, 48, 48))
    img, lab = c.images()
    sitk.WriteImage(img, str(root / "ct.nii.gz"))
    ann = np.zeros_like(c.labels)
    drawn = [6, 12, 18]
    ann[drawn] = c.labels[drawn]
    ann[ann == 9] = 0  # the gallbladder is never drawn
    a = sitk.GetImageFromArray(ann)
    a.CopyInformation(img)
    sitk.WriteImage(a, str(root / "ann.nii.gz"))
    return root, c, ann, drawn


def test_largest_area_and_nearest_copy():
    lab = np.zeros((5, 4, 4), np.uint8)
    lab[1, :2, :2] = 1
    lab[3, :, :] = 1
    lab[0, 0, 0] = 2
    assert largest_area_slices(lab) == [0, 3]
    copy = nearest_copy(lab, [0, 3])
    assert np.array_equal(copy[1], lab[0]) and np.array_equal(copy[2], lab[3]) and np.array_equal(copy[4], lab[3])


def disc(hw, centre, radius):
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_signed_distance_sign():
    m = disc((32, 32), (16, 16), 6)
    d = signed_distance(m)
    assert (d[m] >= 1).all() and (d[~m] <= -1).all()
    assert d[16, 16] == pytest.approx(d.max())


def test_interp_blends_radius_and_follows_a_moving_organ():
    ann = np.zeros((11, 64, 64), np.uint8)
    ann[0][disc((64, 64), (32, 20), 6)] = 3
    ann[10][disc((64, 64), (32, 40), 12)] = 3
    si = ShapeInterpolator(ann, [0, 10])
    mid = si.labels(5) == 3
    # centre drifts linearly and the radius is the mean of the two
    assert abs(np.argwhere(mid).mean(axis=0)[1] - 30) < 1
    assert abs(np.sqrt(mid.sum() / np.pi) - 9) < 1
    # without the alignment the two shapes' overlap is all that is left
    plain = ShapeInterpolator(ann, [0, 10], align=False).labels(5) == 3
    assert plain.sum() < 0.5 * mid.sum()
    # drawn slices are returned as drawn, slices beyond the drawn range copy the nearest
    assert np.array_equal(si.labels(0), ann[0])
    out = interpolate(ann[:8].copy(), [0])  # one drawn slice: every slice copies it
    assert all(np.array_equal(out[t], ann[0]) for t in range(8))


def test_interp_organ_on_one_side_tapers_and_vanishes():
    ann = np.zeros((11, 48, 48), np.uint8)
    ann[0][disc((48, 48), (24, 24), 10)] = 1
    ann[10][disc((48, 48), (10, 10), 4)] = 2
    out = interpolate(ann, [0, 10], vanish=1.0)
    areas = [(out[t] == 1).sum() for t in range(11)]
    assert areas[0] > areas[2] > areas[4] > 0  # shrinks towards the slice without it
    assert areas[5] == 0 and areas[10] == 0  # gone by the midpoint (vanish 1)
    # a later vanishing point keeps more of it
    assert (interpolate(ann, [0, 10], vanish=0.5)[4] == 1).sum() > areas[4]


def test_fuse_without_stcn_is_the_interpolation():
    ann = np.zeros((9, 32, 32), np.uint8)
    ann[0][disc((32, 32), (16, 16), 5)] = 4
    ann[8][disc((32, 32), (16, 18), 7)] = 4
    si = ShapeInterpolator(ann, [0, 8])

    class Result:  # STCN says: organ 4 fills the whole slice
        def organ_probs(self, t):
            p = np.zeros((13, 16, 16), np.float32)
            p[3] = 1
            return p

    for t in range(1, 8):
        assert np.array_equal(fuse(si, Result(), t, (32, 32), FusionConfig(stcn_weight=0.0)), si.labels(t))
    full = fuse(si, Result(), 4, (32, 32), FusionConfig(stcn_weight=1.0, ramp=1.0))
    assert (full == 4).all()  # all weight on STCN at distance >= ramp


def test_modes_without_a_backend(case):
    _, c, ann, drawn = case
    near, s1 = propagate_annotations(None, c.image, ann, drawn, (0, 0), mode="nearest")
    assert np.array_equal(near, nearest_copy(ann, drawn)) and s1["mode"] == "nearest"
    interp, _ = propagate_annotations(None, c.image, ann, drawn, (0, 0), mode="interp")
    for t in drawn:
        assert np.array_equal(interp[t], ann[t])
    assert not (interp == 9).any()
    assert not np.array_equal(interp, near)
    with pytest.raises(ValueError, match="mode"):
        propagate_annotations(None, c.image, ann, drawn, (0, 0), mode="magic")


def test_engine_fill_keeps_drawn_slices(case):
    _, c, ann, drawn = case

    class Backend(CopyBackend):
        stride = 16

        def _pool(self, x):
            b, ch, h, w = x.shape
            return x.reshape(b, ch, h // 16, 16, w // 16, 16).mean(axis=(3, 5))

        def encode_key(self, images):
            out = super().encode_key(images)
            b, _, h, w = images.shape
            gy, gx = np.meshgrid(np.arange(h // 16), np.arange(w // 16), indexing="ij")
            out["key"] = np.broadcast_to(np.stack([gy, gx]).astype(np.float32) * 10, (b, 2, h // 16, w // 16)).copy()
            out["qv"] = np.ones((b, 1, h // 16, w // 16), np.float32)
            out["f16"] = out["qv"].copy()
            return out

        def decode(self, readout, qv, s8, s4):
            logits = 20 * (readout - 0.5)
            return np.repeat(np.repeat(logits, 16, axis=2), 16, axis=3).astype(np.float32)

    cfg = PropagationConfig(top_k=1)
    together, _ = fill_modes(Backend(), c.image, ann, drawn, (64, 64), ["nearest", "interp", "stcn", "fused"],
                             config=cfg, variants={"light": FusionConfig(stcn_weight=0.1)})
    assert set(together) == {"nearest", "interp", "stcn", "fused", "light"}
    for mode in ("stcn", "fused"):
        out, stats = propagate_annotations(Backend(), c.image, ann, drawn, (64, 64), config=cfg, mode=mode)
        for t in drawn:
            assert np.array_equal(out[t], ann[t])  # never changed
        assert not (out == 9).any()  # never drawn: absent
        assert stats["references"] == drawn and stats["seconds_per_slice"] > 0 and "engine" in stats
        assert np.array_equal(out, together[mode])  # one engine run serves every mode alike


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "app", "propagate", *map(str, args)], capture_output=True, text=True)


def test_cli_fills_and_reports(case, tiny_bundle, tmp_path):
    root, c, ann, drawn = case
    r = run_cli("--image", root / "ct.nii.gz", "--annotations", root / "ann.nii.gz", "--out", tmp_path / "f.nii.gz",
                "--bundle", tiny_bundle, "--threads", "1", "--mode", "fused")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ms per slice" in r.stdout and "(fused)" in r.stdout
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "f.nii.gz")))
    for t in drawn:
        assert np.array_equal(out[t], ann[t])
    assert not (out == 9).any()
    assert (tmp_path / "f.json").exists()


def test_cli_bad_annotations(case, tiny_bundle, tmp_path):
    root, c, ann, _ = case
    img = sitk.ReadImage(str(root / "ct.nii.gz"))
    # another grid
    other = sitk.GetImageFromArray(ann[:, :40, :40])
    sitk.WriteImage(other, str(tmp_path / "grid.nii.gz"))
    r = run_cli("--image", root / "ct.nii.gz", "--annotations", tmp_path / "grid.nii.gz", "--out", tmp_path / "o.nii.gz",
                "--bundle", tiny_bundle)
    assert r.returncode == 2 and "not on the grid" in r.stderr
    # labels outside 0..13
    bad = ann.copy()
    bad[6, 0, 0] = 20
    b = sitk.GetImageFromArray(bad)
    b.CopyInformation(img)
    sitk.WriteImage(b, str(tmp_path / "values.nii.gz"))
    r = run_cli("--image", root / "ct.nii.gz", "--annotations", tmp_path / "values.nii.gz", "--out", tmp_path / "o.nii.gz",
                "--bundle", tiny_bundle)
    assert r.returncode == 2 and "0..13" in r.stderr
    # nothing drawn
    z = sitk.GetImageFromArray(np.zeros_like(ann))
    z.CopyInformation(img)
    sitk.WriteImage(z, str(tmp_path / "empty.nii.gz"))
    r = run_cli("--image", root / "ct.nii.gz", "--annotations", tmp_path / "empty.nii.gz", "--out", tmp_path / "o.nii.gz",
                "--bundle", tiny_bundle)
    assert r.returncode == 2 and "no annotated slice" in r.stderr
    assert not (tmp_path / "o.nii.gz").exists()


def test_cli_interp_needs_no_bundle(case, tmp_path):
    root, c, ann, drawn = case
    r = run_cli("--image", root / "ct.nii.gz", "--annotations", root / "ann.nii.gz", "--out", tmp_path / "i.nii.gz",
                "--mode", "interp")
    assert r.returncode == 0, r.stderr[-2000:]
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "i.nii.gz")))
    assert np.array_equal(out, interpolate(ann, drawn))
    r = run_cli("--image", root / "ct.nii.gz", "--annotations", root / "ann.nii.gz", "--out", tmp_path / "s.nii.gz",
                "--mode", "stcn")
    assert r.returncode == 2 and "needs --bundle" in r.stderr and "Traceback" not in r.stderr


def test_absent_on_a_drawn_slice_votes_zero():
    """An organ drawn on slice 2 and not on slice 10 (which shows another organ): with
    absent votes the pass from 10 votes it absent, weighted by distance, so it ends near the
    midpoint as the copy does; without them the copying stand-in carries it to slice 9."""
    n, hw = 12, (32, 32)
    vol = np.full((n, *hw), 1000.0, np.float32)  # bright: the stand-in never lets an organ vanish
    ann = np.zeros((n, *hw), np.uint8)
    ann[2, 4:12, 4:16] = 1
    ann[10, 20:28, 16:24] = 3
    cfg = PropagationConfig(top_k=1)
    kept = [bool((lab == 1).any()) for lab in fill_modes(CopyBackend(), vol, ann, [2, 10], hw, ["stcn"], config=cfg,
                                                         absent_votes=False)[0]["stcn"][3:10]]
    assert all(kept)
    voted = fill_modes(CopyBackend(), vol, ann, [2, 10], hw, ["stcn"], config=cfg)[0]["stcn"]
    assert [bool((voted[t] == 1).any()) for t in range(3, 10)] == [True] * 3 + [False] * 4
    assert [bool((voted[t] == 3).any()) for t in range(3, 10)] == [False] * 4 + [True] * 3  # 6: a tie, background

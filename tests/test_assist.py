"""Annotation assist: drawn slices kept, undrawn organs absent, bad annotations refused."""
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from app.assist import largest_area_slices, nearest_copy, propagate_annotations
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

    out, stats = propagate_annotations(Backend(), c.image, ann, drawn, (64, 64), config=PropagationConfig(top_k=1))
    for t in drawn:
        assert np.array_equal(out[t], ann[t])  # never changed
    assert not (out == 9).any()  # never drawn: absent
    assert stats["references"] == drawn and stats["seconds_per_slice"] > 0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "app", "propagate", *map(str, args)], capture_output=True, text=True)


def test_cli_fills_and_reports(case, tiny_bundle, tmp_path):
    root, c, ann, drawn = case
    r = run_cli("--image", root / "ct.nii.gz", "--annotations", root / "ann.nii.gz", "--out", tmp_path / "f.nii.gz",
                "--bundle", tiny_bundle, "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ms per slice" in r.stdout
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

import numpy as np
import pytest

from app.resize import linear_matrix, resize_labels_nearest, resize_stack
from app.windowing import DEFAULT_WINDOWS, Window, window_slices


def test_window_bounds_are_unions_of_sub_windows():
    assert [w.bounds for w in DEFAULT_WINDOWS] == [(-150.0, 250.0), (-1350.0, 225.0), (-500.0, 1300.0)]
    assert [w.name for w in DEFAULT_WINDOWS] == ["abdomen", "chest", "spine"]


def test_window_values_at_edges():
    hu = np.array([[[-2000, -150, 250, 50, 1300, 3000]]], dtype=np.int16)
    out = window_slices(hu)
    assert out.shape == (1, 3, 1, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], [0, 0, 1, 0.5, 1, 1], atol=1e-6)
    np.testing.assert_allclose(out[0, 1, 0, :2], [0, 1200 / 1575], atol=1e-6)
    np.testing.assert_allclose(out[0, 2, 0], [0, 350 / 1800, 750 / 1800, 550 / 1800, 1, 1], atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1


def test_window_json_round_trip():
    for w in DEFAULT_WINDOWS:
        assert Window.from_json(w.to_json()) == w


def test_window_rejects_volume_shape():
    with pytest.raises(ValueError):
        window_slices(np.zeros((1, 2, 3, 4)))


def test_linear_matrix_rows_sum_to_one_and_identity():
    m = linear_matrix(37, 16)
    np.testing.assert_allclose(m.sum(1), 1, atol=1e-6)
    assert np.array_equal(linear_matrix(8, 8), np.eye(8, dtype=np.float32))


def test_resize_constant_and_linear_ramp():
    x = np.full((2, 3, 10, 12), 7.0, np.float32)
    np.testing.assert_allclose(resize_stack(x, (5, 20)), 7.0, atol=1e-5)
    ramp = np.tile(np.arange(8, dtype=np.float32), (4, 1))
    up = resize_stack(ramp, (4, 16))
    # half-pixel sampling: interior outputs lie on the ramp, edges clamp
    np.testing.assert_allclose(up[0, 1:-1], (np.arange(1, 15) + 0.5) / 2 - 0.5, atol=1e-5)


def test_nearest_label_resize():
    lab = np.arange(16).reshape(4, 4)
    assert np.array_equal(resize_labels_nearest(lab, (2, 2)), [[5, 7], [13, 15]])


def test_argmax_resized_matches_full_resize_when_channels_win():
    from app.resize import argmax_resized

    rng = np.random.default_rng(0)
    scores = np.zeros((14, 16, 16), np.float32)
    scores[0] = 0.6
    scores[3, 4:10, 4:10] = 0.9
    scores[7, 10:14, 2:6] = 0.8
    scores += rng.random(scores.shape).astype(np.float32) * 0.01
    full = resize_stack(scores, (40, 40)).argmax(0)
    assert np.array_equal(argmax_resized(scores, (40, 40)), full)
    assert argmax_resized(np.stack([np.ones((4, 4)), np.zeros((4, 4))]), (9, 9)).tolist() == [[0] * 9] * 9

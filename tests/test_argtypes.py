"""The shared command-line argument types: values through, bad ones refused with a reason."""
import argparse

import pytest

from app import argtypes


def test_values_pass_through(tmp_path):
    assert argtypes.existing_dir(str(tmp_path)) == tmp_path
    assert argtypes.positive_int("3") == 3
    assert argtypes.nonneg_int("0") == 0
    assert argtypes.positive_float("0.5") == 0.5
    assert argtypes.nonneg_float("0") == 0.0
    assert argtypes.probability("1") == 1.0 and argtypes.probability("0") == 0.0


@pytest.mark.parametrize("fn, value, reason", [
    (argtypes.positive_int, "0", "at least 1"),
    (argtypes.positive_int, "two", "not an integer"),
    (argtypes.nonneg_int, "-1", ">= 0"),
    (argtypes.positive_float, "0", "> 0"),
    (argtypes.positive_float, "x", "not a number"),
    (argtypes.positive_float, "inf", "not a finite number"),
    (argtypes.nonneg_float, "-0.1", ">= 0"),
    (argtypes.probability, "1.01", "between 0 and 1"),
    (argtypes.probability, "nan", "not a finite number"),
])
def test_bad_values_are_refused_with_a_reason(fn, value, reason):
    with pytest.raises(argparse.ArgumentTypeError, match=reason):
        fn(value)


def test_a_file_is_not_a_folder(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="not a folder"):
        argtypes.existing_dir(str(f))

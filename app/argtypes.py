"""Argument types shared by the subcommands: each turns a command-line string into a value
or raises argparse.ArgumentTypeError, which argparse reports with the option's name."""
from __future__ import annotations

import argparse
from pathlib import Path


def existing_dir(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is not a folder")
    return path


def _integer(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
    return number


def _bounded(name: str, parse, ok, need: str):
    """A checked numeric type: ``parse`` the string, then refuse a value for which ``ok`` is
    false with "must be <need>, got <value>"."""
    def check(value: str):
        number = parse(value)
        if not ok(number):
            raise argparse.ArgumentTypeError(f"must be {need}, got {value}")
        return number

    check.__name__ = check.__qualname__ = name
    return check


positive_int = _bounded("positive_int", _integer, lambda n: n >= 1, "at least 1")
nonneg_int = _bounded("nonneg_int", _integer, lambda n: n >= 0, ">= 0")
positive_float = _bounded("positive_float", _number, lambda n: n > 0, "> 0")
nonneg_float = _bounded("nonneg_float", _number, lambda n: n >= 0, ">= 0")
# a probability, fraction or score threshold
probability = _bounded("probability", _number, lambda n: 0 <= n <= 1, "between 0 and 1")


# Every numeric command-line type: tests/test_cli_numbers.py fails on a plain int or float.
NUMERIC_TYPES = (positive_int, nonneg_int, positive_float, nonneg_float, probability)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), not the usage
    block: ``flare22 predict: error: argument --batch: must be at least 1, got 0``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

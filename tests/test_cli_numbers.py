"""Every numeric command-line argument is checked when it is parsed: a plain ``int`` or
``float`` type lets ``--batch 0`` or ``--threshold 7`` through to fail (or do something odd)
halfway through a run. This walks the parser of every ``flare22`` command and of every
script in bench/ (and the demo) and fails on any option typed ``int`` / ``float``."""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from app import argtypes

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "__init__") + ["training.demo"]


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def _script_parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script's main() builds, caught at its parse_args call (nothing runs)."""
    module = importlib.import_module(name if "." in name else f"bench.{name}")

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", [name])
    with pytest.raises(_Captured) as info:
        module.main()
    return info.value.parser


def _command_parser(name: str) -> argparse.ArgumentParser:
    from flare22.cli import COMMANDS

    parser = argtypes.OneLineParser(prog=f"flare22 {name}")
    COMMANDS[name][0]().add_arguments(parser)
    return parser


def plain_numbers(parser: argparse.ArgumentParser) -> list[str]:
    """Options whose type is a bare int / float (or a lambda) instead of a checked type; an
    int or float with ``choices`` is checked by argparse itself."""
    bad = []
    for action in parser._actions:
        t = action.type
        if (t in (int, float) and action.choices is None) or getattr(t, "__name__", "") == "<lambda>":
            bad.append(f"{'/'.join(action.option_strings) or action.dest}: type={getattr(t, '__name__', t)}")
    return bad


def numeric_options(parser: argparse.ArgumentParser) -> list[str]:
    return [a.option_strings[0] for a in parser._actions if a.type in argtypes.NUMERIC_TYPES]


def _commands() -> list[str]:
    from flare22.cli import COMMANDS

    return list(COMMANDS)


def test_the_walk_catches_a_plain_int():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--ok", type=argtypes.positive_int)
    p.add_argument("--edition", type=int, choices=(22, 23))
    assert plain_numbers(p) == ["--batch: type=int", "--lr: type=float"]


@pytest.mark.parametrize("name", _commands())
def test_every_flare22_command_validates_its_numbers(name):
    parser = _command_parser(name)
    assert plain_numbers(parser) == []


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_validates_its_numbers(name, monkeypatch):
    parser = _script_parser(name, monkeypatch)
    assert plain_numbers(parser) == []


def test_the_walk_sees_the_numeric_options():
    """The walk is not vacuous: the commands do have numeric options, all of checked types."""
    seen = {name: numeric_options(_command_parser(name)) for name in _commands()}
    assert "--batch" in seen["predict"] and "--review-threshold" in seen["predict"]
    assert "--iterations" in seen["train-reference"] and "--cps-start" in seen["train-reference"]
    assert sum(len(v) for v in seen.values()) >= 30


@pytest.mark.parametrize("argv, problem", [
    (["predict", "--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["predict", "--review-threshold", "1.5"], "argument --review-threshold: must be between 0 and 1"),
    (["train-reference", "--cps-start", "nan"], "argument --cps-start: 'nan' is not a finite number"),
    (["export", "--every", "x"], "argument --every: 'x' is not an integer"),
])
def test_a_bad_number_is_a_one_line_usage_error(argv, problem, tmp_path):
    args = argv + ["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--bundle", str(tmp_path)] \
        if argv[0] == "predict" else argv
    r = subprocess.run([sys.executable, "-m", "flare22", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0], r.stderr
    assert lines[0].startswith(f"flare22 {argv[0]}: error:")


@pytest.mark.parametrize("command", ["train-reference", "train-propagation"])
def test_trainer_flags_come_from_the_config(command):
    """Each default lives in the config dataclass only: parsing no options gives its default
    config, and every scalar field has a flag."""
    import dataclasses

    from training import trainer as T
    from training.train_propagation import PropagationTrainConfig
    from training.train_reference import ReferenceTrainConfig

    cls = {"train-reference": ReferenceTrainConfig, "train-propagation": PropagationTrainConfig}[command]
    parser = _command_parser(command)
    assert T.config_from_args(cls, parser.parse_args(["--labelled", "L", "--out", "O"])) == cls(labelled="L")
    scalar = {f.name for f in dataclasses.fields(cls) if f.type in ("int", "float", "str", "bool")}
    assert scalar <= {a.dest for a in parser._actions} and len(scalar) >= 15
    flags = ["--labelled", "L", "--out", "O", "--no-amp", "--seed", "3", "--max-minutes", "1.5"]
    cfg = T.config_from_args(cls, parser.parse_args(flags))
    assert (cfg.amp, cfg.seed, cfg.max_minutes) == (False, 3, 1.5)
    if cls is ReferenceTrainConfig:
        cfg = T.config_from_args(cls, parser.parse_args(["--labelled", "L", "--out", "O", "--cps-rampup", "0.3",
                                                         "--no-augment"]))
        assert (cfg.rampup, cfg.augment) == (0.3, False)

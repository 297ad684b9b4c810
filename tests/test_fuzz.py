"""The fuzz (issue 17), 20 seconds of it: hostile header fields, truncations and flipped
bytes over .nii, .nii.gz and .mha inputs and over a bundle's manifest and graphs find no
traceback, no hang and no write outside the output folder. `flare22 fuzz --seconds 120`
is the longer run anyone can start."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from evaluation import fuzz


def test_mutations_are_seeded(tmp_path):
    seeds = fuzz.write_seeds(tmp_path / "seeds")
    for kind, path in seeds.items():
        data = path.read_bytes()
        a = fuzz.mutate_image(np.random.default_rng([3, 7]), kind, data)
        b = fuzz.mutate_image(np.random.default_rng([3, 7]), kind, data)
        assert a == b
    raw = gzip.decompress(seeds[".nii.gz"].read_bytes())
    changed = fuzz._nifti_field(np.random.default_rng(0), raw)
    assert len(changed) == len(raw) and changed != raw


def test_manifest_mutation_changes_one_thing(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    for k in range(20):
        m, what = fuzz.mutate_manifest(np.random.default_rng([0, k]), manifest)
        assert m != manifest and what


@pytest.mark.slow
def test_fuzz_20_seconds(tiny_bundle, tmp_path):
    lines = []
    summary = fuzz.fuzz(tiny_bundle, 20.0, seed=0, work=tmp_path, log=lines.append)
    assert summary["trials"] >= 3
    assert summary["failures"] == [], "\n".join(lines)
    kinds = {k for k, exits in summary["exits"].items() if exits}
    assert kinds == {"image", "bundle"} or summary["trials"] < 6


def test_fuzz_catches_a_write_outside_the_output_folder(tiny_bundle, tmp_path, monkeypatch):
    """The judge itself: a command that writes beside its output folder fails the trial."""
    seeds = fuzz.write_seeds(tmp_path / "seeds")
    spec = fuzz.build_trial(0, 0, tmp_path / "trials", seeds, tiny_bundle)

    def rogue(argv):
        (tmp_path / "trials" / "trial00000" / "in" / "stray.txt").write_text("x")
        raise ValueError("boom")

    monkeypatch.setattr("app.cli.main", rogue)
    result = fuzz.run_trial(spec)
    problems = " ".join(result["problems"])
    assert "changed outside the output folder" in problems and "stray.txt" in problems
    assert "exception escaped the command: ValueError: boom" in problems

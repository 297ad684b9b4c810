"""Shared fixtures: tiny synthetic volumes and the optional real CT data beside the checkout."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FLARE22_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_cases() -> list[str]:
    if not (SHARED_DATA / "images").is_dir():
        return []
    return sorted(p.name[: -len("_0000.nii.gz")] for p in (SHARED_DATA / "images").glob("*_0000.nii.gz"))


@pytest.fixture
def shared_data() -> Path:
    if not shared_cases():
        pytest.skip(f"real CT data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A `tiny` random-weight bundle with torch.export programs, exported once per session
    (about 20-30 s): the appliance's tests run real ONNX graphs without any checkpoint."""
    from export.bundle import export_bundle

    return export_bundle(tmp_path_factory.mktemp("bundle") / "tiny", ref_config="tiny", stcn_config="tiny",
                         seed=0, programs=True, quiet=True)


@pytest.fixture(scope="session")
def phantom_cases(tmp_path_factory) -> Path:
    """A FLARE case folder of three small phantom CTs (no labels): ``Phantom_0001`` and
    ``Phantom_0002`` in the canonical orientation, ``Rot_0001`` in a random axis-aligned one.
    Returns the ``images`` folder."""
    from evaluation.phantom import write_dataset

    root = tmp_path_factory.mktemp("phantoms")
    write_dataset(root, 2, seed=0, shape_zyx=(24, 48, 48), unlabeled=True)
    write_dataset(root, 1, seed=1, shape_zyx=(24, 48, 48), prefix="Rot", unlabeled=True, random_orientation=True)
    return root / "images"


def editable_bundle_copy(src: Path, dst: Path) -> Path:
    """A cheap editable copy of a bundle: a real manifest, hard links to the other files
    (a bundle's files must be its own: a link leaving the folder is refused)."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name == "manifest.json":
            shutil.copy(p, dst / p.name)
        else:
            try:
                os.link(p, dst / p.name)
            except OSError:
                shutil.copy(p, dst / p.name)
    return dst

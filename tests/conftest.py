"""Shared fixtures: tiny synthetic volumes and the optional real CT data beside the checkout."""
from __future__ import annotations

import os
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

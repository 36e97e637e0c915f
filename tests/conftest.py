"""Shared test fixtures. Tests that need ../shared skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEDMEDCLIP_SHARED", REPO.parent / "shared"))
BRAIN_MRI = SHARED / "datasets" / "brain-tumor-mri"


@pytest.fixture(scope="session")
def brain_mri() -> Path:
    if not (BRAIN_MRI / "Training").is_dir():
        pytest.skip(f"real MRI data not found at {BRAIN_MRI} (only present with ../shared beside the clone)")
    return BRAIN_MRI

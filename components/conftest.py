"""What the tests beside the components share: offline model loading, and kfp.local set up for one test
(each component's kfp.local test runs its KFP definition as a real task, a subprocess of this Python)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

# A small synthetic data set: 4 classes, 2 sites x 6 images per class, 2 global test images per class, 24 px.
SYNTH = {"per_class_per_site": 6, "test_per_class": 2, "size": 24}


@pytest.fixture
def kfp_local(tmp_path):
    """kfp.local for one test (pipelines/_kfp_local.py: local_session), its artifacts under tmp_path."""
    from pipelines._kfp_local import local_session

    with local_session(tmp_path / "kfp") as local:
        yield local

"""The extract component: each party's feature store is the one the in-process preparation builds for that
holder (same provenance digest, same features), so the worker reuses it instead of encoding again."""

from __future__ import annotations

import json

import pytest
import torch

from components.conftest import SYNTH
from components.extract.component import extract_step
from fedmedclip.config import TrainConfig
from fedmedclip.features import FeatureStore
from fedmedclip.preparation import SERVER, prepare


@pytest.mark.parametrize(("role", "holder", "index"), [("server", SERVER, -1), ("site", "site_1", 1)])
def test_a_partys_store_is_the_preparations(tmp_path, role, holder, index):
    settings = {
        "sites": 2,
        "synthetic": SYNTH,
        "cache_dir": str(tmp_path / "cache"),
        "preprocessing": "squash",
    }
    prov = extract_step(json.dumps(settings), role, holder, index, str(tmp_path / "features"))
    ref = prepare(TrainConfig(**settings, out="").validate(), progress=False, holders=[holder]).stores[holder]
    got = FeatureStore.load(tmp_path / "features")
    assert prov["digest"] == ref.provenance["digest"] == got.provenance["digest"]
    assert got.image_ids == ref.image_ids and torch.equal(got.features, ref.features)

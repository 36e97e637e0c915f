"""The worker component's own parts: each party's feature store is the one the in-process preparation builds
for that holder, published to the party's private area of the run so that a retried task fetches it instead of
encoding again; the store lands where the worker's preparation looks for it; a site keeps its private state
under its own prefix; and a server worker retried after it published the run directory does nothing again.
(The workers running a whole federation together: tests/test_pipeline_steps.py and, as kfp.local tasks,
tests/test_pipeline.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from components.conftest import SYNTH
from components.worker.component import (
    FEATURES_MANIFEST,
    MAX_RUN_DIR_MANIFEST_BYTES,
    RUN_DIR,
    RUN_DIR_FORMAT,
    RUN_DIR_MANIFEST,
    copy_store_into_cache,
    extract_step,
    features_step,
    read_run_dir_manifest,
    site_state_url,
    worker_step,
)
from fedmedclip.config import TrainConfig
from fedmedclip.features import FeatureStore
from fedmedclip.federation.storage import LocalDirStore
from fedmedclip.preparation import SERVER, prepare
from mlops.policies import SITE_PRIVATE


def _extraction_settings(tmp_path) -> dict:
    return {"sites": 2, "synthetic": SYNTH, "cache_dir": str(tmp_path / "cache"), "preprocessing": "squash"}


def test_the_extracted_store_is_where_the_workers_preparation_looks(tmp_path):
    store = tmp_path / "features"
    tensors = torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64), torch.ones(1, 2)
    FeatureStore(*tensors[:2], ["a"], ["c"], tensors[2], {"digest": "ab" * 32}).save(store)
    copy_store_into_cache(str(store), str(tmp_path / "cache"))
    copied = tmp_path / "cache" / "features" / ("ab" * 12)
    for name in ("features.safetensors", "index.json", "provenance.json"):
        assert (copied / name).read_bytes() == (store / name).read_bytes()
    (copied / "features.safetensors").write_bytes(b"kept")
    copy_store_into_cache(str(store), str(tmp_path / "cache"))  # already there: never replaced
    assert (copied / "features.safetensors").read_bytes() == b"kept"


def test_a_sites_state_is_under_its_own_prefix():
    url = site_state_url("s3://bucket/fed/", 3, "run-9")
    assert url == "s3://bucket/fed/sites/3/private/run-9"
    assert url.removeprefix("s3://bucket/fed/").startswith(SITE_PRIVATE.format(k=3).rstrip("*"))


def test_a_server_worker_retried_after_publishing_does_nothing_again(tmp_path):
    published = tmp_path / "mailbox" / "runs" / "run-1" / "server" / RUN_DIR
    published.mkdir(parents=True)
    files = {"results.json": {"sha256": "0" * 64, "size": 2}}
    manifest = json.dumps({"format": 2, "run_id": "run-1", "files": files, "mlflow_run_id": "mlflow-7"})
    (published / RUN_DIR_MANIFEST).write_text(manifest)
    cfg = TrainConfig(out="", cache_dir=str(tmp_path / "cache")).validate()
    got = worker_step(
        json.dumps(cfg.to_json()), "server", "server", -1, "run-1", str(tmp_path / "mailbox"), None
    )
    assert got == "mlflow-7"
    assert (published / RUN_DIR_MANIFEST).read_text() == manifest  # nothing rewritten
    assert not (tmp_path / "cache").exists()  # nothing prepared, nothing trained


def test_a_published_run_directory_manifest_is_read_bounded_and_checked(tmp_path):
    """What a retried server worker (and the report task) reads back from the server's private area: bounded in
    size and checked, so a damaged or foreign manifest is refused (the worker then publishes again), never a
    traceback or a skipped run."""
    store = LocalDirStore(tmp_path / "published")
    assert read_run_dir_manifest(store, "run-1") is None
    good = {
        "format": RUN_DIR_FORMAT,
        "run_id": "run-1",
        "files": {"results.json": {"sha256": "0" * 64, "size": 2}},
    }
    store.put(RUN_DIR_MANIFEST, json.dumps(good).encode())
    assert read_run_dir_manifest(store, "run-1") == good
    for damaged in (
        b"{not json",
        b"[1, 2]",
        json.dumps({**good, "run_id": "run-0"}).encode(),
        json.dumps({**good, "files": {}}).encode(),
        b" " * (MAX_RUN_DIR_MANIFEST_BYTES + 1),
    ):
        store.put(RUN_DIR_MANIFEST, damaged)
        with pytest.raises(ValueError, match="is not run run-1's run directory manifest"):
            read_run_dir_manifest(store, "run-1")


@pytest.mark.parametrize(("role", "holder", "index"), [("server", SERVER, -1), ("site", "site_1", 1)])
def test_a_partys_store_is_the_preparations(tmp_path, role, holder, index):
    settings = _extraction_settings(tmp_path)
    prov = extract_step(json.dumps(settings), role, holder, index, str(tmp_path / "features"))
    ref = prepare(TrainConfig(**settings, out="").validate(), progress=False, holders=[holder]).stores[holder]
    got = FeatureStore.load(tmp_path / "features")
    assert prov["digest"] == ref.provenance["digest"] == got.provenance["digest"]
    assert got.image_ids == ref.image_ids and torch.equal(got.features, ref.features)


@pytest.mark.parametrize(
    ("role", "party", "index", "area"),
    [
        ("server", "server", -1, "runs/run-1/server/features"),
        ("site", "site_1", 1, "sites/1/private/run-1/features"),
    ],
)
def test_a_retried_worker_fetches_the_features_it_published_instead_of_encoding_again(
    tmp_path, role, party, index, area
):
    mailbox, extraction = str(tmp_path / "mailbox"), json.dumps(_extraction_settings(tmp_path))
    assert features_step(extraction, role, party, index, "run-1", mailbox, str(tmp_path / "first"))
    published = tmp_path / "mailbox" / area
    assert (published / FEATURES_MANIFEST).is_file() and (published / "features.safetensors").is_file()
    first = FeatureStore.load(tmp_path / "first")

    shutil.rmtree(tmp_path / "cache")  # a fresh pod: nothing on its disk
    assert not features_step(extraction, role, party, index, "run-1", mailbox, str(tmp_path / "retry"))
    assert not (tmp_path / "cache").exists()  # fetched: nothing encoded, no backbone loaded
    again = FeatureStore.load(tmp_path / "retry")
    assert again.provenance == first.provenance and torch.equal(again.features, first.features)

    # A damaged published file is never used: the party encodes its images again and republishes them.
    (published / "features.safetensors").write_bytes(b"damaged")
    assert features_step(extraction, role, party, index, "run-1", mailbox, str(tmp_path / "third"))
    assert torch.equal(FeatureStore.load(tmp_path / "third").features, first.features)
    # Another extraction's manifest (other settings under the same run) is not reused either.
    other = json.dumps({**_extraction_settings(tmp_path), "prompt_template": "an image of {}"})
    assert features_step(other, role, party, index, "run-1", mailbox, str(tmp_path / "other"))

"""The worker component's own parts: the extraction task's store lands where the worker's preparation looks
for it, a site keeps its private state under its own prefix, and a server worker retried after it published
the run directory does nothing again. (The workers running a whole federation together: tests/test_pipeline_steps.py
and, as kfp.local tasks, tests/test_pipeline.py.)"""

from __future__ import annotations

import json

from components.worker.component import (
    RUN_DIR,
    RUN_DIR_MANIFEST,
    copy_store_into_cache,
    site_state_url,
    worker_step,
)
from fedmedclip.config import TrainConfig
from mlops.policies import SITE_PRIVATE


def test_the_extracted_store_is_where_the_workers_preparation_looks(tmp_path):
    store = tmp_path / "features"
    store.mkdir()
    (store / "provenance.json").write_text(json.dumps({"digest": "ab" * 32}))
    (store / "features.safetensors").write_bytes(b"f")
    copy_store_into_cache(str(store), str(tmp_path / "cache"))
    copied = tmp_path / "cache" / "features" / ("ab" * 12)
    assert (copied / "features.safetensors").read_bytes() == b"f"
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
    manifest = json.dumps({"format": 2, "run_id": "run-1", "files": {}, "mlflow_run_id": "mlflow-7"})
    (published / RUN_DIR_MANIFEST).write_text(manifest)
    cfg = TrainConfig(out="", cache_dir=str(tmp_path / "cache")).validate()
    got = worker_step(
        json.dumps(cfg.to_json()), "server", "server", -1, "run-1", str(tmp_path / "mailbox"), None
    )
    assert got == "mlflow-7"
    assert (published / RUN_DIR_MANIFEST).read_text() == manifest  # nothing rewritten
    assert not (tmp_path / "cache").exists()  # nothing prepared, nothing trained

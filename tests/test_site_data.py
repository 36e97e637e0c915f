"""Data in S3 with one prefix per site (components/site_data.py) on a real S3 server (moto, the local stack):
published images reach each holder's tasks unchanged, a site's task downloads only its own prefix, and the
pipeline run on s3:// data gives the in-process engine's metrics."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

pytest.importorskip("boto3")
pytest.importorskip("kfp")

from components.kfp_components import extract_site_step, prepare_step  # noqa: E402
from components.site_data import CATALOG, PUBLISHED, publish  # noqa: E402
from fedmedclip.config import TrainConfig  # noqa: E402
from fedmedclip.errors import ConfigError, DataError  # noqa: E402

SYNTH = {"per_class_per_site": 12, "test_per_class": 6, "size": 48}


@pytest.fixture
def s3_env(mlops_stack, monkeypatch):
    """The stack's credentials and endpoint in the environment, as a task's Secret and ConfigMap give them."""
    for k, v in mlops_stack.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", mlops_stack.s3_endpoint)
    return mlops_stack


def _bucket() -> str:
    return f"fmc-data-{uuid.uuid4().hex[:10]}"


def _cfg(tmp_path, **kw) -> TrainConfig:
    args = dict(sites=2, seed=0, synthetic=SYNTH, cache_dir=str(tmp_path / "cache"), rounds=2)
    args.update(kw)
    return TrainConfig(**args).validate()


def _params(data: str, seed: int = 0, cache: Path | None = None) -> dict:
    return {
        "data": data,
        "method": "fedmedclip",
        "partition": "iid",
        "alpha": 0.0,
        "seed": seed,
        "synthetic": json.dumps(SYNTH),
        "cache_dir": str(cache),
    }


def _keys(client, bucket: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def test_publish_then_site_task_downloads_only_its_prefix_and_encodes_the_same_features(s3_env, tmp_path):
    from fedmedclip.engine import SERVER, extract_features, holder_image_ids, load_image_set, partition_for
    from fedmedclip.features import FeatureStore
    from fedmedclip.partition import Partition

    bucket, client = _bucket(), s3_env.s3_client()
    cfg = _cfg(tmp_path)
    summary = publish(cfg, bucket, progress=False)
    image_set = load_image_set(cfg)
    part = partition_for(cfg, image_set)
    keys = _keys(client, bucket)
    for k, site in enumerate(part.site_names):
        ids = holder_image_ids(part, site)
        assert summary["sites"][site] == len(ids)
        assert sorted(x for x in keys if x.startswith(f"sites/{k}/images/")) == sorted(
            f"sites/{k}/images/{i}" for i in ids
        )
        site_catalog = json.loads(client.get_object(Bucket=bucket, Key=f"sites/{k}/{CATALOG}")["Body"].read())
        assert [r[0] for r in site_catalog["records"]] == ids  # no other site's image ids
    server_ids = holder_image_ids(part, SERVER)
    assert sum(x.startswith("server/images/") for x in keys) == len(server_ids) == summary["server"]
    versioning = client.get_bucket_versioning(Bucket=bucket)
    assert versioning.get("Status") == "Enabled"

    # prepare (server credentials) draws the same partition from the catalog alone.
    cache = tmp_path / "task_cache"
    config_json = prepare_step(
        _params(f"s3://{bucket}", cache=cache), 2, 2, part.site_names, str(tmp_path / "p")
    )
    assert Partition.load(tmp_path / "p" / "partition.json").digest == part.digest

    # site_1's extraction task: its prefix only, and the engine's features bit for bit.
    extract_site_step(config_json, str(tmp_path / "p"), "site_1", str(tmp_path / "f1"))
    s3_cache = cache / "s3" / bucket
    staged = sorted(p.relative_to(s3_cache).as_posix() for p in s3_cache.rglob("*") if p.is_file())
    assert staged and all(p.startswith("sites/1/images/") for p in staged)
    assert len(staged) == len(holder_image_ids(part, "site_1"))
    from fedmedclip.backbone import load_backbone, make_preprocessing

    backbone = load_backbone(cfg.backbone)
    ref = extract_features(
        image_set,
        holder_image_ids(part, "site_1"),
        backbone,
        make_preprocessing("squash", backbone),
        cfg,
        "site_1",
        progress=False,
    )
    got = FeatureStore.load(tmp_path / "f1")
    assert got.provenance["digest"] == ref.provenance["digest"]  # same ids, labels and image bytes
    assert got.image_ids == ref.image_ids
    assert got.features.equal(ref.features) and got.labels.equal(ref.labels)

    # Publishing the same thing again is a no-op; another partition is refused and changes nothing.
    again = publish(cfg, bucket, progress=False)
    assert again["bytes_uploaded"] == 0
    before = client.get_object(Bucket=bucket, Key=f"server/{PUBLISHED}")["Body"].read()
    with pytest.raises(DataError, match="refusing to overwrite"):
        publish(_cfg(tmp_path, seed=1), bucket, progress=False)
    assert client.get_object(Bucket=bucket, Key=f"server/{PUBLISHED}")["Body"].read() == before
    assert _keys(client, bucket) == keys

    # A run asking for another partition than the published one is refused before any download.
    with pytest.raises(ConfigError, match="was published for the partition"):
        prepare_step(
            _params(f"s3://{bucket}", seed=1, cache=cache), 2, 2, part.site_names, str(tmp_path / "q")
        )


def test_s3_data_errors_name_the_problem(s3_env, tmp_path, monkeypatch):
    from fedmedclip.engine import load_image_set

    cache = tmp_path / "c"
    with pytest.raises(DataError, match="does not exist: publish the data first"):
        prepare_step(
            _params(f"s3://{_bucket()}", cache=cache), 2, 2, ["site_0", "site_1"], str(tmp_path / "p")
        )
    with pytest.raises(ConfigError, match=r"give the data bucket only, s3://BUCKET"):
        prepare_step(
            _params("s3://bucket/some/prefix", cache=cache), 2, 2, ["site_0", "site_1"], str(tmp_path / "p")
        )
    with pytest.raises(DataError, match="read by the pipeline's tasks"):
        load_image_set(TrainConfig(data="s3://bucket").validate())

    # A published bucket whose site prefix lost an image: the site's task names the object.
    bucket = _bucket()
    publish(_cfg(tmp_path), bucket, progress=False)
    client = s3_env.s3_client()
    victim = next(k for k in _keys(client, bucket) if k.startswith("sites/0/images/"))
    client.delete_object(Bucket=bucket, Key=victim)
    config_json = prepare_step(
        _params(f"s3://{bucket}", cache=cache), 2, 2, ["site_0", "site_1"], str(tmp_path / "p")
    )
    with pytest.raises(DataError, match=f"s3://{bucket}/{victim}"):
        extract_site_step(config_json, str(tmp_path / "p"), "site_0", str(tmp_path / "f0"))

    # No credentials: the error says which Secret a cluster task would have.
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(DataError, match="fedmedclip-site-1-s3"):
        extract_site_step(config_json, str(tmp_path / "p"), "site_1", str(tmp_path / "f1"))


def test_cli_publish_uses_the_local_stack(s3_env, tmp_path, monkeypatch, capsys):
    from fedmedclip.cli import main

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("FEDMEDCLIP_STACK_DIR", s3_env.data_dir)  # credentials come from the recorded stack
    bucket = _bucket()
    argv = ["data", "publish", "--to", f"s3://{bucket}", "--sites", "2", "--synthetic", json.dumps(SYNTH)]
    assert main([*argv, "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"to s3://{bucket}" in err and f"--data s3://{bucket}" in err
    assert main([*argv, "--cache-dir", str(tmp_path / "c"), "--quiet", "--seed", "3"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_pipeline_on_s3_data_matches_the_engine(s3_env, tmp_path):
    """`make demo`'s path: the compiled YAML run locally on published data, registered and promoted
    (~15 task processes, 1 to 2 minutes)."""
    from fedmedclip.engine import train
    from pipelines.local import run_local
    from pipelines.pipeline import compile_pipeline

    bucket = _bucket()
    cfg = _cfg(tmp_path, out=str(tmp_path / "engine"))
    publish(cfg, bucket, progress=False)
    yaml_path = compile_pipeline(tmp_path / "p.yaml", sites=2, rounds=2)
    run = run_local(
        yaml_path,
        tmp_path / "root",
        data=f"s3://{bucket}",
        cache_dir=str(tmp_path / "task_cache"),
        export_site="",
        log_path=tmp_path / "pipeline.log",
        tracking_uri=s3_env.tracking_uri,
        model_name=f"s3-data-{bucket}",
    )
    ref = train(cfg, progress=False)
    assert run.results["metrics"] == ref["metrics"]
    assert run.results["comm"] == ref["comm"] and run.results["features"] == ref["features"]
    staged = tmp_path / "task_cache" / "s3" / bucket
    assert sorted(p.name for p in staged.iterdir()) == ["server", "sites"]
    # What `make demo` does after the run: registered and promoted in MLflow, loadable by alias.
    assert run.model_uri == f"models:/s3-data-{bucket}@champion"
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=s3_env.tracking_uri)
    version = client.get_model_version_by_alias(f"s3-data-{bucket}", "champion")
    assert client.get_run(version.run_id).data.params["data"] == f"s3://{bucket}"

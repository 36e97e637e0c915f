"""Data in S3 with one prefix per site (mlops/site_data.py) on a real S3 server (moto, the local stack,
enforcing per-role credentials): published images reach each holder's tasks unchanged, each party works with
its own role's key, a site's task downloads only its own prefix, a site can publish its own share and read
it back from its prefix alone, ids from catalogs and manifests stay inside their root, and the pipeline run
on s3:// data gives the in-process engine's metrics."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

pytest.importorskip("boto3")
pytest.importorskip("kfp")

from conftest import error_lines  # noqa: E402

from components.prepare.component import prepare_step  # noqa: E402
from components.worker.component import extract_step  # noqa: E402
from devstack.stack import add_data_root  # noqa: E402
from fedmedclip.config import TrainConfig  # noqa: E402
from fedmedclip.errors import ConfigError, DataError  # noqa: E402
from mlops.site_data import (  # noqa: E402
    CATALOG,
    PUBLISHED,
    publish,
    publish_site,
    read_site_assignment,
    read_site_summary,
    withdraw_site,
)
from mlops.tree import file_digest  # noqa: E402

SYNTH = {"per_class_per_site": 12, "test_per_class": 6, "size": 48}


def _bucket() -> str:
    return f"fmc-data-{uuid.uuid4().hex[:10]}"


def _granted_bucket(stack) -> str:
    """A new data bucket every role of the stack is granted on (as `fedmedclip stack add-bucket` does)."""
    bucket = _bucket()
    add_data_root(stack.data_dir, bucket)
    return bucket


def _cfg(tmp_path, **kw) -> TrainConfig:
    args = dict(sites=2, seed=0, synthetic=SYNTH, cache_dir=str(tmp_path / "cache"), rounds=2)
    args.update(kw)
    return TrainConfig(**args).validate()


def _params(data: str, seed: int = 0, cache: Path | None = None) -> dict:
    """The pipeline's settings as the prepare task gets them (`components/kfp_components.py`)."""
    return {
        "data": data,
        "method": "fedmedclip",
        "partition": "iid",
        "seed": seed,
        "synthetic": SYNTH,
        "cache_dir": str(cache),
        "sites": 2,
        "rounds": 2,
    }


def _extraction(parties: list, site: str) -> str:
    return next(p for p in parties if p["party"] == site)["extraction"]


def _keys(client, bucket: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def test_publish_then_site_task_downloads_only_its_prefix_and_encodes_the_same_features(
    mlops_stack, tmp_path, monkeypatch, as_stack_role, capsys
):
    from fedmedclip.features import FeatureStore
    from fedmedclip.preparation import (
        SERVER,
        extract_features,
        holder_image_ids,
        load_image_set,
        partition_for,
    )

    bucket, client = _granted_bucket(mlops_stack), mlops_stack.s3_client()  # admin: to inspect only
    cfg = _cfg(tmp_path)
    as_stack_role("publisher")
    summary = publish(cfg, bucket, progress=False)
    image_set = load_image_set(cfg)
    part = partition_for(cfg, image_set)
    keys = _keys(client, bucket)
    by_id = image_set.by_id()
    for k, site in enumerate(part.site_names):
        ids = holder_image_ids(part, site)
        assert summary["sites"][site] == len(ids)
        assert sorted(x for x in keys if x.startswith(f"sites/{k}/images/")) == sorted(
            f"sites/{k}/images/{i}" for i in ids
        )
        site_catalog = json.loads(client.get_object(Bucket=bucket, Key=f"sites/{k}/{CATALOG}")["Body"].read())
        assert [r[0] for r in site_catalog["records"]] == ids  # no other site's image ids
        # the site's data is complete in its prefix: its split in the partition's order, the digest, MD5s
        assert site_catalog["assignment"] == part.sites[site] and site_catalog["index"] == k
        assert site_catalog["partition_digest"] == part.digest
        assert site_catalog["md5"] == {i: file_digest(by_id[i].path, "md5") for i in ids}
        site_summary = json.loads(
            client.get_object(Bucket=bucket, Key=f"summaries/sites/{k}.json")["Body"].read()
        )
        assert site_summary["samples"] == {s: len(part.sites[site][s]) for s in ("train", "val", "test")}
    server_ids = holder_image_ids(part, SERVER)
    assert sum(x.startswith("server/images/") for x in keys) == len(server_ids) == summary["server"]
    versioning = client.get_bucket_versioning(Bucket=bucket)
    assert versioning.get("Status") == "Enabled"

    # prepare (the server's key) draws the same partition from the catalog alone.
    as_stack_role("server")
    cache = tmp_path / "task_cache"
    parties = prepare_step(_params(f"s3://{bucket}", cache=cache), ",".join(part.site_names), "")
    assert [p["party"] for p in parties] == ["server", *part.site_names]
    assert read_site_summary(f"s3://{bucket}", 1)["samples"]["train"] == len(part.sites["site_1"]["train"])

    # site_0's key cannot run site_1's extraction: its prefix is refused by the server.
    as_stack_role("site_0")
    with pytest.raises(DataError, match=rf"access to s3://{bucket}/sites/1/catalog.json denied"):
        extract_step(_extraction(parties, "site_1"), "site", "site_1", 1, str(tmp_path / "f1"))

    # site_1's extraction (its party task) with site_1's key: its prefix only, and the engine's features bit for bit.
    as_stack_role("site_1")
    extract_step(_extraction(parties, "site_1"), "site", "site_1", 1, str(tmp_path / "f1"))
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
    as_stack_role("publisher")
    again = publish(cfg, bucket, progress=False)
    assert again["bytes_uploaded"] == 0
    before = client.get_object(Bucket=bucket, Key=f"server/{PUBLISHED}")["Body"].read()
    with pytest.raises(DataError, match="refusing to overwrite"):
        publish(_cfg(tmp_path, seed=1), bucket, progress=False)
    assert client.get_object(Bucket=bucket, Key=f"server/{PUBLISHED}")["Body"].read() == before
    assert _keys(client, bucket) == keys

    # A run asking for another partition than the published one is refused before any download.
    as_stack_role("server")
    with pytest.raises(ConfigError, match="was published for the partition"):
        prepare_step(_params(f"s3://{bucket}", seed=1, cache=cache), "", "")
    # ... and by `pipeline run` before anything is compiled or started (the prepare task would refuse it only
    # after its retries, minutes later), reading the catalog with the local stack's server key.
    from fedmedclip.cli import main

    as_stack_role("publisher")  # not the key the check reads with: the stack's server key is
    root = tmp_path / "pipeline-root"
    argv = ["pipeline", "run", "--local", "--data", f"s3://{bucket}", "--sites", "3", "--rounds", "2"]
    status = main([*argv, "--local-stack", str(mlops_stack.data_dir), "--pipeline-root", str(root)])
    out, err = capsys.readouterr()
    (line,) = error_lines(err)
    assert status == 2 and line.startswith(f"error: s3://{bucket} was published for the partition")
    assert "'sites': 2" in line and "'sites': 3" in line and line.endswith("publish again to another bucket")
    assert not root.exists()
    # Whose keys the tasks would use is said: the stack's roles', or (a key in the environment, as after
    # `eval $(fedmedclip stack env)`) that one key for every task, where it went unsaid.
    assert (
        out.splitlines()[0]
        == f"S3: each task takes its own role's key from the local stack in {mlops_stack.data_dir}"
    )
    as_stack_role("server")
    assert main([*argv, "--pipeline-root", str(root)]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("S3: every task uses this environment's key (AWS_ACCESS_KEY_ID); --local-stack DIR")
    assert "was published for the partition" in err and not root.exists()


def test_publishing_a_folder_applies_the_duplicate_rule_and_records_it(
    mlops_stack, data_with_duplicates, tmp_path, as_stack_role
):
    """A folder with byte-identical copies is published as `train --data FOLDER` would use it (--duplicates
    drop: the training copies are not uploaded), and a run on the published data reports what was dropped."""
    from fedmedclip.data import deduplicate, open_source
    from fedmedclip.preparation import load_image_set

    manifest, added = data_with_duplicates
    bucket = _granted_bucket(mlops_stack)
    cfg = _cfg(tmp_path, data=str(manifest), synthetic={}, min_class_images=2)
    as_stack_role("publisher")
    summary = publish(cfg, bucket, progress=False)
    local = deduplicate(open_source(manifest), "drop")
    assert summary["duplicates"] == local.duplicates and local.duplicates["dropped_training_copies"] == 2
    as_stack_role("server")
    published = load_image_set(_cfg(tmp_path, data=f"s3://{bucket}", synthetic={}, min_class_images=2))
    assert published.duplicates == local.duplicates
    assert [r.image_id for r in published.records] == [r.image_id for r in local.records]
    assert added["copy_of_test"][0] not in {r.image_id for r in published.records}
    # The counts are the publisher's word, parsed against their declaration before a run reports them.
    admin, key = mlops_stack.s3_client(), f"server/{PUBLISHED}"
    catalog = json.loads(admin.get_object(Bucket=bucket, Key=key)["Body"].read())
    catalog["duplicates"]["groups"] = -1
    admin.put_object(Bucket=bucket, Key=key, Body=json.dumps(catalog).encode())
    with pytest.raises(
        DataError, match=r"published_catalog from the publisher .* refused: duplicates.groups"
    ):
        load_image_set(_cfg(tmp_path, data=f"s3://{bucket}", synthetic={}, min_class_images=2))


def test_s3_data_errors_name_the_problem(s3_env, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    with pytest.raises(DataError, match="does not exist: publish the data first"):
        prepare_step(_params(f"s3://{_bucket()}", cache=cache), "", "")
    with pytest.raises(ConfigError, match=r"give the data bucket only, s3://BUCKET"):
        prepare_step(_params("s3://bucket/some/prefix", cache=cache), "", "")
    # A published bucket whose site prefix lost an image: the site's task names the object.
    bucket = _bucket()
    publish(_cfg(tmp_path), bucket, progress=False)
    client = s3_env.s3_client()
    victim = next(k for k in _keys(client, bucket) if k.startswith("sites/0/images/"))
    client.delete_object(Bucket=bucket, Key=victim)
    parties = prepare_step(_params(f"s3://{bucket}", cache=cache), "", "")
    with pytest.raises(DataError, match=f"s3://{bucket}/{victim}"):
        extract_step(_extraction(parties, "site_0"), "site", "site_0", 0, str(tmp_path / "f0"))
    # An image replaced after publishing: one of another size is refused from its Content-Length, before its
    # body is read (a 50 GB object filled the site's disk before its MD5 could refuse it); one of the same size
    # by its MD5. Nothing is staged from either.
    tampered = next(k for k in _keys(client, bucket) if k.startswith("sites/1/images/"))
    n = len(client.get_object(Bucket=bucket, Key=tampered)["Body"].read())
    for body, why in (
        (bytes(n + (4 << 20)), rf"is {n + (4 << 20)} bytes, not the {n} bytes its publisher recorded"),
        (bytes(n), "has MD5 .*changed after publishing"),
    ):
        client.put_object(Bucket=bucket, Key=tampered, Body=body)
        with pytest.raises(DataError, match=rf"s3://{bucket}/{tampered} {why}"):
            extract_step(_extraction(parties, "site_1"), "site", "site_1", 1, str(tmp_path / "f1"))
        assert not (cache / "s3" / bucket / tampered).exists() and not list(cache.rglob(".part-*"))
    client.delete_object(Bucket=bucket, Key=tampered)

    # No credentials: the error says which Secret a cluster task would have.
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(DataError, match="fedmedclip-site-1-s3"):
        extract_step(_extraction(parties, "site_1"), "site", "site_1", 1, str(tmp_path / "f1"))


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
    assert f"roles granted on the new data root {bucket}" in err  # the publisher's key, granted on it first
    assert os.environ["AWS_ACCESS_KEY_ID"] == s3_env.credentials("publisher")[0]
    assert main([*argv, "--cache-dir", str(tmp_path / "c"), "--quiet", "--seed", "3"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    # a --to that is no bucket root is refused naming --to (a prefix was refused as `--data`, a folder as
    # "not an s3:// URL")
    for to, said in ((f"s3://{bucket}/pre", "give the data bucket only"), (str(tmp_path), "(--site NAME)")):
        assert main(["data", "publish", "--to", to, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --to '{to}': ") and said in err, err

    # Neither credentials nor a stack: the one line says that, and how to get them.
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("FEDMEDCLIP_STACK_DIR", str(tmp_path / "no-stack"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert main([*argv, "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no S3 credentials in the environment" in err and "`fedmedclip stack up`" in err, err


# ------------------------------------------------------------------ hospital-side onboarding (--site)


def test_a_site_publishes_its_own_share_with_its_own_key_and_reads_it_back(
    s3_env, tmp_path, monkeypatch, capsys, as_stack_role
):
    from fedmedclip.cli import main
    from fedmedclip.preparation import load_image_set, partition_for

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("FEDMEDCLIP_STACK_DIR", s3_env.data_dir)  # the hospital's key: site_1's role
    bucket, admin = _granted_bucket(s3_env), s3_env.s3_client()
    argv = ["data", "publish", "--site", "site_1", "--to", f"s3://{bucket}", "--sites", "2"]
    argv += ["--synthetic", json.dumps(SYNTH), "--cache-dir", str(tmp_path / "c"), "--quiet"]
    assert main(argv) == 0
    assert "published site_1's" in capsys.readouterr().err
    assert os.environ["AWS_ACCESS_KEY_ID"] == s3_env.credentials("site_1")[0]
    part = partition_for(_cfg(tmp_path, cache_dir=str(tmp_path / "c")), load_image_set(_cfg(tmp_path)))
    ids = [i for s in ("train", "val", "test") for i in part.sites["site_1"][s]]
    keys = _keys(admin, bucket)
    # only site 1's prefix and its summary were written
    assert keys == sorted(
        [*(f"sites/1/images/{i}" for i in ids), "sites/1/catalog.json", "summaries/sites/1.json"]
    )

    # the site's runtime reads its data from its own prefix alone, with its own key
    as_stack_role("site_1")
    got = read_site_assignment(f"s3://{bucket}", 1, site="site_1", cache_dir=tmp_path / "rt")
    assert (got.train, got.val, got.test) == tuple(part.sites["site_1"][s] for s in ("train", "val", "test"))
    assert got.partition_digest == part.digest and got.samples["train"] == len(part.sites["site_1"]["train"])
    by_id = load_image_set(_cfg(tmp_path)).by_id()
    for r in got.image_set.records:
        assert Path(r.path).read_bytes() == Path(by_id[r.image_id].path).read_bytes()
        assert (tmp_path / "rt" / "s3" / bucket / "sites" / "1" / "images") in Path(r.path).parents
    with pytest.raises(DataError, match="holds site 'site_1'.s data, not 'site_0'"):
        read_site_assignment(f"s3://{bucket}", 1, site="site_0", cache_dir=tmp_path / "rt")

    # the server learns the training-sample count from the summary, never from the site's prefix
    as_stack_role("server")
    assert read_site_summary(f"s3://{bucket}", 1)["samples"] == got.samples
    with pytest.raises(DataError, match=rf"access to s3://{bucket}/sites/1/catalog.json denied"):
        read_site_assignment(f"s3://{bucket}", 1, cache_dir=tmp_path / "srv")
    as_stack_role("site_0")
    with pytest.raises(DataError, match="denied"):
        read_site_assignment(f"s3://{bucket}", 1, cache_dir=tmp_path / "s0")
    assert not (tmp_path / "srv").exists() and not (tmp_path / "s0").exists()

    # again: nothing uploaded; for another partition: refused, nothing changed
    as_stack_role("site_1")
    before = admin.get_object(Bucket=bucket, Key="sites/1/catalog.json")["Body"].read()
    assert publish_site(_cfg(tmp_path), "site_1", f"s3://{bucket}", progress=False)["bytes_uploaded"] == 0
    with pytest.raises(DataError, match="refusing to overwrite"):
        publish_site(_cfg(tmp_path, seed=1), "site_1", f"s3://{bucket}", progress=False)
    assert admin.get_object(Bucket=bucket, Key="sites/1/catalog.json")["Body"].read() == before
    assert _keys(admin, bucket) == keys
    # site_1's key cannot publish site_0's share
    with pytest.raises(DataError, match="denied"):
        publish_site(_cfg(tmp_path), "site_0", f"s3://{bucket}", progress=False)


def test_a_withdrawal_that_stopped_part_way_is_finished_and_a_second_one_says_there_is_nothing(
    s3_env, monkeypatch, capsys
):
    """Images go first, then the catalog, then the summary: a withdrawal stopped after the catalog left the
    summary behind, and running it again said 'catalog.json does not exist: publish the data first'."""
    from fedmedclip.cli import main

    bucket, admin = _granted_bucket(s3_env), s3_env.s3_client()
    for body in (b'{"old": 1}', b'{"old": 2}'):  # two versions of what an interrupted withdrawal left
        admin.put_object(Bucket=bucket, Key="summaries/sites/1.json", Body=body)
    for key, value in s3_env.role_env("site_1").items():  # the site's own key
        monkeypatch.setenv(key, value)
    argv = ["data", "withdraw", "--from", f"s3://{bucket}", "--site-index", "1"]
    assert main(argv) == 0
    assert "withdrew site 1's summary (its images and catalog were gone already)" in capsys.readouterr().err
    left = admin.list_object_versions(Bucket=bucket)
    assert not left.get("Versions") and not left.get("DeleteMarkers")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"nothing to withdraw: s3://{bucket}/sites/1/catalog.json does not exist" in err
    assert "publish the data first" not in err


def test_withdraw_site_names_its_k_from_the_stack_also_with_a_key_in_the_environment(
    s3_env, monkeypatch, capsys
):
    """In a party's shell (`eval "$(fedmedclip stack env --role site_1)"`) the environment's key is kept and
    `--site site_1` still gives k from the recorded stack; it said "give --site-index K"."""
    from fedmedclip.cli import main

    bucket = _granted_bucket(s3_env)
    for key, value in s3_env.role_env("site_1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FEDMEDCLIP_STACK_DIR", s3_env.data_dir)
    assert main(["data", "withdraw", "--from", f"s3://{bucket}", "--site", "site_1"]) == 2  # nothing there
    err = capsys.readouterr().err
    assert f"s3://{bucket}/sites/1/catalog.json does not exist" in err and "--site-index" not in err
    assert main(["data", "withdraw", "--from", f"s3://{bucket}", "--site", "site_9"]) == 2
    assert "has no role 'site_9'" in capsys.readouterr().err


def test_withdraw_by_site_name_without_a_local_stack_says_why_it_needs_the_index(
    tmp_path, monkeypatch, capsys
):
    from fedmedclip.cli import main

    monkeypatch.setenv("FEDMEDCLIP_STACK_DIR", str(tmp_path / "no-stack"))
    assert main(["data", "withdraw", "--from", "s3://fedmedclip-data", "--site", "site_2"]) == 2
    err = capsys.readouterr().err
    assert "--site site_2 takes its k from the local stack, and none is recorded" in err
    assert "give --site-index K" in err


def test_a_site_keeps_its_data_in_a_local_directory(tmp_path):
    from fedmedclip.preparation import load_image_set, partition_for

    cfg = _cfg(tmp_path)
    home = tmp_path / "hospital"
    summary = publish_site(cfg, "site_0", home, progress=False)
    part = partition_for(cfg, load_image_set(cfg))
    assert summary["images"] == sum(len(v) for v in part.sites["site_0"].values())
    got = read_site_assignment(home, 0, site="site_0")
    assert got.train == part.sites["site_0"]["train"] and got.test == part.sites["site_0"]["test"]
    assert all((home / "sites" / "0" / "images") in Path(r.path).parents for r in got.image_set.records)
    assert read_site_summary(home, 0)["samples"] == got.samples
    with pytest.raises(DataError, match="data of site_0 for another partition .* publish to another folder$"):
        publish_site(_cfg(tmp_path, seed=1), "site_0", home, progress=False)
    assert sorted(p.name for p in home.iterdir()) == ["sites", "summaries"]
    assert sorted(p.name for p in (home / "sites").iterdir()) == ["0"]
    with pytest.raises(ConfigError, match="is not an s3:// URL"):  # `data withdraw` is for S3 only
        withdraw_site(str(home), 0)
    assert (home / "sites" / "0" / CATALOG).is_file()


# -------------------------------------------------------------------------------------- safe paths


def test_image_ids_must_be_clean_relative_paths():
    from fedmedclip.paths import check_relative_id

    for good in ("a.png", "Training/glioma/Tr-gl_0010.jpg", "x/..y/z.png"):
        assert check_relative_id(good, "t") == good
    for bad, why in (
        ("../x.png", "'..' segment"),
        ("a/../../x.png", "'..' segment"),
        ("/etc/passwd", "absolute"),
        ("C:/x.png", "absolute"),
        ("a//b.png", "empty or '.'"),
        ("./a.png", "empty or '.'"),
        ("", "empty"),
        ("a\0b", "NUL"),
    ):
        with pytest.raises(DataError, match=rf"image id .* from catalog X is refused: .*{why}"):
            check_relative_id(bad, "catalog X")


def _write_catalog(client, bucket: str, ids: list[str]) -> None:
    body = {
        "format": 2,
        "holder": "site_0",
        "index": 0,
        "class_names": ["a"],
        "records": [[i, "a", "train"] for i in ids],
        "md5": {i: "0" * 32 for i in ids},
        "assignment": {"train": ids, "val": [], "test": []},
        "partition_digest": "0" * 64,  # well formed: what these tests refuse is the ids
    }
    client.put_object(Bucket=bucket, Key="sites/0/catalog.json", Body=json.dumps(body).encode())


def test_a_malformed_catalog_is_refused_naming_the_field(s3_env, tmp_path, as_stack_role):
    """A catalog that does not match its declaration (here `records` not a list) is one clear error naming the
    object and the field, not a traceback from deep in the reader."""
    bucket, admin = _granted_bucket(s3_env), s3_env.s3_client()
    _write_catalog(admin, bucket, ["a.png"])
    body = json.loads(admin.get_object(Bucket=bucket, Key="sites/0/catalog.json")["Body"].read())
    admin.put_object(
        Bucket=bucket, Key="sites/0/catalog.json", Body=json.dumps({**body, "records": 5}).encode()
    )
    as_stack_role("site_0")
    with pytest.raises(
        DataError,
        match=rf"holder_catalog from the publisher \(s3://{bucket}/sites/0/catalog.json\) refused: records",
    ):
        read_site_assignment(f"s3://{bucket}", 0, cache_dir=tmp_path / "cache")


def test_catalog_ids_cannot_escape_the_download_cache(s3_env, tmp_path, monkeypatch, as_stack_role):
    bucket, admin = _granted_bucket(s3_env), s3_env.s3_client()
    as_stack_role("site_0")
    cache = tmp_path / "deep" / "cache"
    for evil in ("../../../../escape.png", "/tmp/escape.png"):
        _write_catalog(admin, bucket, [evil])
        with pytest.raises(
            DataError, match=rf"image id '{evil}' from s3://{bucket}/sites/0/catalog.json is refused"
        ):
            read_site_assignment(f"s3://{bucket}", 0, cache_dir=cache)
    assert not list(tmp_path.rglob("escape.png"))

    # a symlink inside the cache that points elsewhere: the download would land outside
    outside = tmp_path / "outside"
    outside.mkdir()
    images = cache / "s3" / bucket / "sites" / "0" / "images"
    images.mkdir(parents=True)
    (images / "sub").symlink_to(outside)
    _write_catalog(admin, bucket, ["sub/x.png"])
    admin.put_object(Bucket=bucket, Key="sites/0/images/sub/x.png", Body=b"scan")
    with pytest.raises(DataError, match=r"image id 'sub/x.png' .* outside its root .*symbolic link"):
        read_site_assignment(f"s3://{bucket}", 0, cache_dir=cache)
    assert list(outside.iterdir()) == []

    # the site's whole images folder of the cache linked elsewhere: confined to the real cache root, not
    # to the link
    (images / "sub").unlink()
    images.rmdir()
    images.symlink_to(outside, target_is_directory=True)
    _write_catalog(admin, bucket, ["x.png"])
    admin.put_object(Bucket=bucket, Key="sites/0/images/x.png", Body=b"scan")
    with pytest.raises(DataError, match=r"image id 'x.png' .* outside .*cache.* \(a symbolic link below it"):
        read_site_assignment(f"s3://{bucket}", 0, cache_dir=cache)
    assert list(outside.iterdir()) == []


def _synthetic_source(tmp_path) -> Path:
    from fedmedclip import synthetic

    return synthetic.generate(tmp_path / "data", sites=2, per_class_per_site=6, test_per_class=2, size=16)


def test_manifest_paths_outside_the_data_root_need_the_flag(s3_env, tmp_path, monkeypatch, as_stack_role):
    import csv

    from fedmedclip.data import open_source

    manifest = _synthetic_source(tmp_path)
    rows = list(csv.reader(manifest.open()))
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "scan.png"
    (manifest.parent / rows[1][0]).rename(moved)
    rows[1][0] = "../elsewhere/scan.png"
    with manifest.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    with pytest.raises(
        DataError, match=r"manifest.csv:2: image '../elsewhere/scan.png' resolves to .*outside"
    ):
        open_source(manifest)
    assert len(open_source(manifest, allow_outside_root=True).records) == len(rows) - 1

    # even allowed, such an id cannot become a key: the publish is refused before any upload
    bucket = _granted_bucket(s3_env)
    as_stack_role("publisher")
    cfg = TrainConfig(data=str(manifest), sites=2, cache_dir=str(tmp_path / "c")).validate()
    allowed = TrainConfig(data=str(manifest), sites=2, cache_dir=str(tmp_path / "c"), allow_outside_root=True)
    with pytest.raises(DataError, match=r"image id '../elsewhere/scan.png' .* '..' segment"):
        publish(allowed.validate(), bucket, progress=False)
    with pytest.raises(DataError, match="outside"):
        publish(cfg, bucket, progress=False)
    assert _keys(s3_env.s3_client(), bucket) == []


def test_a_symlink_out_of_an_image_folder_is_not_published(tmp_path):
    from PIL import Image

    root = tmp_path / "folder"
    for split, n in (("Training", 12), ("Testing", 2)):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):  # every image distinct: publishing drops byte-identical copies
                colour = (100 * c, 20 * i, 100 * (split == "Testing"))
                Image.new("RGB", (8, 8), colour).save(root / split / cls / f"{i}.png")
    secret = tmp_path / "not-a-scan.png"
    Image.new("L", (8, 8), 255).save(secret)
    (root / "Training" / "a" / "0.png").unlink()
    (root / "Training" / "a" / "0.png").symlink_to(secret)
    cfg = TrainConfig(data=str(root), sites=1, cache_dir=str(tmp_path / "c")).validate()
    with pytest.raises(
        DataError, match=r"image 'Training/a/0.png' .* outside the data root .*--allow-outside-root"
    ):
        publish_site(cfg, "site_0", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    allowed = TrainConfig(data=str(root), sites=1, cache_dir=str(tmp_path / "c"), allow_outside_root=True)
    assert publish_site(allowed.validate(), "site_0", tmp_path / "out", progress=False)["images"] > 0
    # The folder is read as `train --data` reads it: an inferred class list is checked as a run checks it.
    strict = TrainConfig(**{**allowed.to_json(), "min_class_images": 20}).validate()
    with pytest.raises(DataError, match="suspicious classes: 'a' has 12 training image"):
        publish_site(strict, "site_0", tmp_path / "strict", progress=False)


def test_published_data_is_not_published_again(tmp_path):
    """`data publish --data s3://...`: its published list has no pixels; refused before anything is read."""
    cfg = TrainConfig(data="s3://fedmedclip-data", sites=2, cache_dir=str(tmp_path / "c")).validate()
    with pytest.raises(ConfigError, match="s3://fedmedclip-data is published already"):
        publish_site(cfg, "site_0", tmp_path / "out", progress=False)


def _folder_with_an_undecodable_image(tmp_path) -> Path:
    """A folder of 28 distinct images, of which Training/b/3.png cannot be decoded."""
    from PIL import Image

    root = tmp_path / "folder"
    for split, n in (("Training", 12), ("Testing", 2)):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (100 * c, 20 * i, 100 * (split == "Testing"))).save(
                    root / split / cls / f"{i}.png"
                )
    (root / "Training" / "b" / "3.png").write_bytes(b"not an image, though named so")
    return root


def _decode_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]


def test_an_undecodable_image_is_named_when_it_is_published(tmp_path, caplog):
    """A publisher learns of a file training cannot decode when publishing it, not when a site's pod stops at
    its feature extraction; it is published all the same (a run with --skip-bad-images skips it)."""
    root = _folder_with_an_undecodable_image(tmp_path)
    cfg = TrainConfig(data=str(root), sites=1, cache_dir=str(tmp_path / "c")).validate()
    with caplog.at_level("WARNING", logger="fedmedclip.site_data"):
        summary = publish_site(cfg, "site_0", tmp_path / "out", progress=False)
    warned = _decode_warnings(caplog)
    assert len(warned) == 1 and "1 of the images" in warned[0] and "'Training/b/3.png'" in warned[0], warned
    assert "--skip-bad-images" in warned[0]
    published = tmp_path / "out" / "sites" / "0" / "images"
    assert (
        summary["images"] == 22 and (published / "Training" / "b" / "3.png").is_file()
    )  # 28 less the reference


def test_only_the_images_a_site_publish_sends_are_decoded(tmp_path, caplog):
    """Every image was decoded before anything else: a publish refused for another partition, and a re-publish
    that sends nothing, decoded the whole source (and warned of its undecodable images) all the same."""
    root = _folder_with_an_undecodable_image(tmp_path)
    cfg = TrainConfig(data=str(root), sites=1, cache_dir=str(tmp_path / "c")).validate()
    with caplog.at_level("WARNING", logger="fedmedclip.site_data"):
        publish_site(cfg, "site_0", tmp_path / "out", progress=False)
        assert len(_decode_warnings(caplog)) == 1
        caplog.clear()
        assert publish_site(cfg, "site_0", tmp_path / "out", progress=False)["bytes_uploaded"] == 0
        other = TrainConfig(**{**cfg.to_json(), "seed": 1}).validate()
        with pytest.raises(DataError, match="for another partition"):
            publish_site(other, "site_0", tmp_path / "out", progress=False)
    assert _decode_warnings(caplog) == []


def test_only_the_images_a_publish_sends_are_decoded(s3_env, tmp_path, caplog, as_stack_role):
    """As for a site's share: the publisher's re-publish (found by listing) and its refusal decode nothing."""
    root = _folder_with_an_undecodable_image(tmp_path)
    bucket = _granted_bucket(s3_env)
    as_stack_role("publisher")
    cfg = TrainConfig(data=str(root), sites=1, cache_dir=str(tmp_path / "c")).validate()
    with caplog.at_level("WARNING", logger="fedmedclip.site_data"):
        publish(cfg, bucket, progress=False)
        assert len(_decode_warnings(caplog)) == 1
        caplog.clear()
        assert publish(cfg, bucket, progress=False)["bytes_uploaded"] == 0
        other = TrainConfig(**{**cfg.to_json(), "seed": 1}).validate()
        with pytest.raises(DataError, match="refusing to overwrite it"):
            publish(other, bucket, progress=False)
    assert _decode_warnings(caplog) == []


def test_withdraw_names_its_data_root_in_the_usage():
    """`data withdraw --from FROM_`: the usage showed the parser's internal name."""
    import argparse

    from mlops import cli as mlops_cli

    parser = argparse.ArgumentParser(prog="fedmedclip")
    sub = parser.add_subparsers(dest="command")
    mlops_cli.register(sub)
    withdraw = sub.choices["data"]._subparsers._group_actions[0].choices["withdraw"]
    usage = withdraw.format_usage()
    assert "--from s3://BUCKET[/PREFIX]" in usage and "FROM_" not in usage, usage

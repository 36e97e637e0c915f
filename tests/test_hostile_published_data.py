"""What a hostile or careless publisher (a hospital, or whoever can write to a data or backbone prefix) can put
where the server and the other parties read it: each bad object is refused with one error naming the holder
and the problem, never a traceback or silently wrong data.

Before these fixes:
- a site's catalog assigning one image to two splits (train and test) was read as it was in a local folder (the
  site tested on an image it trained on), and raised a bare `ValueError: zip() argument 2 is shorter than
  argument 1` from S3 (its downloads are keyed by id);
- a catalog listing one image twice (two labels) silently used the last label; a label not among its
  class_names passed (a KeyError deep in the encoder later); an MD5 recorded for an image it does not list
  passed;
- an image of a local folder was used in place without its catalog's MD5 checked: one changed, emptied or
  replaced by a link to another image after publishing was trained on;
- an image id with a name longer than a file system takes raised a bare `OSError: [Errno 36] File name too
  long` (local folder and S3 cache);
- `S3Source.stage` (the server's prepare task) used a holder catalog claiming another holder, another
  partition's digest or other labels than server/published.json without a word;
- a backbone manifest nested too deeply raised a bare RecursionError out of `resolve_backbone`, one with a key
  twice was read with its last value, and one listing both `a` and `a/b` raised a bare IsADirectoryError /
  FileExistsError from the download."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest

from fedmedclip.config import TrainConfig
from fedmedclip.errors import DataError
from fedmedclip.federation.storage import LocalDirStore
from mlops.site_data import CATALOG, publish_site, read_site_assignment
from mlops.tree import read_manifest

SYNTH = {"per_class_per_site": 6, "test_per_class": 2, "size": 16}


def _cfg(tmp_path, **kw) -> TrainConfig:
    args = dict(sites=2, seed=0, synthetic=SYNTH, cache_dir=str(tmp_path / "cache"), rounds=2)
    args.update(kw)
    return TrainConfig(**args).validate()


@pytest.fixture
def home(tmp_path) -> Path:
    """site_0's share published to a hospital's local folder."""
    folder = tmp_path / "hospital"
    publish_site(_cfg(tmp_path), "site_0", folder, progress=False)
    return folder


def _catalog(home: Path) -> dict:
    return json.loads((home / "sites" / "0" / CATALOG).read_text())


def _write(home: Path, catalog: dict) -> None:
    (home / "sites" / "0" / CATALOG).write_text(json.dumps(catalog))


def _read(home: Path, tmp_path: Path):
    return read_site_assignment(home, 0, site="site_0", cache_dir=tmp_path / "cache")


def test_a_catalog_assigning_an_image_to_two_splits_is_refused(home, tmp_path):
    cat = _catalog(home)
    leaked = cat["assignment"]["train"][0]
    cat["assignment"]["test"].append(leaked)
    _write(home, cat)
    with pytest.raises(
        DataError, match=rf"\(holder 'site_0'\) assigns image '{leaked}' more than once \(train, test\)"
    ):
        _read(home, tmp_path)


@pytest.mark.parametrize(
    "attack", ["record twice", "unknown label", "stray md5", "class twice", "stray size"]
)
def test_a_catalog_that_disagrees_with_itself_is_refused(home, tmp_path, attack):
    cat = _catalog(home)
    first = cat["records"][0]
    if attack == "record twice":  # the same image again with another label: which one counts?
        other = next(c for c in cat["class_names"] if c != first[1])
        cat["records"].append([first[0], other, first[2]])
        why = rf"lists image '{first[0]}' twice"
    elif attack == "unknown label":
        first[1] = "not-a-class"
        why = rf"image '{first[0]}' has label 'not-a-class', not one of its class_names"
    elif attack == "stray md5":
        cat["md5"]["ghost.png"] = "0" * 32
        why = r"records an MD5 for 1 image\(s\) it does not list \(e.g. 'ghost.png'\)"
    elif attack == "stray size":  # a size for an image it does not list, none for one it does
        cat["bytes"]["ghost.png"] = cat["bytes"].pop(first[0])
        why = r"its image sizes \(bytes\) are not those of exactly the images it lists"
    else:
        cat["class_names"].append(cat["class_names"][0])
        why = "class name '[^']+' is listed twice"
    _write(home, cat)
    with pytest.raises(DataError, match=rf"sites/0/catalog.json \(holder 'site_0'\):? {why}"):
        _read(home, tmp_path)


@pytest.mark.parametrize("damage", ["changed", "emptied", "linked to another image"])
def test_a_local_image_that_is_not_the_one_published_is_refused(home, tmp_path, damage):
    cat = _catalog(home)
    image_id, other = cat["assignment"]["train"][:2]
    images = home / "sites" / "0" / "images"
    path = images / image_id
    if damage == "changed":
        path.write_bytes(path.read_bytes() + b"\0")
    elif damage == "emptied":
        path.write_bytes(b"")
    else:
        path.unlink()
        path.symlink_to(images / other)
    with pytest.raises(
        DataError, match=rf"has MD5 [0-9a-f]{{32}}, not the {cat['md5'][image_id]} .* '{image_id}'"
    ):
        _read(home, tmp_path)


def test_an_id_too_long_for_the_file_system_is_refused(home, tmp_path):
    cat = _catalog(home)
    folder = cat["records"][0][0].rsplit("/", 1)[0]  # a folder that exists: the name itself is what fails
    long_id = f"{folder}/{'a' * 300}.png"
    cat["records"].append([long_id, cat["class_names"][0], "train"])
    cat["md5"][long_id] = "0" * 32
    cat["assignment"]["train"].append(long_id)
    _write(home, cat)
    with pytest.raises(
        DataError, match=r"image id '.*/a+\.png' from .*catalog.json is refused: .* takes 304 bytes"
    ):
        _read(home, tmp_path)


def test_a_deep_or_ambiguous_backbone_manifest_is_a_value_error(tmp_path):
    store = LocalDirStore(tmp_path)
    store.put("m.json", b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_manifest(store, "m.json", 4 << 20)
    entry = {"sha256": "0" * 64, "size": 1}
    store.put("m.json", b'{"format": 1, "format": 2, "files": ' + json.dumps({"a": entry}).encode() + b"}")
    with pytest.raises(ValueError, match="key 'format' written twice"):
        read_manifest(store, "m.json", 4 << 20, format=2)
    for files, why in (
        ({"a": entry, "a/b": entry}, "file name 'a' is also a folder of other files"),
        ({"x" * 256: entry}, "is not a name a file system takes"),
    ):
        store.put("m.json", json.dumps({"format": 1, "files": files}).encode())
        with pytest.raises(ValueError, match=why):
            read_manifest(store, "m.json", 4 << 20)


# ------------------------------------------------------------------------------ on the local stack's S3


def _granted_bucket(stack) -> str:
    from devstack.stack import add_data_root

    bucket = f"fmc-hostile-{uuid.uuid4().hex[:10]}"
    add_data_root(stack.data_dir, bucket)
    return bucket


def _published_as_server(stack, tmp_path, as_stack_role, name: str) -> tuple[str, object, str, dict]:
    """Synthetic data published by the publisher's role into a bucket of its own; then this process holds the
    server's role. (bucket, the admin's client, the key of server/`name`, its JSON as published)."""
    from mlops.site_data import publish

    pytest.importorskip("boto3")
    bucket, admin = _granted_bucket(stack), stack.s3_client()
    as_stack_role("publisher")
    publish(_cfg(tmp_path), bucket, progress=False)
    key = f"server/{name}"
    original = json.loads(admin.get_object(Bucket=bucket, Key=key)["Body"].read())
    as_stack_role("server")
    return bucket, admin, key, original


def test_an_s3_catalog_assigning_an_image_twice_is_refused_not_a_traceback(s3_env, tmp_path, as_stack_role):
    pytest.importorskip("boto3")
    bucket, admin = _granted_bucket(s3_env), s3_env.s3_client()
    scan = b"scan"
    catalog = {
        "format": 2,
        "holder": "site_0",
        "index": 0,
        "class_names": ["a"],
        "records": [["x.png", "a", "train"]],
        "md5": {"x.png": hashlib.md5(scan).hexdigest()},
        "assignment": {"train": ["x.png"], "val": [], "test": ["x.png"]},
        "partition_digest": "0" * 64,
    }
    admin.put_object(Bucket=bucket, Key="sites/0/images/x.png", Body=scan)
    admin.put_object(Bucket=bucket, Key="sites/0/catalog.json", Body=json.dumps(catalog).encode())
    as_stack_role("site_0")
    with pytest.raises(
        DataError, match=r"\(holder 'site_0'\) assigns image 'x.png' more than once \(train, test\)"
    ):
        read_site_assignment(f"s3://{bucket}", 0, cache_dir=tmp_path / "cache")


def test_the_server_refuses_a_holder_catalog_of_another_holder_partition_or_labels(
    s3_env, tmp_path, as_stack_role
):
    from fedmedclip.preparation import SERVER, checked_partition
    from mlops.site_data import S3Source

    bucket, admin, key, original = _published_as_server(s3_env, tmp_path, as_stack_role, CATALOG)
    cfg = _cfg(tmp_path, data=f"s3://{bucket}")
    _, partition = checked_partition(cfg)  # reads server/published.json, as the prepare task does
    assert len(S3Source().stage(cfg, partition, SERVER).records) > 0

    relabelled = json.loads(json.dumps(original))
    record = relabelled["records"][0]
    record[1] = next(c for c in relabelled["class_names"] if c != record[1])
    for change, why in (
        ({"holder": "site_1"}, "holds 'site_1''s data, not 'server''s"),
        ({"partition_digest": "f" * 64}, "was published for another partition"),
        (
            {"records": relabelled["records"]},
            rf"labels image '{record[0]}' '{record[1]}', but server/published",
        ),
    ):
        admin.put_object(Bucket=bucket, Key=key, Body=json.dumps({**original, **change}).encode())
        with pytest.raises(DataError, match=why):
            S3Source().stage(cfg, partition, SERVER)


def test_the_publishers_catalog_that_disagrees_with_itself_is_refused(s3_env, tmp_path, as_stack_role):
    """server/published.json (every image's id, label, split and site, which the partition is drawn from) was
    read with only its ids checked: an image listed twice was partitioned twice (given to two sites, or
    evaluated twice), a label outside its classes or a class named twice reached training. Refused as a
    holder's catalog is, naming the file."""
    from fedmedclip.preparation import checked_partition
    from mlops.site_data import PUBLISHED

    bucket, admin, key, original = _published_as_server(s3_env, tmp_path, as_stack_role, PUBLISHED)
    first = original["records"][0]
    cfg = _cfg(tmp_path, data=f"s3://{bucket}")
    for change, why in (
        ({"records": [*original["records"], first]}, rf"lists image '{first[0]}' twice"),
        ({"records": [[first[0], "no-such-class", *first[2:]], *original["records"][1:]]}, "not one of its"),
        ({"class_names": [*original["class_names"], original["class_names"][0]]}, "is listed twice"),
        ({"class_names": ["\x1b[2J", *original["class_names"][1:]]}, "holds control characters"),
    ):
        admin.put_object(Bucket=bucket, Key=key, Body=json.dumps({**original, **change}).encode())
        with pytest.raises(DataError, match=rf"published\.json \(the publisher's\).*{why}"):
            checked_partition(cfg)


def test_a_hostile_backbone_manifest_is_refused_not_a_traceback(s3_env, tmp_path):
    pytest.importorskip("boto3")
    from mlops.backbones import MANIFEST, BackboneUnavailable, resolve_backbone

    client, bucket = s3_env.s3_client(), s3_env.bucket
    prefix = f"backbones/hostile-{uuid.uuid4().hex[:8]}"
    for name in ("a", "a/b"):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=b"w")
    entry = {"sha256": hashlib.sha256(b"w").hexdigest(), "size": 1}
    manifests = (
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        (
            json.dumps(
                {"format": 1, "weights_sha256": "0" * 64, "files": {"a": entry, "a/b": entry}}
            ).encode(),
            "also a folder",
        ),
    )
    for body, why in manifests:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}", Body=body)
        with pytest.raises(BackboneUnavailable, match=why):
            resolve_backbone(f"s3://{bucket}/{prefix}", tmp_path / "cache")

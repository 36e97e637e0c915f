"""Images in S3, one prefix per holder, so that a site's pods, which hold only that site's credentials, can
download only that site's images (the layout the MinIO policies of infra/training allow):

  s3://BUCKET/server/published.json        every image's id, label, split and site (no pixels) and the
                                           partition the data was published for
  s3://BUCKET/server/catalog.json          the server's image list (id, label, split)
  s3://BUCKET/server/images/<image id>     the server's holder: the global test and reference images
  s3://BUCKET/sites/<k>/catalog.json       site k's image list (id, label, split) and the class names
  s3://BUCKET/sites/<k>/images/<image id>  site k's train/val/test images (k = the site's index)

`fedmedclip data publish` writes it from a local source. A pipeline run with `--data s3://BUCKET` reads it:
prepare (server credentials) draws the partition from server/published.json and checks that it is the
published one; each holder's tasks download their own prefix into the task's cache. Image ids, labels and
bytes are those of the local source, so the features, and every metric, equal an in-process run on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from components.sites import SECRET_KEYS, SERVER_PREFIX, SERVER_SECRET_NAME, site_prefix, site_secret_name
from fedmedclip.data import ImageRecord, ImageSet
from fedmedclip.errors import ConfigError, DataError

log = logging.getLogger("fedmedclip.site_data")

CATALOG = "catalog.json"  # a holder's own image list, in its prefix
PUBLISHED = "published.json"  # server/: every image's id, label, split, site and the published partition
CATALOG_FORMAT = 1
PARTITION_KEYS = ("partition", "sites", "alpha", "seed", "split_ratio", "reference_fraction")
_DOWNLOAD_THREADS = 8


def is_s3(data: str) -> bool:
    return str(data).startswith("s3://")


def parse_bucket(uri: str) -> str:
    """`s3://BUCKET` -> BUCKET. The per-site policies cover the bucket root, so no key prefix is accepted."""
    if not is_s3(uri):
        raise ConfigError(f"{uri!r} is not an s3:// URI")
    bucket, _, rest = uri[len("s3://") :].partition("/")
    if not bucket or rest.strip("/"):
        raise ConfigError(
            f"--data {uri!r}: give the data bucket only, s3://BUCKET (sites/<k>/ and server/ are fixed prefixes)"
        )
    return bucket


def s3_client():
    """boto3 client from the environment: the task's Secret (AWS_ACCESS_KEY_ID/SECRET) and the endpoints
    ConfigMap (AWS_ENDPOINT_URL_S3) in a cluster; `eval "$(fedmedclip stack env)"` on this machine."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    logging.getLogger("botocore.credentials").setLevel(
        logging.WARNING
    )  # "Found credentials in ..." per client
    # A fresh session: boto3's default one keeps the first credentials it found for the process's life.
    return boto3.session.Session().client("s3", endpoint_url=endpoint)


def holder_prefix(partition, holder: str) -> str:
    from fedmedclip.engine import SERVER

    if holder == SERVER:
        return SERVER_PREFIX
    return site_prefix(partition.site_names.index(holder))


def _secret_hint(prefix: str) -> str:
    if prefix == SERVER_PREFIX:
        return SERVER_SECRET_NAME
    return site_secret_name(prefix.split("/")[1])


def _s3_error(exc: Exception, bucket: str, key: str) -> Exception:
    """A boto3 failure as an error that names the object and what to check."""
    from botocore.exceptions import ClientError, NoCredentialsError

    where = f"s3://{bucket}/{key}"
    if isinstance(exc, NoCredentialsError):
        return DataError(
            f"cannot read {where}: no S3 credentials in the environment ({', '.join(SECRET_KEYS)}); in a "
            f"cluster the task gets them from the Secret {_secret_hint(key)}, on this machine run "
            '`eval "$(fedmedclip stack env)"`'
        )
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            return DataError(f"{where} does not exist: publish the data first (`fedmedclip data publish`)")
        if code == "NoSuchBucket":
            return DataError(
                f"bucket {bucket!r} does not exist: publish the data first (`fedmedclip data publish`)"
            )
        if code in ("AccessDenied", "403", "Forbidden"):
            return DataError(
                f"access to {where} denied: this task's credentials (Secret {_secret_hint(key)}) do not cover it"
            )
        return DataError(f"cannot read {where}: {code or exc}")
    return DataError(f"cannot read {where}: {exc}")


def _get_json(client, bucket: str, key: str) -> dict:
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:  # botocore raises several unrelated classes
        raise _s3_error(exc, bucket, key) from None
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise DataError(f"s3://{bucket}/{key} is not valid JSON: {exc}") from None


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def partition_settings(cfg) -> dict:
    d = cfg.to_json()
    d = {k: d[k] for k in PARTITION_KEYS}
    d["split_ratio"] = list(d["split_ratio"])
    if d["partition"] == "natural":
        d["sites"] = None
    return d


# ------------------------------------------------------------------------------------------- reading
def catalog_image_set(bucket: str, client=None) -> tuple[ImageSet, dict]:
    """The whole image list from server/published.json (records without local files: enough to partition)."""
    client = client or s3_client()
    cat = _get_json(client, bucket, SERVER_PREFIX + PUBLISHED)
    if cat.get("format") != CATALOG_FORMAT:
        raise DataError(f"s3://{bucket}/{SERVER_PREFIX}{PUBLISHED}: unknown format {cat.get('format')!r}")
    records = [ImageRecord(i, "", label, split, site or None) for i, label, split, site in cat["records"]]
    return ImageSet(list(cat["class_names"]), records, f"s3://{bucket}"), cat


def check_published_partition(cfg, partition, catalog: dict) -> None:
    """Refuse a run whose partition is not the one the data was published for (its images would be missing
    from the sites' prefixes)."""
    if partition.digest != catalog["partition_digest"]:
        raise ConfigError(
            f"{cfg.data} was published for the partition {catalog['partition_settings']}, but this run asks for "
            f"{partition_settings(cfg)}: run with the published settings, or publish again to another bucket"
        )


def stage_holder(cfg, partition, holder: str, client=None, progress: bool = False) -> ImageSet:
    """Download `holder`'s prefix into the task's cache (files already there with the right MD5 are kept)
    and return its images as an ImageSet with the global class names."""
    from fedmedclip.engine import holder_image_ids

    bucket = parse_bucket(cfg.data)
    prefix = holder_prefix(partition, holder)
    client = client or s3_client()
    cat = _get_json(client, bucket, prefix + CATALOG)
    by_id = {i: (label, split) for i, label, split in cat["records"]}
    wanted = holder_image_ids(partition, holder)
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise DataError(
            f"s3://{bucket}/{prefix}{CATALOG} lacks {len(missing)} of {holder}'s images (e.g. {missing[0]!r}): "
            "the data was published for another partition; publish again"
        )
    root = Path(cfg.cache_dir) / "s3" / bucket / prefix
    etags = _list_etags(client, bucket, prefix + "images/")

    def fetch(image_id: str) -> Path:
        key = f"{prefix}images/{image_id}"
        dst = root / "images" / image_id
        if key not in etags:
            raise DataError(f"s3://{bucket}/{key} is listed in {prefix}{CATALOG} but does not exist")
        if dst.is_file() and (len(etags[key]) != 32 or _md5(dst) == etags[key]):
            return dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".part-")
        os.close(fd)
        try:
            client.download_file(bucket, key, tmp)
            os.replace(tmp, dst)
        except Exception as exc:
            Path(tmp).unlink(missing_ok=True)
            raise _s3_error(exc, bucket, key) from None
        return dst

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(_DOWNLOAD_THREADS) as pool:
        paths = list(
            tqdm(
                pool.map(fetch, wanted),
                total=len(wanted),
                desc=f"{holder}: download",
                unit="img",
                disable=not progress,
            )
        )
    records = [
        ImageRecord(i, str(p.resolve()), by_id[i][0], by_id[i][1], None)
        for i, p in zip(wanted, paths, strict=True)
    ]
    log.info("%s: %d images from s3://%s/%s in %s", holder, len(records), bucket, prefix, root)
    return ImageSet(list(cat["class_names"]), records, f"s3://{bucket}/{prefix}")


def _list_etags(client, bucket: str, prefix: str) -> dict[str, str]:
    out = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = obj["ETag"].strip('"')
    except Exception as exc:
        raise _s3_error(exc, bucket, prefix) from None
    return out


# ------------------------------------------------------------------------------------------- publishing
def publish(cfg, bucket: str, client=None, progress: bool = True) -> dict:
    """Upload cfg's data source to `bucket`, each holder's images under its own prefix, as the partition of
    cfg draws them. Idempotent for the same source and partition; a bucket published for another partition
    is refused, never overwritten. Returns a summary."""
    from botocore.exceptions import ClientError

    from fedmedclip.engine import SERVER, holder_image_ids, load_image_set, partition_for

    client = client or s3_client()
    image_set = load_image_set(cfg)
    part = partition_for(cfg, image_set)
    settings = partition_settings(cfg)
    try:
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            # A new bucket is versioned, as the cluster's are: a later upload never loses an earlier one.
            client.create_bucket(Bucket=bucket)
            client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    except Exception as exc:
        raise _s3_error(exc, bucket, "") from None
    try:
        existing = client.get_object(Bucket=bucket, Key=SERVER_PREFIX + PUBLISHED)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
            raise _s3_error(exc, bucket, SERVER_PREFIX + PUBLISHED) from None
        existing = None
    if existing is not None:
        old = json.loads(existing)
        if old.get("partition_digest") != part.digest or old.get("image_list") != _image_list_digest(
            image_set
        ):
            raise DataError(
                f"s3://{bucket} already holds data published for {old.get('source')!r} with the partition "
                f"{old.get('partition_settings')}; refusing to overwrite it: publish to another bucket"
            )

    by_id = image_set.by_id()
    holder_ids = {h: holder_image_ids(part, h) for h in [*part.site_names, SERVER]}
    prefixes = {h: holder_prefix(part, h) for h in holder_ids}
    jobs = [(by_id[i].path, f"{prefixes[h]}images/{i}") for h, ids in holder_ids.items() for i in ids]
    etags = {}  # what is already there: one listing per prefix, not a request per image
    for prefix in prefixes.values():
        etags.update(_list_etags(client, bucket, prefix + "images/"))

    def put(job) -> int:
        src, key = job
        local, there = _md5(Path(src)), etags.get(key)
        if there == local:
            return 0  # already there (a re-run of the same publish)
        if there is not None:
            raise DataError(
                f"s3://{bucket}/{key} exists with other content than {src}; refusing to overwrite it"
            )
        with open(src, "rb") as fh:  # one PUT, so the ETag is the MD5 that re-runs and downloads compare
            client.put_object(Bucket=bucket, Key=key, Body=fh)
        return Path(src).stat().st_size

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(_DOWNLOAD_THREADS) as pool:
        sent = sum(
            tqdm(pool.map(put, jobs), total=len(jobs), desc="publish", unit="img", disable=not progress)
        )

    # Catalogs last, published.json at the very end: a run can start only on a complete publish.
    for holder, ids in holder_ids.items():
        rows = [[i, by_id[i].label, by_id[i].split] for i in ids]
        body = {
            "format": CATALOG_FORMAT,
            "holder": holder,
            "class_names": image_set.class_names,
            "records": rows,
        }
        client.put_object(Bucket=bucket, Key=prefixes[holder] + CATALOG, Body=json.dumps(body).encode())
    catalog = {
        "format": CATALOG_FORMAT,
        "source": cfg.data,
        "class_names": image_set.class_names,
        "records": [[r.image_id, r.label, r.split, r.site] for r in image_set.records],
        "partition_settings": settings,
        "partition_digest": part.digest,
        "image_list": _image_list_digest(image_set),
        "site_prefixes": {s: prefixes[s] for s in part.site_names},
    }
    client.put_object(Bucket=bucket, Key=SERVER_PREFIX + PUBLISHED, Body=json.dumps(catalog).encode())
    return {
        "bucket": bucket,
        "images": len(jobs),
        "bytes_uploaded": sent,
        "sites": {s: len(holder_ids[s]) for s in part.site_names},
        "server": len(holder_ids[SERVER]),
        "partition_digest": part.digest,
    }


def _image_list_digest(image_set: ImageSet) -> str:
    h = hashlib.sha256()
    for r in image_set.records:
        h.update(f"{r.image_id}\t{r.label}\t{r.split}\t{r.site or ''}\n".encode())
    return h.hexdigest()

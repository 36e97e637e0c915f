"""Images in S3, one prefix per holder, so that a site's pods, which hold only that site's credentials, can
read only that site's images (the layout the policies of components/policies.py allow):

  ROOT/server/published.json        every image's id, label, split and site (no pixels) and the partition
                                    the data was published for (central publishing only)
  ROOT/server/catalog.json          the server's images (global test and reference)
  ROOT/server/images/<image id>
  ROOT/sites/<k>/catalog.json       site k's images, their MD5s, its train/val/test ids in the partition's
                                    order and the partition digest: a site's data is complete in its prefix
  ROOT/sites/<k>/images/<image id>  site k's train/val/test images (k = the site's index)
  ROOT/summaries/sites/<k>.json     what the server may know of site k: class names and sample counts

ROOT is a bucket (`s3://BUCKET`; the pipeline's `--data` takes only this form), a mailbox root
`s3://BUCKET/PREFIX`, or, for a site that keeps its images at home, a local directory with the same layout.

`fedmedclip data publish` (the publisher's credentials) writes it all from a local source; `data publish
--site NAME` (that site's credentials) writes only site NAME's prefix and summary. A pipeline run with
`--data s3://BUCKET` reads it: prepare (server credentials) draws the partition from server/published.json and
checks that it is the published one; each holder's tasks download their own prefix into the task's cache,
checking each image against the MD5 in the catalog (no listing: a site's role may not list the bucket).
`read_site_assignment` gives the federation runtime a site's images and train/val/test ids from its own
prefix alone. Image ids, labels and bytes are those of the local source, so the features, and every metric,
equal an in-process run on it. Ids read from catalogs are confined to their root (fedmedclip.paths).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from components.policies import SITE_SUMMARY
from components.sites import SECRET_KEYS, SERVER_PREFIX, SERVER_SECRET_NAME, site_prefix, site_secret_name
from fedmedclip.data import ImageRecord, ImageSet
from fedmedclip.errors import ConfigError, DataError
from fedmedclip.federation.messages import MessageRefused, SiteSummary, parse
from fedmedclip.paths import check_file_within, check_relative_id, confined_path, is_within

log = logging.getLogger("fedmedclip.site_data")

CATALOG = "catalog.json"  # a holder's own image list, in its prefix
PUBLISHED = "published.json"  # server/: every image's id, label, split, site and the published partition
CATALOG_FORMAT = 1  # server/published.json
HOLDER_CATALOG_FORMAT = 2  # sites/<k>/catalog.json and server/catalog.json (2: MD5s, assignment, digest)
SUMMARY_FORMAT = 1
PARTITION_KEYS = ("partition", "sites", "alpha", "seed", "split_ratio", "reference_fraction")
SITE_SPLITS = ("train", "val", "test")
_DOWNLOAD_THREADS = 8


def is_s3(data: str) -> bool:
    return str(data).startswith("s3://")


def parse_bucket(uri: str) -> str:
    """`s3://BUCKET` -> BUCKET. The pipeline's data is a bucket root: no key prefix is accepted."""
    if not is_s3(uri):
        raise ConfigError(f"{uri!r} is not an s3:// URI")
    bucket, _, rest = uri[len("s3://") :].partition("/")
    if not bucket or rest.strip("/"):
        raise ConfigError(
            f"--data {uri!r}: give the data bucket only, s3://BUCKET (sites/<k>/ and server/ are fixed prefixes)"
        )
    return bucket


def parse_root(uri: str) -> tuple[str, str]:
    """`s3://BUCKET[/PREFIX]` -> (BUCKET, PREFIX without slashes)."""
    if not is_s3(uri):
        raise ConfigError(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise ConfigError(f"{uri!r}: no bucket; use s3://BUCKET or s3://BUCKET/PREFIX")
    if prefix:
        check_relative_id(prefix, f"the data root {uri}")
    return bucket, prefix


def s3_client():
    """boto3 client from the environment: the task's Secret (AWS_ACCESS_KEY_ID/SECRET) and the endpoints
    ConfigMap (AWS_ENDPOINT_URL_S3) in a cluster; `eval "$(fedmedclip stack env --role ROLE)"` here."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    logging.getLogger("botocore.credentials").setLevel(
        logging.WARNING
    )  # "Found credentials in ..." per client
    # A fresh session: boto3's default one keeps the first credentials it found for the process's life.
    return boto3.session.Session().client("s3", endpoint_url=endpoint)


def holder_prefix(partition, holder: str) -> str:
    from fedmedclip.preparation import SERVER

    if holder == SERVER:
        return SERVER_PREFIX
    return site_prefix(partition.site_names.index(holder))


def site_summary_key(index: int) -> str:
    """`summaries/sites/<k>.json`, site k's public summary (the server's role may read it)."""
    return SITE_SUMMARY.format(k=int(index))


_SITE_KEY = re.compile(r"(?:^|/)sites/(\d+)/")


def _credentials_hint(key: str) -> str:
    """Which credentials a key needs: the Secret a cluster task would hold, the role on this machine."""
    m = _SITE_KEY.search(key)
    if m:
        return f"site {m.group(1)}'s (Secret {site_secret_name(m.group(1))})"
    if key.startswith(SERVER_PREFIX) or f"/{SERVER_PREFIX}" in key:
        return f"the server's (Secret {SERVER_SECRET_NAME})"
    return "this party's"


def _s3_error(exc: Exception, bucket: str, key: str, verb: str = "read") -> Exception:
    """A boto3 failure as an error that names the object and what to check."""
    from botocore.exceptions import ClientError, NoCredentialsError

    where = f"s3://{bucket}/{key}"
    if isinstance(exc, NoCredentialsError):
        return DataError(
            f"cannot {verb} {where}: no S3 credentials in the environment ({', '.join(SECRET_KEYS)}); it needs "
            f"{_credentials_hint(key)} credentials: in a cluster the task gets them from its Secret, on this "
            'machine run `eval "$(fedmedclip stack env --role ROLE)"`'
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
                f"access to {where} denied ({verb}): the credentials in use do not cover it; it needs "
                f"{_credentials_hint(key)} credentials"
            )
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return DataError(
                f"cannot {verb} {where}: the S3 server does not accept these credentials ({code})"
            )
        return DataError(f"cannot {verb} {where}: {code or exc}")
    return DataError(f"cannot {verb} {where}: {exc}")


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


# ------------------------------------------------------------------------------ where the data lives
class _Root:
    """Published data under a root: an S3 bucket (and prefix), or a local directory of the same layout.
    Keys are relative to the root; every id joined into a key or a path is checked (fedmedclip.paths)."""

    def __init__(self, location: str | Path, client=None):
        self.location = str(location)
        if is_s3(self.location):
            self.bucket, self.prefix = parse_root(self.location)
            self.dir = None
            self.client = client or s3_client()
        else:
            text = self.location[len("file://") :] if self.location.startswith("file://") else self.location
            self.bucket, self.prefix, self.client = "", "", None
            self.dir = Path(text).resolve()

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def url(self, rel: str) -> str:
        if self.dir is not None:
            return str(self.dir / rel)
        return f"s3://{self.bucket}/{self.key(rel)}"

    def _path(self, rel: str) -> Path:
        return confined_path(self.dir, rel, self.location)

    def get(self, rel: str) -> bytes | None:
        """The object's bytes; None when it does not exist (any other failure is an error)."""
        if self.dir is not None:
            path = self._path(rel)
            return path.read_bytes() if path.is_file() else None
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise _s3_error(exc, self.bucket, self.key(rel)) from None
        except Exception as exc:
            raise _s3_error(exc, self.bucket, self.key(rel)) from None

    def get_json(self, rel: str, required: bool = True) -> dict | None:
        body = self.get(rel)
        if body is None:
            if required:
                raise DataError(
                    f"{self.url(rel)} does not exist: publish the data first (`fedmedclip data publish`)"
                )
            return None
        try:
            return json.loads(body)
        except json.JSONDecodeError as exc:
            raise DataError(f"{self.url(rel)} is not valid JSON: {exc}") from None

    def md5(self, rel: str) -> str | None:
        """The stored object's MD5 (its ETag: every object is one PUT), None when absent."""
        if self.dir is not None:
            path = self._path(rel)
            return _md5(path) if path.is_file() else None
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(rel))["ETag"].strip('"')
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise _s3_error(exc, self.bucket, self.key(rel)) from None

    def put(self, rel: str, body: bytes) -> None:
        if self.dir is not None:
            _write_atomic(self._path(rel), lambda fh: fh.write(body))
            return
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=body)
        except Exception as exc:
            raise _s3_error(exc, self.bucket, self.key(rel), "write") from None

    def put_file(self, rel: str, src: Path) -> None:
        if self.dir is not None:
            with open(src, "rb") as fin:
                _write_atomic(self._path(rel), lambda fh: shutil.copyfileobj(fin, fh))
            return
        try:
            with open(src, "rb") as fh:  # one PUT, so the ETag is the MD5 that re-runs and downloads compare
                self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=fh)
        except Exception as exc:
            raise _s3_error(exc, self.bucket, self.key(rel), "write") from None


def _write_atomic(path: Path, write: Callable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------- reading
def catalog_image_set(bucket: str, client=None) -> tuple[ImageSet, dict]:
    """The whole image list from server/published.json (records without local files: enough to partition)."""
    root = _Root(f"s3://{bucket}", client)
    cat = root.get_json(SERVER_PREFIX + PUBLISHED)
    if cat.get("format") != CATALOG_FORMAT:
        raise DataError(f"s3://{bucket}/{SERVER_PREFIX}{PUBLISHED}: unknown format {cat.get('format')!r}")
    source = root.url(SERVER_PREFIX + PUBLISHED)
    for image_id, *_ in cat["records"]:
        check_relative_id(image_id, source)
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


def _read_holder_catalog(root: _Root, prefix: str) -> dict:
    cat = root.get_json(prefix + CATALOG)
    where = root.url(prefix + CATALOG)
    if cat.get("format") != HOLDER_CATALOG_FORMAT:
        raise DataError(
            f"{where}: catalog format {cat.get('format')!r}, expected {HOLDER_CATALOG_FORMAT} (it lacks the "
            "images' MD5s and the assignment): publish the data again with this version"
        )
    md5 = cat.get("md5") or {}
    for image_id, _label, _split in cat["records"]:
        check_relative_id(image_id, where)
        if not re.fullmatch(r"[0-9a-f]{32}", str(md5.get(image_id, ""))):
            raise DataError(f"{where}: no valid MD5 for image {image_id!r}")
    return cat


def _stage(
    root: _Root,
    prefix: str,
    cat: dict,
    wanted: list[str],
    cache_root: Path,
    label: str,
    progress: bool,
    confine: Path | None = None,
) -> list[ImageRecord]:
    """Local files for `wanted` ids of the holder at `prefix`: from a local root in place, from S3 into
    `cache_root/<prefix>images/` (files already there with the catalog's MD5 are kept; every download is
    checked against it). No listing: each key follows from the id. Every path, symlinks resolved, stays
    inside `confine` (the download cache the user gave, or the local root): a linked folder anywhere below
    it (`<cache>/s3/<bucket>/sites/0/images` pointing elsewhere) is refused, not followed."""
    confine = Path(root.dir if root.dir is not None else (confine or cache_root))

    def confined(base: Path, image_id: str) -> Path:
        path = confined_path(base, image_id, where)
        if not is_within(path, confine):
            raise DataError(
                f"image id {image_id!r} from {where} is refused: {path} resolves to {os.path.realpath(path)}, "
                f"outside {os.path.realpath(confine)} (a symbolic link below it points elsewhere)"
            )
        return path

    where = root.url(prefix + CATALOG)
    by_id = {i: (label_, split) for i, label_, split in cat["records"]}
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise DataError(
            f"{where} lacks {len(missing)} of {label}'s images (e.g. {missing[0]!r}): the data was published "
            "for another partition; publish again"
        )
    md5 = cat["md5"]

    def local(image_id: str) -> Path:
        path = confined(root.dir / prefix / "images", image_id)
        if not path.is_file():
            raise DataError(f"{path} is listed in {where} but does not exist")
        return path

    def fetch(image_id: str) -> Path:
        dst = confined(cache_root / prefix / "images", image_id)
        key = root.key(f"{prefix}images/{image_id}")
        if dst.is_file() and _md5(dst) == md5[image_id]:
            return dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".part-")
        os.close(fd)
        try:
            try:
                root.client.download_file(root.bucket, key, tmp)
            except Exception as exc:
                raise _s3_error(exc, root.bucket, key) from None
            got = _md5(Path(tmp))
            if got != md5[image_id]:
                raise DataError(
                    f"s3://{root.bucket}/{key} has MD5 {got}, not the {md5[image_id]} of {where}: the object "
                    "was changed after publishing; publish again"
                )
            os.replace(tmp, dst)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return dst

    from tqdm.auto import tqdm

    get = local if root.dir is not None else fetch
    with ThreadPoolExecutor(_DOWNLOAD_THREADS) as pool:
        paths = list(
            tqdm(
                pool.map(get, wanted),
                total=len(wanted),
                desc=f"{label}: images",
                unit="img",
                disable=not progress,
            )
        )
    return [
        ImageRecord(i, str(p.resolve()), by_id[i][0], by_id[i][1], None)
        for i, p in zip(wanted, paths, strict=True)
    ]


def stage_holder(cfg, partition, holder: str, client=None, progress: bool = False) -> ImageSet:
    """Download `holder`'s prefix into the task's cache and return its images as an ImageSet with the
    global class names (the pipeline's tasks, with that holder's credentials)."""
    from fedmedclip.preparation import holder_image_ids

    bucket = parse_bucket(cfg.data)
    root = _Root(f"s3://{bucket}", client)
    prefix = holder_prefix(partition, holder)
    cat = _read_holder_catalog(root, prefix)
    cache_root = Path(cfg.cache_dir) / "s3" / bucket
    wanted = holder_image_ids(partition, holder)
    records = _stage(root, prefix, cat, wanted, cache_root, holder, progress, Path(cfg.cache_dir))
    log.info("%s: %d images from s3://%s/%s in %s", holder, len(records), bucket, prefix, cache_root / prefix)
    return ImageSet(list(cat["class_names"]), records, f"s3://{bucket}/{prefix}")


@dataclass
class SiteAssignment:
    """One site's data as its own prefix holds it: its images (local files) and its train/val/test ids in
    the partition's order."""

    site: str
    index: int
    image_set: ImageSet  # this site's images only, with the federation's class names
    train: list[str]
    val: list[str]
    test: list[str]
    partition_digest: str
    source: str  # the catalog it was read from

    @property
    def class_names(self) -> list[str]:
        return self.image_set.class_names

    @property
    def samples(self) -> dict[str, int]:
        return {s: len(getattr(self, s)) for s in SITE_SPLITS}

    @property
    def splits(self) -> dict[str, list[str]]:
        """{"train"|"val"|"test": image ids in the partition's order}."""
        return {s: list(getattr(self, s)) for s in SITE_SPLITS}


def read_site_assignment(
    location: str | Path,
    index: int,
    site: str | None = None,
    cache_dir: str | Path = ".cache/fedmedclip",
    client=None,
    progress: bool = False,
) -> SiteAssignment:
    """Site k's data from its own prefix only: `location` is `s3://BUCKET[/PREFIX]` (images downloaded into
    `cache_dir/s3/BUCKET/[PREFIX/]sites/<k>/images/`, checked against the catalog's MD5s) or a local
    directory of the same layout (images used in place). `site`, when given, must be the catalog's holder.
    Needs only the site's own credentials (GetObject on `sites/<k>/`)."""
    root = _Root(location, client)
    prefix = site_prefix(int(index))
    cat = _read_holder_catalog(root, prefix)
    where = root.url(prefix + CATALOG)
    holder = cat.get("holder")
    if site is not None and holder != site:
        raise DataError(f"{where} holds site {holder!r}'s data, not {site!r}'s: check the site's index")
    assignment = cat.get("assignment") or {}
    if set(assignment) != set(SITE_SPLITS) or cat.get("index") != int(index):
        raise DataError(f"{where} is not a site's catalog (no train/val/test assignment for index {index})")
    for split in SITE_SPLITS:
        for image_id in assignment[split]:
            check_relative_id(image_id, where)
    wanted = [i for s in SITE_SPLITS for i in assignment[s]]
    cache_root = Path(cache_dir) / "s3" / root.bucket / root.prefix if root.dir is None else root.dir
    records = _stage(root, prefix, cat, wanted, cache_root, holder, progress, Path(cache_dir))
    return SiteAssignment(
        site=holder,
        index=int(index),
        image_set=ImageSet(list(cat["class_names"]), records, root.url(prefix)),
        train=list(assignment["train"]),
        val=list(assignment["val"]),
        test=list(assignment["test"]),
        partition_digest=cat["partition_digest"],
        source=where,
    )


def read_site_summary(location: str | Path, index: int, client=None) -> dict:
    """Site k's public summary (`summaries/sites/<k>.json`: site, index, class_names, samples per split,
    partition_digest), written by whoever published the site's data; the server's role may read it. Parsed
    against its one declaration (`fedmedclip.federation.messages.SiteSummary`), which the writer uses too."""
    root = _Root(location, client)
    key = site_summary_key(index)
    body = root.get(key)
    if body is None:
        raise DataError(f"{root.url(key)} does not exist: publish the data first (`fedmedclip data publish`)")
    try:
        summary = parse(SiteSummary, body, f"site {index}'s publisher", root.url(key))
    except MessageRefused as exc:
        raise DataError(str(exc)) from None
    if summary.index != int(index):
        raise DataError(f"{root.url(key)} is not site {index}'s summary (it says index {summary.index})")
    return summary.to_dict()


# ------------------------------------------------------------------------------------------- publishing
def _load_source(cfg, allow_outside_root: bool) -> ImageSet:
    from fedmedclip.data import open_source
    from fedmedclip.preparation import load_image_set

    if cfg.data == "synthetic" or is_s3(cfg.data):
        return load_image_set(cfg)
    return open_source(cfg.data, allow_outside_root=allow_outside_root)


def _check_publishable(
    image_set: ImageSet, ids: list[str], allow_outside_root: bool
) -> dict[str, ImageRecord]:
    """Every id must be a clean relative key; every file must lie under the source's root (symlinks
    resolved) unless `allow_outside_root`."""
    source = Path(image_set.source)
    data_root = source if source.is_dir() else source.parent
    by_id = image_set.by_id()
    for image_id in ids:
        check_relative_id(image_id, image_set.source)
        if not allow_outside_root:
            check_file_within(
                by_id[image_id].path,
                data_root,
                f"image {image_id!r} of {image_set.source}",
                "pass --allow-outside-root to publish it anyway",
            )
    return by_id


def _holder_catalog(holder: str, index: int | None, ids, by_id, image_set, part, assignment, md5s) -> dict:
    return {
        "format": HOLDER_CATALOG_FORMAT,
        "holder": holder,
        "index": index,
        "class_names": image_set.class_names,
        "records": [[i, by_id[i].label, by_id[i].split] for i in ids],
        "md5": {i: md5s[i] for i in ids},
        "assignment": assignment,
        "partition_digest": part.digest,
    }


def _site_summary(site: str, index: int, image_set: ImageSet, part) -> dict:
    return SiteSummary.build(
        format=SUMMARY_FORMAT,
        site=site,
        index=index,
        class_names=image_set.class_names,
        samples={s: len(part.sites[site][s]) for s in SITE_SPLITS},
        partition_digest=part.digest,
    ).to_dict()


def _md5s(paths: dict[str, str]) -> dict[str, str]:
    with ThreadPoolExecutor(_DOWNLOAD_THREADS) as pool:
        return dict(zip(paths, pool.map(lambda p: _md5(Path(p)), paths.values()), strict=True))


def publish(cfg, bucket: str, client=None, progress: bool = True, allow_outside_root: bool = False) -> dict:
    """Upload cfg's data source to `bucket`, each holder's images under its own prefix, as the partition of
    cfg draws them (the publisher's credentials: it lists the bucket to skip what is there). Idempotent for
    the same source and partition; a bucket published for another partition is refused, never overwritten.
    Returns a summary."""
    from botocore.exceptions import ClientError

    from fedmedclip.preparation import SERVER, holder_image_ids, partition_for

    client = client or s3_client()
    image_set = _load_source(cfg, allow_outside_root)
    part = partition_for(cfg, image_set)
    settings = partition_settings(cfg)
    holder_ids = {h: holder_image_ids(part, h) for h in [*part.site_names, SERVER]}
    by_id = _check_publishable(image_set, [i for ids in holder_ids.values() for i in ids], allow_outside_root)
    try:
        try:  # ListBucket: what the publisher's role may do (HeadBucket is not an action of its own)
            client.list_objects_v2(Bucket=bucket, MaxKeys=1)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            # A new bucket is versioned, as the cluster's are: a later upload never loses an earlier one.
            # (An admin's key may create it; the roles' keys may not: `fedmedclip stack add-bucket`.)
            client.create_bucket(Bucket=bucket)
            client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        if code in ("AccessDenied", "403", "Forbidden"):
            raise DataError(
                f"the credentials in use may not list or create bucket {bucket!r}: publishing needs the "
                "publisher's role granted on it (the local stack: `fedmedclip stack add-bucket "
                f"{bucket}`; a cluster: the data bucket of infra/training)"
            ) from None
        raise _s3_error(exc, bucket, "", "write") from None
    root = _Root(f"s3://{bucket}", client)
    old = root.get_json(SERVER_PREFIX + PUBLISHED, required=False)
    if old is not None and (
        old.get("partition_digest") != part.digest or old.get("image_list") != _image_list_digest(image_set)
    ):
        raise DataError(
            f"s3://{bucket} already holds data published for {old.get('source')!r} with the partition "
            f"{old.get('partition_settings')}; refusing to overwrite it: publish to another bucket"
        )

    prefixes = {h: holder_prefix(part, h) for h in holder_ids}
    md5s = _md5s({i: by_id[i].path for ids in holder_ids.values() for i in ids})
    jobs = [(i, f"{prefixes[h]}images/{i}") for h, ids in holder_ids.items() for i in ids]
    etags = {}  # what is already there: one listing per prefix, not a request per image
    for prefix in prefixes.values():
        etags.update(_list_etags(client, bucket, prefix + "images/"))

    def put(job) -> int:
        image_id, key = job
        src, there = by_id[image_id].path, etags.get(key)
        if there == md5s[image_id]:
            return 0  # already there (a re-run of the same publish)
        if there is not None:
            raise DataError(
                f"s3://{bucket}/{key} exists with other content than {src}; refusing to overwrite it"
            )
        root.put_file(key, Path(src))
        return Path(src).stat().st_size

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(_DOWNLOAD_THREADS) as pool:
        sent = sum(
            tqdm(pool.map(put, jobs), total=len(jobs), desc="publish", unit="img", disable=not progress)
        )

    # Catalogs and summaries last, published.json at the very end: a run can start only on a complete publish.
    for holder, ids in holder_ids.items():
        if holder == SERVER:
            index, assignment = None, {"global_test": part.global_test, "reference": part.reference}
        else:
            index, assignment = part.site_names.index(holder), part.sites[holder]
        body = _holder_catalog(holder, index, ids, by_id, image_set, part, assignment, md5s)
        root.put(prefixes[holder] + CATALOG, json.dumps(body).encode())
        if holder != SERVER:
            root.put(
                site_summary_key(index), json.dumps(_site_summary(holder, index, image_set, part)).encode()
            )
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
    root.put(SERVER_PREFIX + PUBLISHED, json.dumps(catalog).encode())
    return {
        "bucket": bucket,
        "images": len(jobs),
        "bytes_uploaded": sent,
        "sites": {s: len(holder_ids[s]) for s in part.site_names},
        "server": len(holder_ids[SERVER]),
        "partition_digest": part.digest,
    }


def publish_site(
    cfg,
    site: str,
    location: str | Path,
    client=None,
    progress: bool = True,
    allow_outside_root: bool = False,
) -> dict:
    """Hospital-side onboarding: upload only `site`'s share of cfg's partition (its train/val/test images,
    its catalog with the assignment, its summary) to `location` (`s3://BUCKET[/PREFIX]` with that site's
    own credentials, or a local directory). Nothing outside `sites/<k>/` and `summaries/sites/<k>.json` is
    written or read, so no listing is needed. Idempotent; an image or catalog already there with other
    content (another source or partition) is refused, never overwritten. Returns a summary."""
    from fedmedclip.preparation import holder_image_ids, partition_for

    image_set = _load_source(cfg, allow_outside_root)
    part = partition_for(cfg, image_set)
    if site not in part.site_names:
        raise ConfigError(f"site {site!r} is not in the partition; its sites: {', '.join(part.site_names)}")
    index = part.site_names.index(site)
    prefix = site_prefix(index)
    ids = holder_image_ids(part, site)
    by_id = _check_publishable(image_set, ids, allow_outside_root)
    root = _Root(location, client)
    old = root.get_json(prefix + CATALOG, required=False)
    if old is not None and old.get("partition_digest") != part.digest:
        raise DataError(
            f"{root.url(prefix + CATALOG)} already holds {old.get('holder')!r}'s data for another partition "
            f"({old.get('partition_digest')}); refusing to overwrite it: publish to another bucket"
        )
    md5s = _md5s({i: by_id[i].path for i in ids})

    def put(image_id: str) -> int:
        key, src = f"{prefix}images/{image_id}", Path(by_id[image_id].path)
        there = root.md5(key)
        if there == md5s[image_id]:
            return 0
        if there is not None:
            raise DataError(f"{root.url(key)} exists with other content than {src}; refusing to overwrite it")
        root.put_file(key, src)
        return src.stat().st_size

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(_DOWNLOAD_THREADS) as pool:
        sent = sum(
            tqdm(
                pool.map(put, ids), total=len(ids), desc=f"{site}: publish", unit="img", disable=not progress
            )
        )
    body = _holder_catalog(site, index, ids, by_id, image_set, part, part.sites[site], md5s)
    root.put(prefix + CATALOG, json.dumps(body).encode())
    summary = _site_summary(site, index, image_set, part)
    root.put(site_summary_key(index), json.dumps(summary).encode())
    return {
        "location": root.url(prefix),
        "site": site,
        "index": index,
        "images": len(ids),
        "bytes_uploaded": sent,
        "samples": summary["samples"],
        "partition_digest": part.digest,
    }


def _list_etags(client, bucket: str, prefix: str) -> dict[str, str]:
    out = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = obj["ETag"].strip('"')
    except Exception as exc:
        raise _s3_error(exc, bucket, prefix) from None
    return out


def _image_list_digest(image_set: ImageSet) -> str:
    h = hashlib.sha256()
    for r in image_set.records:
        h.update(f"{r.image_id}\t{r.label}\t{r.split}\t{r.site or ''}\n".encode())
    return h.hexdigest()

"""Images in S3, one prefix per holder, so that a site's pods, which hold only that site's credentials, can
read only that site's images (the layout the policies of mlops/policies.py allow):

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
from dataclasses import dataclass
from pathlib import Path

from fedmedclip.data import ImageRecord, ImageSet
from fedmedclip.errors import ConfigError, DataError
from fedmedclip.federation.messages import HolderCatalog, MessageRefused, PublishedCatalog, SiteSummary, parse
from fedmedclip.federation.storage import LocalDirStore, ObjectStore
from fedmedclip.paths import check_file_within, check_relative_id, confined_path, is_within

from .policies import SITE_SUMMARY
from .s3 import S3Store, split_s3_url, store_errors
from .sites import SERVER_PREFIX, site_prefix
from .tree import download, file_digests, stored_md5, upload

log = logging.getLogger("fedmedclip.site_data")

CATALOG = "catalog.json"  # a holder's own image list, in its prefix
PUBLISHED = "published.json"  # server/: every image's id, label, split, site and the published partition
CATALOG_FORMAT = 1  # server/published.json
HOLDER_CATALOG_FORMAT = 2  # sites/<k>/catalog.json and server/catalog.json (2: MD5s, assignment, digest)
SUMMARY_FORMAT = 1
SITE_SPLITS = ("train", "val", "test")


def is_s3(data: str) -> bool:
    return str(data).startswith("s3://")


def parse_bucket(uri: str) -> str:
    """`s3://BUCKET` -> BUCKET. The pipeline's data is a bucket root: no key prefix is accepted."""
    bucket, prefix = parse_root(uri)
    if prefix:
        raise ConfigError(
            f"--data {uri!r}: give the data bucket only, s3://BUCKET (sites/<k>/ and server/ are fixed prefixes)"
        )
    return bucket


def parse_root(uri: str) -> tuple[str, str]:
    """`s3://BUCKET[/PREFIX]` -> (BUCKET, PREFIX without slashes)."""
    bucket, prefix = split_s3_url(uri, ConfigError)
    if prefix:
        check_relative_id(prefix, f"the data root {uri}")
    return bucket, prefix


def holder_prefix(partition, holder: str) -> str:
    from fedmedclip.preparation import SERVER

    if holder == SERVER:
        return SERVER_PREFIX
    return site_prefix(partition.site_names.index(holder))


def site_summary_key(index: int) -> str:
    """`summaries/sites/<k>.json`, site k's public summary (the server's role may read it)."""
    return SITE_SUMMARY.format(k=int(index))


def partition_settings(cfg) -> dict:
    """The settings the partition's draw depends on (declared `partition=True`), as published.json records them."""
    from fedmedclip.flags import declared

    d = cfg.to_json()
    d = {f.name: d[f.name] for f in declared(type(cfg), nested=False) if f.meta["partition"]}
    d["split_ratio"] = list(d["split_ratio"])
    if d["partition"] == "natural":
        d["sites"] = None
    return d


# The object store's failures (mlops/s3.py names the object and the credentials it needs) as DataError.
_data_errors = store_errors(
    DataError, lambda exc: f"{exc}: publish the data first (`fedmedclip data publish`)"
)


# ------------------------------------------------------------------------------ where the data lives
class _DataDir(LocalDirStore):
    """A local directory of the published layout; ids join as image paths (fedmedclip.paths), not store keys."""

    def _path(self, key: str) -> Path:
        return confined_path(self.root, key, str(self.root))


def _root(location: str | Path, client=None) -> tuple[ObjectStore, Path | None]:
    """The published data under `location` (`s3://BUCKET[/PREFIX]`, or a local directory of the same
    layout) as an object store whose keys are checked as image ids, and the directory when it is local."""
    text = str(location)
    if is_s3(text):
        bucket, prefix = parse_root(text)
        url = f"s3://{bucket}" + (f"/{prefix}" if prefix else "")
        return S3Store(url, client, check=lambda key: check_relative_id(key, text)), None
    store = _DataDir(text.removeprefix("file://"))
    return store, store.root


def _get_message(
    root: ObjectStore, key: str, cls, required: bool = True, party: str = "the publisher"
) -> dict | None:
    """`party`'s object at `key`, bounded and parsed against its declaration `cls`
    (fedmedclip/federation/messages.py); None when it is absent and not `required`."""
    body = root.get(key, max_bytes=cls.max_bytes)
    if body is None:
        if required:
            raise DataError(
                f"{root.where(key)} does not exist: publish the data first (`fedmedclip data publish`)"
            )
        return None
    try:
        return parse(cls, body, party, root.where(key)).to_dict()
    except MessageRefused as exc:
        raise DataError(f"{exc}: publish the data again with this version") from None


def _put_json(root: ObjectStore, key: str, obj: dict) -> None:
    root.put(key, json.dumps(obj).encode())


# ------------------------------------------------------------------------------------------- reading
@_data_errors
def catalog_image_set(bucket: str, client=None) -> tuple[ImageSet, dict]:
    """The whole image list from server/published.json (records without local files: enough to partition)."""
    root, _ = _root(f"s3://{bucket}", client)
    cat = _get_message(root, SERVER_PREFIX + PUBLISHED, PublishedCatalog)
    source = root.where(SERVER_PREFIX + PUBLISHED)
    for image_id, *_ in cat["records"]:
        check_relative_id(image_id, source)
    records = [ImageRecord(i, "", label, split, site or None) for i, label, split, site in cat["records"]]
    return ImageSet(list(cat["class_names"]), records, f"s3://{bucket}", duplicates=cat["duplicates"]), cat


def check_published_partition(cfg, partition, catalog: dict) -> None:
    """Refuse a run whose partition is not the one the data was published for (its images would be missing
    from the sites' prefixes)."""
    if partition.digest != catalog["partition_digest"]:
        raise ConfigError(
            f"{cfg.data} was published for the partition {catalog['partition_settings']}, but this run asks for "
            f"{partition_settings(cfg)}: run with the published settings, or publish again to another bucket"
        )


def _read_holder_catalog(root: ObjectStore, prefix: str) -> dict:
    cat = _get_message(root, prefix + CATALOG, HolderCatalog)
    where = root.where(prefix + CATALOG)
    md5 = cat["md5"]
    for image_id, _label, _split in cat["records"]:
        check_relative_id(image_id, where)
        if image_id not in md5:
            raise DataError(f"{where}: no MD5 for image {image_id!r}")
    return cat


def _stage(
    root: ObjectStore,
    local: Path | None,
    prefix: str,
    cat: dict,
    wanted: list[str],
    cache_root: Path,
    label: str,
    progress: bool,
    confine: Path,
) -> list[ImageRecord]:
    """Local files for `wanted` ids of the holder at `prefix`: from a local root in place, from S3 into
    `cache_root/<prefix>images/` (files already there with the catalog's MD5 are kept; every download is
    checked against it: mlops/tree.py). No listing: each key follows from the id. Every path, symlinks
    resolved, stays inside `confine` (the download cache the user gave, or the local root): a linked folder
    anywhere below it (`<cache>/s3/<bucket>/sites/0/images` pointing elsewhere) is refused, not followed."""
    where = root.where(prefix + CATALOG)
    confine = local if local is not None else confine

    def confined(base: Path, image_id: str) -> Path:
        path = confined_path(base, image_id, where)
        if not is_within(path, confine):
            raise DataError(
                f"image id {image_id!r} from {where} is refused: {path} resolves to {os.path.realpath(path)}, "
                f"outside {os.path.realpath(confine)} (a symbolic link below it points elsewhere)"
            )
        return path

    by_id = {i: (label_, split) for i, label_, split in cat["records"]}
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise DataError(
            f"{where} lacks {len(missing)} of {label}'s images (e.g. {missing[0]!r}): the data was published "
            "for another partition; publish again"
        )
    if local is not None:
        paths = [confined(local / prefix / "images", i) for i in wanted]
        for path in paths:
            if not path.is_file():
                raise DataError(f"{path} is listed in {where} but does not exist")
    else:
        jobs = {
            f"{prefix}images/{i}": (confined(cache_root / prefix / "images", i), cat["md5"][i])
            for i in wanted
        }
        paths = download(root, jobs, "md5", f"{label}: images" if progress else "")
    return [
        ImageRecord(i, str(p.resolve()), by_id[i][0], by_id[i][1], None)
        for i, p in zip(wanted, paths, strict=True)
    ]


@_data_errors
def stage_holder(cfg, partition, holder: str, client=None, progress: bool = False) -> ImageSet:
    """Download `holder`'s prefix into the task's cache and return its images as an ImageSet with the
    global class names (the pipeline's tasks, with that holder's credentials)."""
    from fedmedclip.preparation import holder_image_ids

    bucket = parse_bucket(cfg.data)
    root, _ = _root(f"s3://{bucket}", client)
    prefix = holder_prefix(partition, holder)
    cat = _read_holder_catalog(root, prefix)
    cache_root = Path(cfg.cache_dir) / "s3" / bucket
    wanted = holder_image_ids(partition, holder)
    records = _stage(root, None, prefix, cat, wanted, cache_root, holder, progress, Path(cfg.cache_dir))
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


@_data_errors
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
    root, local = _root(location, client)
    prefix = site_prefix(int(index))
    cat = _read_holder_catalog(root, prefix)
    where = root.where(prefix + CATALOG)
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
    cache_root = Path(cache_dir) / "s3" / root.url.removeprefix("s3://") if local is None else local
    records = _stage(root, local, prefix, cat, wanted, cache_root, holder, progress, Path(cache_dir))
    return SiteAssignment(
        site=holder,
        index=int(index),
        image_set=ImageSet(list(cat["class_names"]), records, root.where(prefix.rstrip("/"))),
        train=list(assignment["train"]),
        val=list(assignment["val"]),
        test=list(assignment["test"]),
        partition_digest=cat["partition_digest"],
        source=where,
    )


@_data_errors
def read_site_summary(location: str | Path, index: int, client=None) -> dict:
    """Site k's public summary (`summaries/sites/<k>.json`: site, index, class_names, samples per split,
    partition_digest), written by whoever published the site's data; the server's role may read it. Parsed
    against its one declaration (`fedmedclip.federation.messages.SiteSummary`), which the writer uses too."""
    root, _ = _root(location, client)
    key = site_summary_key(index)
    summary = _get_message(root, key, SiteSummary, party=f"site {index}'s publisher")
    if summary["index"] != int(index):
        raise DataError(f"{root.where(key)} is not site {index}'s summary (it says index {summary['index']})")
    return summary


# ------------------------------------------------------------------------------------------- publishing
def _load_source(cfg, allow_outside_root: bool) -> ImageSet:
    from fedmedclip.data import deduplicate, open_source
    from fedmedclip.preparation import load_image_set

    if cfg.data == "synthetic" or is_s3(cfg.data):
        return load_image_set(cfg)
    # The exact-duplicate rule of a run on the folder (--duplicates), applied before publishing: a run on the
    # published data trains and tests on the images `train --data FOLDER` would.
    return deduplicate(open_source(cfg.data, allow_outside_root=allow_outside_root), cfg.duplicates)


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


def _publish_holders(
    root: ObjectStore,
    image_set: ImageSet,
    part,
    holder_ids: dict[str, list[str]],
    listing: bool,
    progress: str,
) -> tuple[int, dict[str, dict]]:
    """Each holder's images under its own prefix (`upload`: what is there already is skipped, other content
    refused; found with one listing per prefix when `listing`, the publisher's role, else with one HEAD per
    image, as a site's role may not list), then each holder's catalog (its images' MD5s and its assignment) and a site's summary: catalogs
    last, so a reader that finds one finds its images. Returns the bytes sent and the sites' summaries."""
    from fedmedclip.preparation import SERVER

    by_id = image_set.by_id()
    prefixes = {h: holder_prefix(part, h) for h in holder_ids}
    files = {f"{prefixes[h]}images/{i}": by_id[i].path for h, ids in holder_ids.items() for i in ids}
    md5s = file_digests(files)
    if listing:
        there = {k: v for p in prefixes.values() for k, v in root.md5s(p + "images").items()}
    else:
        there = lambda key: stored_md5(root, key)  # noqa: E731
    sent = upload(root, files, md5s, there, progress)
    summaries = {}
    for holder, ids in holder_ids.items():
        if holder == SERVER:
            index, assignment = None, {"global_test": part.global_test, "reference": part.reference}
        else:
            index, assignment = part.site_names.index(holder), part.sites[holder]
        catalog = {
            "format": HOLDER_CATALOG_FORMAT,
            "holder": holder,
            "index": index,
            "class_names": image_set.class_names,
            "records": [[i, by_id[i].label, by_id[i].split] for i in ids],
            "md5": {i: md5s[f"{prefixes[holder]}images/{i}"] for i in ids},
            "assignment": assignment,
            "partition_digest": part.digest,
        }
        _put_json(root, prefixes[holder] + CATALOG, catalog)
        if holder != SERVER:
            summaries[holder] = SiteSummary.build(
                format=SUMMARY_FORMAT,
                site=holder,
                index=index,
                class_names=image_set.class_names,
                samples={s: len(part.sites[holder][s]) for s in SITE_SPLITS},
                partition_digest=part.digest,
            ).to_dict()
            _put_json(root, site_summary_key(index), summaries[holder])
    return sent, summaries


@_data_errors
def publish(cfg, bucket: str, client=None, progress: bool = True, allow_outside_root: bool = False) -> dict:
    """Upload cfg's data source to `bucket`, each holder's images under its own prefix, as the partition of
    cfg draws them (the publisher's credentials: it lists the bucket to skip what is there). Idempotent for
    the same source and partition; a bucket published for another partition is refused, never overwritten.
    Returns a summary."""
    from fedmedclip.federation.storage import StoreAccessDenied
    from fedmedclip.preparation import SERVER, holder_image_ids, partition_for

    image_set = _load_source(cfg, allow_outside_root)
    part = partition_for(cfg, image_set)
    holder_ids = {h: holder_image_ids(part, h) for h in [*part.site_names, SERVER]}
    _check_publishable(image_set, [i for ids in holder_ids.values() for i in ids], allow_outside_root)
    root, _ = _root(f"s3://{bucket}", client)
    try:
        root.ensure_bucket()
    except StoreAccessDenied:
        raise DataError(
            f"the credentials in use may not list or create bucket {bucket!r}: publishing needs the "
            f"publisher's role granted on it (the local stack: `fedmedclip stack add-bucket {bucket}`; a "
            "cluster: the data bucket of infra/training)"
        ) from None
    old = _get_message(root, SERVER_PREFIX + PUBLISHED, PublishedCatalog, required=False)
    if old is not None and (
        old.get("partition_digest") != part.digest or old.get("image_list") != _image_list_digest(image_set)
    ):
        raise DataError(
            f"s3://{bucket} already holds data published for {old.get('source')!r} with the partition "
            f"{old.get('partition_settings')}; refusing to overwrite it: publish to another bucket"
        )
    sent, _ = _publish_holders(root, image_set, part, holder_ids, True, "publish" if progress else "")
    # published.json at the very end: a run can start only on a complete publish.
    catalog = {
        "format": CATALOG_FORMAT,
        "source": cfg.data,
        "class_names": image_set.class_names,
        "records": [[r.image_id, r.label, r.split, r.site] for r in image_set.records],
        "partition_settings": partition_settings(cfg),
        "partition_digest": part.digest,
        "image_list": _image_list_digest(image_set),
        "site_prefixes": {s: holder_prefix(part, s) for s in part.site_names},
        "duplicates": image_set.duplicates,
    }
    _put_json(root, SERVER_PREFIX + PUBLISHED, catalog)
    return {
        "bucket": bucket,
        "images": sum(len(ids) for ids in holder_ids.values()),
        "bytes_uploaded": sent,
        "sites": {s: len(holder_ids[s]) for s in part.site_names},
        "server": len(holder_ids[SERVER]),
        "partition_digest": part.digest,
        "duplicates": image_set.duplicates,
    }


@_data_errors
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
    _check_publishable(image_set, ids, allow_outside_root)
    root, _ = _root(location, client)
    old = _get_message(root, prefix + CATALOG, HolderCatalog, required=False)
    if old is not None and old.get("partition_digest") != part.digest:
        raise DataError(
            f"{root.where(prefix + CATALOG)} already holds {old.get('holder')!r}'s data for another partition "
            f"({old.get('partition_digest')}); refusing to overwrite it: publish to another bucket"
        )
    progress_label = f"{site}: publish" if progress else ""
    sent, summaries = _publish_holders(root, image_set, part, {site: ids}, False, progress_label)
    return {
        "location": root.where(prefix.rstrip("/")),
        "site": site,
        "index": index,
        "images": len(ids),
        "bytes_uploaded": sent,
        "samples": summaries[site]["samples"],
        "partition_digest": part.digest,
    }


def _image_list_digest(image_set: ImageSet) -> str:
    h = hashlib.sha256()
    for r in image_set.records:
        h.update(f"{r.image_id}\t{r.label}\t{r.split}\t{r.site or ''}\n".encode())
    return h.hexdigest()


@_data_errors
def withdraw_site(location: str, index: int) -> tuple[int, int]:
    """Delete site k's published images (the ids its catalog lists), then its catalog and its summary, every
    version of each, with the site's own key (no listing). Returns (images, object versions deleted)."""
    parse_root(location)
    root, _ = _root(location)
    catalog = _get_message(root, f"{site_prefix(index)}{CATALOG}", HolderCatalog)
    ids = [check_relative_id(i, root.where(site_prefix(index) + CATALOG)) for i in catalog["md5"]]
    keys = [f"{site_prefix(index)}images/{i}" for i in ids] + [
        site_prefix(index) + CATALOG,
        site_summary_key(index),
    ]
    return len(ids), sum(root.delete_every_version(key) for key in keys)


# ------------------------------------------------------------------------------ the core's image source
class S3Source:
    """`s3://BUCKET` as an image source of the core (entry-point group `fedmedclip.sources`, fedmedclip.sources):
    the data published here, one prefix per holder."""

    def __init__(self):
        self.catalogs: dict[str, dict] = {}

    def published(self, cfg):
        """Every image's id, label and split from server/published.json (server credentials), no pixels."""
        image_set, self.catalogs[cfg.data] = catalog_image_set(parse_bucket(cfg.data))
        return image_set

    def check_partition(self, cfg, partition) -> None:
        if cfg.data in self.catalogs:
            check_published_partition(cfg, partition, self.catalogs[cfg.data])

    def stage(self, cfg, partition, holder: str):
        return stage_holder(cfg, partition, holder)

    def site_holder(self, cfg, site: str, index: int):
        got = read_site_assignment(cfg.data, index, site=site, cache_dir=cfg.cache_dir)
        return got.image_set, got.splits, got.partition_digest


_SOURCE = S3Source()


def s3_source() -> S3Source:
    return _SOURCE

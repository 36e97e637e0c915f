"""Images published to S3 (or a hospital's local folder of the same layout), one prefix per holder, so that a
site's pods, holding only that site's credentials, read only that site's images: the layout and its rules are
docs/contracts.md's "Data published to S3", the roles mlops/policies.py's. Readers need no listing; each image
is checked against its catalog's MD5 and each id read from a catalog stays inside its root (fedmedclip.paths).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fedmedclip.data import ImageRecord, ImageSet
from fedmedclip.digests import sha256_bytes
from fedmedclip.errors import ConfigError, DataError, class_names_problem
from fedmedclip.federation.mailbox import read_message
from fedmedclip.federation.messages import HolderCatalog, MessageRefused, PublishedCatalog, SiteSummary
from fedmedclip.federation.storage import (
    MAX_PARALLEL,
    LocalDirStore,
    ObjectStore,
    StoreAccessDenied,
    StoreError,
)
from fedmedclip.paths import DEFAULT_CACHE_DIR, check_relative_id, confined_path, is_within, lock_folder

from .policies import SERVER, SITE_SUMMARY, check_root  # the server party: its role's name is its holder's
from .s3 import ObjectMissing, S3Store, split_s3_url, store_errors
from .sites import SERVER_PREFIX, site_prefix
from .tree import download, file_digest, upload

log = logging.getLogger("fedmedclip.site_data")

CATALOG = "catalog.json"  # a holder's own image list, in its prefix
PUBLISHED = "published.json"  # server/: every image's id, label, split, site and the published partition
SITE_SPLITS = ("train", "val", "test")

# The object store's failures (mlops/s3.py names the object and the credentials it needs) as DataError.
_data_errors = store_errors(
    DataError, lambda exc: f"{exc}: publish the data first (`fedmedclip data publish`)"
)


def is_s3(data: str) -> bool:
    return str(data).startswith("s3://")


def parse_bucket(uri: str, flag: str = "--data") -> str:
    """`s3://BUCKET` -> BUCKET. The pipeline's data is a bucket root: no key prefix is accepted (`flag`: the
    option that gave it, which the refusal names)."""
    bucket, prefix = parse_root(uri)
    if prefix:
        raise ConfigError(
            f"{flag} {uri!r}: give the data bucket only, s3://BUCKET (sites/<k>/ and server/ are fixed prefixes)"
        )
    return bucket


def parse_root(uri: str) -> tuple[str, str]:
    """`s3://BUCKET[/PREFIX]` -> (BUCKET, PREFIX without slashes), a data root as the roles' policies name it."""
    bucket, prefix = split_s3_url(uri, ConfigError)
    return check_root(f"{bucket}/{prefix}".rstrip("/"))


def holder_prefix(partition, holder: str) -> str:
    return SERVER_PREFIX if holder == SERVER else site_prefix(partition.site_names.index(holder))


def site_summary_key(index: int) -> str:
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


class _DataDir(LocalDirStore):
    """A local directory of the published layout; ids join as image paths (fedmedclip.paths), not store keys."""

    def _path(self, key: str) -> Path:
        return confined_path(self.root, key, str(self.root))

    def md5(self, key: str) -> str | None:
        return file_digest(self._path(key), "md5") if self.exists(key) else None


def _root(location: str | Path, client=None) -> ObjectStore:
    """The published data at `location` as a store whose keys are checked as image ids."""
    text = str(location)
    if not is_s3(text):
        return _DataDir(text.removeprefix("file://"))
    parse_root(text)  # a data root as the roles' policies name it; S3Store normalises the URL
    return S3Store(text, client, check=lambda key: check_relative_id(key, text))


def _get_message(root: ObjectStore, key: str, cls, required=True, party="the publisher") -> dict | None:
    """`party`'s object at `key`, bounded and parsed against its declaration `cls` (federation/messages.py)."""
    try:
        message = read_message(root, key, cls, party)
    except MessageRefused as exc:
        raise DataError(f"{exc}: publish the data again with this version") from None
    if message is None and required:
        raise ObjectMissing(f"{root.where(key)} does not exist")  # _data_errors says how to publish it
    return message.to_dict() if message is not None else None


def _checked_listing(cat: dict, where: str, who: str) -> set[str]:
    """The ids a catalog lists (a holder's, or server/published.json), each once, inside its root and nameable
    by a file system, with a label of its classes, each class named once; DataError naming `who` otherwise."""
    if problem := class_names_problem(cat["class_names"]):
        raise DataError(f"{who}: {problem}")
    classes = set(cat["class_names"])
    listed: set[str] = set()
    for image_id, label, *_ in cat["records"]:
        check_relative_id(image_id, where)
        if image_id in listed:
            raise DataError(f"{who} lists image {image_id!r} twice")
        listed.add(image_id)
        if label not in classes:
            raise DataError(f"{who}: image {image_id!r} has label {label!r}, not one of its class_names")
    return listed


def _read_holder_catalog(root: ObjectStore, prefix: str) -> dict:
    """The holder's catalog at `prefix`, parsed and consistent: each image listed once, with a label of its
    classes, an MD5, and an id that stays inside its root and that a file system can name; an MD5 for exactly
    the images it lists. Another party wrote it: what disagrees is refused, never picked from (a record listed
    twice with two labels used the last one)."""
    cat = _get_message(root, prefix + CATALOG, HolderCatalog)
    where = root.where(prefix + CATALOG)
    who = f"{where} (holder {cat['holder']!r})"
    listed = _checked_listing(cat, where, who)
    if (unhashed := next((i for i, *_ in cat["records"] if i not in cat["md5"]), None)) is not None:
        raise DataError(f"{who}: no MD5 for image {unhashed!r}")
    if cat["bytes"] is not None and set(cat["bytes"]) != listed:
        raise DataError(f"{who}: its image sizes (bytes) are not those of exactly the images it lists")
    if len(cat["md5"]) != len(listed):
        extra = sorted(set(cat["md5"]) - listed)
        raise DataError(
            f"{who} records an MD5 for {len(extra)} image(s) it does not list (e.g. {extra[0]!r})"
        )
    return cat


def _stage(root, prefix, cat, wanted, cache_dir, label) -> list[ImageRecord]:
    """Local files for the `wanted` ids of the holder at `prefix`: from a local root in place, from S3 into
    `cache_dir/s3/<bucket[/prefix]>/<prefix>images/` (a file there with the catalog's MD5 is kept; every
    download is checked). Every path, symlinks resolved, stays inside the local root or `cache_dir`: a linked
    folder anywhere below it is refused, not followed."""
    local = isinstance(root, _DataDir)
    where, confine = root.where(prefix + CATALOG), root.root if local else Path(cache_dir)
    base = (root.root if local else confine / "s3" / root.url.removeprefix("s3://")) / prefix

    def confined(image_id: str) -> Path:
        path = confined_path(base / "images", image_id, where)
        if not is_within(path, confine):
            raise DataError(
                f"image id {image_id!r} from {where} is refused: {path} resolves to {os.path.realpath(path)}, "
                f"outside {os.path.realpath(confine)} (a symbolic link below it points elsewhere)"
            )
        return path

    by_id = {i: (label_, split) for i, label_, split in cat["records"]}
    if missing := [i for i in wanted if i not in by_id]:
        raise DataError(
            f"{where} lacks {len(missing)} of {label}'s images (e.g. {missing[0]!r}): the data was published "
            "for another partition; publish again"
        )
    try:
        if not local:
            jobs = {f"{prefix}images/{i}": (confined(i), cat["md5"][i]) for i in wanted}
            # No image is read past the size its publisher recorded (catalogs since sizes were written).
            sizes = None if cat["bytes"] is None else {f"{prefix}images/{i}": cat["bytes"][i] for i in wanted}
            paths = download(root, jobs, "md5", sizes)
        else:
            paths = [confined(i) for i in wanted]
            for image_id, path in zip(wanted, paths, strict=True):
                if not path.is_file():
                    raise DataError(f"{path} is listed in {where} but does not exist")
                # Used in place, checked as a download is: a file changed since publishing is not trained on.
                if (got := file_digest(path, "md5")) != cat["md5"][image_id]:
                    raise DataError(
                        f"{path} has MD5 {got}, not the {cat['md5'][image_id]} {where} records for image "
                        f"{image_id!r}: it was changed after publishing; publish {label}'s data again"
                    )
    except OSError as exc:  # a name the file system refuses, a file where a folder is needed, a full disk
        raise DataError(f"cannot stage {label}'s images listed in {where}: {exc}") from None
    return [ImageRecord(i, str(p.resolve()), *by_id[i], None) for i, p in zip(wanted, paths, strict=True)]


@dataclass
class SiteAssignment:
    """One site's data from its own prefix: its images and its train/val/test ids in the partition's order."""

    site: str
    index: int
    image_set: ImageSet
    train: list[str]
    val: list[str]
    test: list[str]
    partition_digest: str
    source: str  # the catalog it was read from

    @property
    def samples(self) -> dict[str, int]:
        return {s: len(getattr(self, s)) for s in SITE_SPLITS}


@_data_errors
def read_site_assignment(location, index: int, site=None, cache_dir=DEFAULT_CACHE_DIR) -> SiteAssignment:
    """Site k's data from its own prefix only (GetObject on `sites/<k>/`: the site's own credentials):
    `location` is `s3://BUCKET[/PREFIX]` (images downloaded into `cache_dir`) or a local directory of the same
    layout (images used in place). `site`, when given, must be the catalog's holder."""
    root = _root(location)
    prefix = site_prefix(int(index))
    cat = _read_holder_catalog(root, prefix)
    where, holder, assignment = root.where(prefix + CATALOG), cat["holder"], cat["assignment"]
    if site is not None and holder != site:
        raise DataError(f"{where} holds site {holder!r}'s data, not {site!r}'s: check the site's index")
    if set(assignment) != set(SITE_SPLITS) or cat["index"] != int(index):
        raise DataError(f"{where} is not a site's catalog (no train/val/test assignment for index {index})")
    wanted = [check_relative_id(i, where) for s in SITE_SPLITS for i in assignment[s]]
    if len(set(wanted)) != len(wanted):  # one image in two splits: tested on what it was trained on
        twice = next(i for n, i in enumerate(wanted) if i in wanted[:n])
        splits = [s for s in SITE_SPLITS if twice in assignment[s]]
        raise DataError(
            f"{where} (holder {holder!r}) assigns image {twice!r} more than once "
            f"({', '.join(splits) if len(splits) > 1 else 'twice to ' + splits[0]})"
        )
    records = _stage(root, prefix, cat, wanted, cache_dir, holder)
    image_set = ImageSet(list(cat["class_names"]), records, root.where(prefix.rstrip("/")))
    splits = [list(assignment[s]) for s in SITE_SPLITS]
    return SiteAssignment(holder, int(index), image_set, *splits, cat["partition_digest"], where)


@_data_errors
def read_site_summary(location: str | Path, index: int) -> dict:
    """Site k's public summary (`summaries/sites/<k>.json`, which the server's role may read)."""
    root = _root(location)
    key = site_summary_key(index)
    summary = _get_message(root, key, SiteSummary, party=f"site {index}'s publisher")
    if summary["index"] != int(index):
        raise DataError(f"{root.where(key)} is not site {index}'s summary (it says index {summary['index']})")
    return summary


def _load_source(cfg, site: str | None = None):
    """cfg's image set as `train --data` reads it (its classes, duplicate rule and root confinement: the published
    data is the images such a run uses), its partition and the ids of each holder (only `site`'s when given),
    each a clean relative key."""
    from fedmedclip.preparation import holder_image_ids, load_image_set, partition_for

    if is_s3(cfg.data):  # its published list has no pixels to upload
        raise ConfigError(
            f"--data {cfg.data} is published already: publish a folder, a .csv manifest or synthetic"
        )
    image_set = load_image_set(cfg)
    part = partition_for(cfg, image_set)
    if site is not None and site not in part.site_names:
        raise ConfigError(f"site {site!r} is not in the partition; its sites: {', '.join(part.site_names)}")
    holder_ids = {h: holder_image_ids(part, h) for h in ([site] if site else [*part.site_names, SERVER])}
    for ids in holder_ids.values():
        for image_id in ids:
            check_relative_id(image_id, image_set.source)
    return image_set, part, holder_ids


def _warn_unreadable(image_set: ImageSet, image_ids: list[str]) -> None:
    """The images to publish that training's decoder refuses (fedmedclip.data.load_image), logged in one
    warning naming the first: published unchecked, they stopped a site's feature extraction much later, in
    its own pod. Published all the same: a run with --skip-bad-images skips them, as it would locally."""
    from fedmedclip.data import load_image
    from fedmedclip.errors import ImageDecodeError, shown

    by_id = image_set.by_id()

    def problem(image_id: str) -> str | None:
        try:
            load_image(by_id[image_id].path).close()
        except ImageDecodeError as exc:
            return exc.reason
        return None

    with ThreadPoolExecutor(min(8, (os.cpu_count() or 2) * 2)) as pool:
        problems = dict(zip(image_ids, pool.map(problem, image_ids), strict=True))
    bad = [i for i, p in problems.items() if p is not None]
    if bad:
        log.warning(
            "%d of the images to publish cannot be decoded (first: %s: %s): published all the same; a run on them "
            "stops at the site's feature extraction unless it passes --skip-bad-images",
            len(bad),
            shown(bad[0]),
            problems[bad[0]],
        )


def _publish_holders(root: ObjectStore, image_set: ImageSet, part, holder_ids: dict, listing: bool, progress):
    """Each holder's images under its own prefix (what is there already is skipped, other content refused;
    found with one listing per prefix when `listing`, the publisher's role, else one HEAD per image; those to
    send are decoded first, `_warn_unreadable`), then its catalog and a site's summary: catalogs last, so a
    reader that finds one finds its images. Returns the bytes sent and the sites' summaries."""
    by_id = image_set.by_id()
    prefixes = {h: holder_prefix(part, h) for h in holder_ids}
    ids_by_key = {f"{prefixes[h]}images/{i}": i for h, ids in holder_ids.items() for i in ids}
    files = {key: by_id[i].path for key, i in ids_by_key.items()}
    if listing:
        found = {k: v for p in prefixes.values() for k, v in root.md5s(p + "images").items()}
    else:
        with ThreadPoolExecutor(MAX_PARALLEL) as pool:
            found = dict(zip(files, pool.map(root.md5, files), strict=True))
    # Only the images to send are decoded: a re-publish that sends nothing reads no pixels.
    _warn_unreadable(image_set, [i for key, i in ids_by_key.items() if found.get(key) is None])
    sent, md5s = upload(root, files, found.get, progress)
    summaries = {}
    for holder, ids in holder_ids.items():
        if holder == SERVER:
            index, assignment = None, {"global_test": part.global_test, "reference": part.reference}
        else:
            index, assignment = part.site_names.index(holder), part.sites[holder]
        common = {"index": index, "class_names": image_set.class_names, "partition_digest": part.digest}
        catalog = {"format": 2, "holder": holder, **common, "assignment": assignment}  # HolderCatalog
        catalog["records"] = [[i, by_id[i].label, by_id[i].split] for i in ids]
        catalog["md5"] = {i: md5s[f"{prefixes[holder]}images/{i}"] for i in ids}
        catalog["bytes"] = {i: os.path.getsize(by_id[i].path) for i in ids}  # each download's bound
        root.put(prefixes[holder] + CATALOG, json.dumps(catalog).encode())
        if holder != SERVER:
            samples = {s: len(part.sites[holder][s]) for s in SITE_SPLITS}
            summaries[holder] = SiteSummary.build(format=1, site=holder, samples=samples, **common).to_dict()
            root.put(site_summary_key(index), json.dumps(summaries[holder]).encode())
    return sent, summaries


@_data_errors
def publish(cfg, bucket: str, client=None, progress: bool = True) -> dict:
    """Upload cfg's data source to `bucket`, each holder's images under its own prefix, as cfg's partition
    draws them (the publisher's credentials). Idempotent for the same source and partition; a bucket published
    for another partition is refused, never overwritten. Returns a summary."""
    root = _root(f"s3://{bucket}", client)
    try:  # before the images are read and hashed: missing credentials are said at once
        root.ensure_bucket()
    except StoreAccessDenied as exc:  # its words say whether credentials are missing or do not cover it
        raise DataError(
            f"{exc}. Publishing needs the publisher's role granted on bucket {bucket!r}: on this machine the "
            f"local stack's (`fedmedclip stack up`; `fedmedclip stack add-bucket {bucket}` for keys of your "
            "own), in a cluster the data bucket of infra/training"
        ) from None
    image_set, part, holder_ids = _load_source(cfg)
    image_list = sha256_bytes(
        "".join(f"{r.image_id}\t{r.label}\t{r.split}\t{r.site or ''}\n" for r in image_set.records).encode()
    )
    old = _get_message(root, SERVER_PREFIX + PUBLISHED, PublishedCatalog, required=False)
    if old is not None and (old["partition_digest"] != part.digest or old["image_list"] != image_list):
        raise DataError(
            f"s3://{bucket} already holds data published for {old['source']!r} with the partition "
            f"{old['partition_settings']}; refusing to overwrite it: publish to another bucket"
        )
    sent, _ = _publish_holders(root, image_set, part, holder_ids, True, "publish" if progress else "")
    catalog = {  # PublishedCatalog, at the very end: a run can start only on a complete publish
        "format": 1,
        "source": cfg.data,
        "class_names": image_set.class_names,
        "records": [[r.image_id, r.label, r.split, r.site] for r in image_set.records],
        "partition_settings": partition_settings(cfg),
        "partition_digest": part.digest,
        "image_list": image_list,
        "site_prefixes": {s: holder_prefix(part, s) for s in part.site_names},
        "duplicates": image_set.duplicates,
    }
    root.put(SERVER_PREFIX + PUBLISHED, json.dumps(catalog).encode())
    return {
        "bucket": bucket,
        "images": sum(len(ids) for ids in holder_ids.values()),
        "bytes_uploaded": sent,
        "sites": {s: len(holder_ids[s]) for s in part.site_names},
        "server": len(holder_ids[SERVER]),
        "partition_digest": part.digest,
        "duplicates": image_set.duplicates,
    }


@contextlib.contextmanager
def _one_publish_at_a_time(root: ObjectStore):
    """A local folder takes one publish at a time (a lock of the folder itself). Two at once both found no
    catalog there and both wrote: the last catalog won over a mix of both partitions' images, the other
    publish reporting success for data no longer there (or one failed on the other's files). The second now
    waits, saying so, then finds the first one's catalog as any publish finds an existing destination: the
    same data (nothing sent) or another partition's (refused). An S3 root is left as it was."""
    if not isinstance(root, _DataDir):
        yield
        return
    root.root.mkdir(parents=True, exist_ok=True)
    why = "%s: another `data publish` is writing this folder; waiting for it to end"
    with lock_folder(root.root, on_wait=lambda: log.info(why, root.root)):
        yield


@_data_errors
def publish_site(cfg, site: str, location, progress=True) -> dict:
    """Hospital-side onboarding: upload only `site`'s share of cfg's partition (its images, its catalog, its
    summary) to `location` (`s3://BUCKET[/PREFIX]` with that site's own credentials, or a local directory).
    Nothing outside its prefix and summary is written or read, so no listing is needed. Idempotent; content
    of another source or partition already there is refused, never overwritten. Returns a summary."""
    image_set, part, holder_ids = _load_source(cfg, site)
    index = part.site_names.index(site)
    prefix = site_prefix(index)
    root = _root(location)
    with _one_publish_at_a_time(root):
        old = _get_message(root, prefix + CATALOG, HolderCatalog, required=False)
        if old is not None and old["partition_digest"] != part.digest:
            raise DataError(
                f"{root.where(prefix + CATALOG)} already holds the data of {old['holder']} for another partition "
                f"({old['partition_digest']}); refusing to overwrite it: publish to another "
                + ("bucket" if is_s3(str(location)) else "folder")
            )
        label = f"{site}: publish" if progress else ""
        sent, summaries = _publish_holders(root, image_set, part, holder_ids, False, label)
    return {
        "location": root.where(prefix.rstrip("/")),
        "site": site,
        "index": index,
        "images": len(holder_ids[site]),
        "bytes_uploaded": sent,
        "samples": summaries[site]["samples"],
        "partition_digest": part.digest,
    }


@_data_errors
def withdraw_site(location: str, index: int) -> tuple[int | None, int]:
    """Delete site k's images (the ids its catalog lists), then its catalog and its summary, every version of
    each, with the site's own key (no listing). Returns (images, object versions deleted); images is None when
    the catalog was gone already and only the summary an interrupted withdrawal left behind was deleted."""
    parse_root(location)  # s3:// only: a hospital's local folder is its own to delete
    root = _root(location)
    prefix = site_prefix(index)
    catalog = _get_message(root, prefix + CATALOG, HolderCatalog, required=False)
    if catalog is None:
        # The images go first and the catalog before the summary: without a catalog, a withdrawal that stopped
        # part-way has left at most the summary, which this one finishes.
        versions = root.delete_every_version(site_summary_key(index))
        if not versions:
            raise DataError(
                f"nothing to withdraw: {root.where(prefix + CATALOG)} does not exist (site {index}'s data was "
                f"withdrawn already, or never published to {location.rstrip('/')})"
            )
        return None, versions
    ids = [check_relative_id(i, root.where(prefix + CATALOG)) for i in catalog["md5"]]
    keys = [f"{prefix}images/{i}" for i in ids] + [prefix + CATALOG, site_summary_key(index)]
    return len(ids), sum(root.delete_every_version(key) for key in keys)


def _not_published_for(cfg, cat: dict) -> ConfigError:
    return ConfigError(
        f"{cfg.data} was published for the partition {cat['partition_settings']}, but this run asks for "
        f"{partition_settings(cfg)}: run with the published settings, or publish again to another bucket"
    )


def check_published_partition(cfg, client=None) -> None:
    """Before a pipeline starts on s3:// data: refuse a run whose partition settings are not those the data was
    published for, which its prepare task would refuse only after its retries (minutes). Reads
    server/published.json with `client` (a role's boto3 client), else the environment's credentials; a
    catalog that cannot be read leaves the check to the prepare task."""
    try:
        cat = _get_message(
            _root(f"s3://{parse_bucket(cfg.data)}", client), SERVER_PREFIX + PUBLISHED, PublishedCatalog
        )
    except (StoreError, DataError) as exc:
        log.debug("partition not checked before the run: %s", exc)
        return
    if cat["partition_settings"] != partition_settings(cfg):
        raise _not_published_for(cfg, cat)


class S3Source:
    """`s3://BUCKET` as an image source of the core (entry-point group `fedmedclip.sources`)."""

    catalogs: dict[str, dict] = {}  # every source of this process: what `published` read, for check_partition

    @_data_errors
    def published(self, cfg) -> ImageSet:
        """Every image's id, label and split from server/published.json (server credentials), no pixels."""
        bucket = parse_bucket(cfg.data)
        root = _root(f"s3://{bucket}")
        cat = _get_message(root, SERVER_PREFIX + PUBLISHED, PublishedCatalog)
        where = root.where(SERVER_PREFIX + PUBLISHED)
        _checked_listing(cat, where, f"{where} (the publisher's)")
        self.catalogs[cfg.data] = cat
        records = [ImageRecord(i, "", label, split, site or None) for i, label, split, site in cat["records"]]
        return ImageSet(list(cat["class_names"]), records, f"s3://{bucket}", duplicates=cat["duplicates"])

    def check_partition(self, cfg, partition) -> None:
        """Refuse a partition the data was not published for (its images would be missing from the prefixes)."""
        cat = self.catalogs.get(cfg.data)
        if cat is not None and partition.digest != cat["partition_digest"]:
            raise _not_published_for(cfg, cat)

    @_data_errors
    def stage(self, cfg, partition, holder: str) -> ImageSet:
        """`holder`'s images downloaded into the task's cache, with the global class names (its credentials)."""
        from fedmedclip.preparation import holder_image_ids

        bucket, prefix = parse_bucket(cfg.data), holder_prefix(partition, holder)
        root = _root(f"s3://{bucket}")
        cat, wanted = _read_holder_catalog(root, prefix), holder_image_ids(partition, holder)
        self._check_holder_catalog(cfg, partition, holder, cat, root.where(prefix + CATALOG))
        records = _stage(root, prefix, cat, wanted, cfg.cache_dir, holder)
        log.info("%s: %d images from %s in %s", holder, len(records), root.where(prefix), cfg.cache_dir)
        return ImageSet(list(cat["class_names"]), records, f"s3://{bucket}/{prefix}")

    def _check_holder_catalog(self, cfg, partition, holder: str, cat: dict, where: str) -> None:
        """`holder`'s catalog is that holder's, for this partition, with the published labels and classes: its
        labels are the ones trained on, so one that disagrees with server/published.json is refused, not used."""
        if cat["holder"] != holder:
            raise DataError(
                f"{where} holds {cat['holder']!r}'s data, not {holder!r}'s: publish the data again"
            )
        if cat["partition_digest"] != partition.digest:
            raise DataError(
                f"{where} ({holder}'s catalog) was published for another partition ({cat['partition_digest']}, "
                f"not {partition.digest}): publish the data again"
            )
        if list(cat["class_names"]) != list(partition.class_names):
            raise DataError(
                f"{where} ({holder}'s catalog) has the classes {cat['class_names']}, not the published "
                f"{partition.class_names}: publish the data again"
            )
        published = self.catalogs.get(cfg.data)
        if published is not None:
            labels = {i: label for i, label, *_ in published["records"]}
            for image_id, label, _split in cat["records"]:
                if image_id in labels and labels[image_id] != label:
                    raise DataError(
                        f"{where} ({holder}'s catalog) labels image {image_id!r} {label!r}, but "
                        f"server/{PUBLISHED} labels it {labels[image_id]!r}: publish the data again"
                    )

    def site_holder(self, cfg, site: str, index: int):
        got = read_site_assignment(cfg.data, index, site=site, cache_dir=cfg.cache_dir)
        return got.image_set, {s: getattr(got, s) for s in SITE_SPLITS}, got.partition_digest


s3_source = S3Source  # the entry points `fedmedclip.sources: s3, published`

"""Preparing a run's holders: the data source, the partition, each holder's features (encoded once, cached by
provenance) or pixels, and the method. Shared by the in-process simulator, the federation runtime's server and
site workers, and the pipeline's tasks, so every runtime encodes identical batches and builds identical methods."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone import Backbone, load_backbone, make_preprocessing
from .config import SYNTHETIC, TrainConfig
from .data import ImageSet, check_class_support, deduplicate, load_preprocessed, open_source
from .digests import sha256_file
from .errors import ConfigError, DataError
from .features import FeatureStore, build_feature_store, canonical_digest, check_training_classes
from .federation.storage import atomic_write_bytes
from .jsonfiles import read_json_object
from .methods import METHODS, Method, MethodContext, SiteData, resolved_preprocessing
from .partition import Partition, make_partition
from .paths import put_folder_in_place
from .preprocess import Preprocessing
from .sources import is_remote, remote_source

log = logging.getLogger(__name__)

SERVER = "server"


# ---------------------------------------------------------------- preparation
def load_image_set(cfg: TrainConfig) -> ImageSet:
    """The configured source; `synthetic` is generated once into the cache (deterministic). For remote data
    (`s3://BUCKET`) the published image list without pixels: enough to draw the partition."""
    if is_remote(cfg.data):
        image_set = remote_source(cfg.data).published(cfg)
    else:
        image_set = open_source(
            _local_source(cfg), classes=cfg.classes, allow_outside_root=cfg.allow_outside_root
        )
        # Byte-identical copies across splits would put a training image in a test split (the publisher
        # of remote data applied this before publishing).
        image_set = deduplicate(image_set, cfg.duplicates)
    if cfg.classes is None:  # an inferred class list: a label typo must not become a class of its own
        check_class_support(image_set, cfg.min_class_images)
    return image_set


# In a cached synthetic data set's folder: the generator's arguments and the sha256 of each file it wrote, recorded
# when it was generated and checked whenever the folder is reused (the generator is deterministic, so a file that
# differs was changed since: a relabelled manifest line would otherwise be trained on without a word).
GENERATED = "generated.json"


def _local_source(cfg: TrainConfig) -> Path | str:
    """The data's manifest; `synthetic` is generated into the cache once, and checked against its GENERATED record
    whenever it is reused: a folder changed since, or incomplete, is refused in one line and left as it is."""
    if cfg.data != SYNTHETIC:
        return cfg.data
    args = cfg.synthetic_arguments()
    folder = Path(cfg.cache_dir) / "synthetic" / canonical_digest(args)[:16]
    manifest = folder / "manifest.csv"
    empty = folder.is_dir() and not any(folder.iterdir())  # an empty folder is generated into
    if os.path.lexists(folder) and not empty:
        problem = _generation_problem(folder, args)
        if problem and not os.path.lexists(folder / GENERATED) and manifest.is_file():
            # Generated before the record was kept: checked once against a fresh generation, then recorded.
            problem = _record_earlier_generation(folder, args)
        if problem:
            raise DataError(
                f"the synthetic data set cached in {folder} {problem}; it is left untouched: delete that folder, "
                "and the next run generates it again"
            )
        return manifest
    # A private temporary folder: processes sharing the cache may generate the same data at once, and the first
    # one put in place is kept.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _generate(folder, args)
    put_folder_in_place(tmp, folder, lambda: _generation_problem(folder, args) is None)
    return manifest


def _generate(folder: Path, args: dict) -> Path:
    """synthetic.generate(**args) into a new private folder beside `folder`, with its GENERATED record; nothing
    is left behind when it fails."""
    from . import synthetic

    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        synthetic.generate(tmp, **args)
        record = {"format": 1, "arguments": args, "files": _file_digests(tmp)}
        (tmp / GENERATED).write_text(json.dumps(record, indent=1, sort_keys=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed generation leaves nothing in the cache
        raise
    return tmp


def _file_digests(folder: Path) -> dict[str, str]:
    """sha256 of each file under `folder` (but its GENERATED record), by `/`-separated relative path."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p != folder / GENERATED
    }


def _generation_problem(folder: Path, args: dict) -> str | None:
    """What is wrong with a cached synthetic data set, against the GENERATED record written with it (None: each
    file it recorded is there with the same bytes)."""
    if not folder.is_dir():
        return "is not a folder"
    if not os.path.lexists(folder / "manifest.csv"):
        return "is incomplete: it has no manifest.csv"
    try:
        record = read_json_object(folder / GENERATED)
    except FileNotFoundError:
        return f"has no {GENERATED} (the record of what was generated)"
    except (OSError, ValueError) as exc:
        return f"has a damaged {GENERATED} ({exc})"
    files = record.get("files")
    if record.get("arguments") != args or not isinstance(files, dict) or "manifest.csv" not in files:
        return f"has a {GENERATED} that does not describe it"
    return _files_problem(folder, files)


def _files_problem(folder: Path, files: dict, differs: str = "differs") -> str | None:
    """The first of `files` ({relative path: sha256}) that `folder` lacks, cannot read or holds other bytes of
    (None: each is there, the same); `differs` says against what a changed one was compared."""
    for rel, want in files.items():
        path = folder / str(rel)
        try:
            got = sha256_file(path) if path.is_file() and not path.is_symlink() else None
        except OSError:
            got = None
        if got is None:
            return f"is incomplete: {rel} is missing or unreadable"
        if got != want:
            return f"was changed since it was generated: {rel} {differs}"
    return None


def _record_earlier_generation(folder: Path, args: dict) -> str | None:
    """A folder generated before GENERATED records were kept: compared file by file with a fresh generation
    (deterministic), which gives it its record when each file is the same; else what differs."""
    tmp = _generate(folder, args)
    try:
        wanted = read_json_object(tmp / GENERATED)["files"]
        problem = _files_problem(folder, wanted, "differs from what the generator writes")
        if problem:
            return problem
        try:  # only the record is added: a read-only cache is checked again the next time
            atomic_write_bytes(folder / GENERATED, (tmp / GENERATED).read_bytes())
        except OSError as exc:
            log.debug("could not record %s in %s: %s", GENERATED, folder, exc)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def holder_images(cfg: TrainConfig, image_set: ImageSet, partition: Partition, holder: str) -> ImageSet:
    """The images a holder encodes, with local files: the source itself, or for remote data the holder's own
    prefix downloaded with the holder's own credentials."""
    if is_remote(cfg.data):
        return remote_source(cfg.data).stage(cfg, partition, holder)
    return image_set


@dataclass
class Prepared:
    cfg: TrainConfig
    image_set: ImageSet
    partition: Partition
    backbone: Backbone
    preprocessing: Preprocessing
    stores: dict[str, FeatureStore]  # holder (site name or "server") -> store
    feature_seconds: float
    # Only for methods with `needs_images`: holder -> uint8 pixels [N, S, S, 3], rows as in its store.
    pixels: dict[str, torch.Tensor] | None = None


def holder_image_ids(partition: Partition, holder: str) -> list[str]:
    """The images a holder encodes: a site its own train/val/test, the server the global test and
    reference sets. The order is fixed, so every runner encodes identical batches."""
    if holder == SERVER:
        return partition.global_test + partition.reference
    s = partition.sites[holder]
    return s["train"] + s["val"] + s["test"]


def extract_features(
    image_set: ImageSet,
    image_ids: list[str],
    backbone: Backbone,
    preprocessing: Preprocessing,
    cfg: TrainConfig,
    holder: str,
    progress: bool = True,
) -> FeatureStore:
    by_id = image_set.by_id()
    records = [by_id[i] for i in image_ids]
    return build_feature_store(
        records,
        image_set.class_names,
        backbone,
        preprocessing,
        cache_dir=cfg.cache_dir,
        prompt_template=cfg.prompt_template,
        skip_bad=cfg.skip_bad_images,
        progress=progress,
        desc=f"encoding {holder}",
        engine=cfg.encoder_engine,
        encoder_cache=Path(cfg.cache_dir) / "encoders",
        device=cfg.encoder_device,
    )


# Decoded pixels per (recipe, image path), kept for the life of the process: a comparison grid runs many
# fine-tuning cells over the same images, and decoding + resizing dominates their set-up otherwise.
# About S*S*3 bytes per image (150 kB at 224 px: ~0.5 GB for the 3,264 brain-MRI images).
_PIXEL_CACHE: dict[tuple[str, str], np.ndarray] = {}


def load_pixels(
    image_set: ImageSet,
    image_ids: list[str],
    preprocessing: Preprocessing,
    progress: bool = True,
    desc: str = "decoding",
) -> torch.Tensor:
    """The preprocessed uint8 pixels [N, S, S, 3] of the given images, for methods that train the image
    encoder. Nothing augments, so the geometry is computed once; normalisation runs at every step."""
    by_id = image_set.by_id()
    recipe = json.dumps(preprocessing.describe(), sort_keys=True)
    paths = [by_id[i].path for i in image_ids]
    missing = [p for p in dict.fromkeys(paths) if (recipe, p) not in _PIXEL_CACHE]
    if missing:
        with ThreadPoolExecutor(min(8, (os.cpu_count() or 2) * 2)) as pool:
            arrays = pool.map(lambda p: load_preprocessed(p, preprocessing), missing)
            for p, a in tqdm(
                zip(missing, arrays, strict=True),
                total=len(missing),
                desc=desc,
                unit="img",
                disable=not progress,
                leave=False,
            ):
                _PIXEL_CACHE[(recipe, p)] = a
    if not paths:
        return torch.zeros(0, preprocessing.size, preprocessing.size, 3, dtype=torch.uint8)
    return torch.from_numpy(np.stack([_PIXEL_CACHE[(recipe, p)] for p in paths]))


def partition_for(cfg: TrainConfig, image_set: ImageSet) -> Partition:
    """The configured partition of the image set (the pipeline's prepare task calls this too). With
    --partition natural the data names the sites: a --sites that differs is refused, as --alpha is where the
    partition ignores it (config.json, the run manifest and the MLflow parameters would record it)."""
    partition = make_partition(
        image_set,
        cfg.partition,
        cfg.sites if cfg.partition != "natural" else None,
        cfg.alpha,
        cfg.seed,
        cfg.split_ratio,
        cfg.reference_fraction,
    )
    if cfg.partition == "natural" and cfg.sites is not None and cfg.sites != len(partition.site_names):
        names = partition.site_names
        raise ConfigError(
            f"--sites {cfg.sites}, but --partition natural trains the {len(names)} site(s) the data names "
            f"({', '.join(names)}): pass --sites {len(names)}, or another --partition"
        )
    if cfg.partition == "natural" and cfg.sends_updates():  # TrainConfig.validate could not know the count
        from .federation.robust import check_robust_sites

        check_robust_sites(cfg.aggregator, len(partition.site_names), "--partition natural")
    return partition


def checked_partition(cfg: TrainConfig) -> tuple[ImageSet, Partition]:
    """The run's image set and its partition; for published data checked against the partition its holders'
    prefixes hold the images of."""
    image_set = load_image_set(cfg)
    partition = partition_for(cfg, image_set)
    if is_remote(cfg.data):
        remote_source(cfg.data).check_partition(cfg, partition)
    return image_set, partition


def prepare(
    cfg: TrainConfig,
    progress: bool = True,
    holders: list[str] | None = None,
    backbone: Backbone | None = None,
) -> Prepared:
    """Everything a run needs before its first round. `holders` (default: every site and the server) limits
    which holders' images are read and encoded: a party prepares only its own. `backbone`: cfg.backbone, when
    the caller has loaded it already."""
    cfg.validate()
    image_set, partition = checked_partition(cfg)
    backbone = backbone or load_backbone(cfg.backbone, cache_dir=cfg.cache_dir)
    prep = make_preprocessing(resolved_preprocessing(cfg), backbone)
    t0 = time.perf_counter()
    stores, pixels = {}, {}
    for h in holders or [*partition.site_names, SERVER]:
        images = holder_images(cfg, image_set, partition, h)
        stores[h] = extract_features(images, holder_image_ids(partition, h), backbone, prep, cfg, h, progress)
        if METHODS[cfg.method].needs_images:
            # The store still gives the text features and provenance; training reads these pixels.
            pixels[h] = load_pixels(images, stores[h].image_ids, prep, progress, f"decoding {h}")
    sites = [h for h in stores if h != SERVER]
    if sites == partition.site_names:  # every site's store is here: no class may have lost all its images
        check_training_classes({s: stores[s] for s in sites}, {s: partition.sites[s]["train"] for s in sites})
    return Prepared(
        cfg, image_set, partition, backbone, prep, stores, time.perf_counter() - t0, pixels or None
    )


def _rows(
    store: FeatureStore, ids: list[str], pixels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.from_numpy(store.rows(ids))
    return (store.features if pixels is None else pixels)[r], store.labels[r]


def site_data(
    partition: Partition,
    site: str,
    store: FeatureStore,
    reference_x: torch.Tensor | None,
    pixels: torch.Tensor | None = None,
) -> SiteData:
    """A site's train/val/test: cached features, or with `pixels` (rows as in `store`) the images."""
    return split_data(site, partition.sites[site], store, reference_x, pixels)


def split_data(
    site: str,
    split: dict[str, list[str]],
    store: FeatureStore,
    reference_x: torch.Tensor | None,
    pixels: torch.Tensor | None = None,
) -> SiteData:
    """SiteData from a site's own split lists ({"train"|"val"|"test": [image ids]}) and its store."""
    (trx, tr_y), (vx, vy), (tex, tey) = (_rows(store, split[s], pixels) for s in ("train", "val", "test"))
    return SiteData(site, trx, tr_y, vx, vy, tex, tey, reference_x)


def pooled_data(datas: list[SiteData], name: str = "pooled") -> SiteData:
    """Every site's data in one holder: the centralized reference (an upper bound no hospital can run)."""
    cat = lambda attr: torch.cat([getattr(d, attr) for d in datas])  # noqa: E731
    parts = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    return SiteData(name, *(cat(a) for a in parts), datas[0].reference_x)


def reference_features(partition: Partition, server_store: FeatureStore, transductive: bool) -> torch.Tensor:
    """FACMIC's unlabelled target set: held-out training images, or the global test set itself."""
    ids = partition.global_test if transductive else partition.reference
    return _rows(server_store, ids)[0]


def privacy_settings(cfg: TrainConfig):
    """The run's differential-privacy settings (fedmedclip.privacy), None for a run without DP."""
    from .privacy import PrivacySettings

    settings = PrivacySettings.from_config(cfg.privacy)
    return settings if settings.enabled else None


def build_method(
    cfg: TrainConfig,
    text_features: torch.Tensor,
    backbone: Backbone | None = None,
    preprocessing: Preprocessing | None = None,
    class_names: list[str] | None = None,
) -> Method:
    """The configured method. Methods that fine-tune CLIP (`needs_images`) also need the backbone, the
    preprocessing recipe and the class names (for their prompts)."""
    ctx = MethodContext(
        feature_dim=text_features.shape[1],
        num_classes=text_features.shape[0],
        text_features=text_features,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        options=dict(cfg.method_options),
        privacy=privacy_settings(cfg),
        rounds=cfg.rounds,
    )
    if METHODS[cfg.method].needs_images:
        if backbone is None or preprocessing is None or class_names is None:
            raise ConfigError(
                f"{cfg.method} fine-tunes CLIP: build_method needs backbone, preprocessing, class_names"
            )
        ctx.backbone, ctx.preprocessing = backbone, preprocessing
        ctx.prompts = [cfg.prompt_template.format(c) for c in class_names]
    return METHODS[cfg.method](ctx)

"""The feature store: every image is encoded once by the frozen CLIP, then training reads features.

Exactness is the point: a store records the provenance of its features (backbone identity and
weights hash, preprocessing, prompt template, class names, hash of the image list and contents),
is reused only when that provenance matches, and refuses a mismatch rather than mixing inputs. provenance.json
also records the sha256 of the store's other files, and a store is reused only when those files, its digest,
its labels and its image ids are what it claims: one edited or damaged on disk is refused, never trained on.
Stores are per holder (each site encodes only its own images), which is also what the pipeline's
per-site extraction does: CPU encodings differ by ~1e-6 with batch composition, so both paths
encode the same batches and give identical features.

The image encoder runs on an engine of fedmedclip.encoders (PyTorch, or the same graph through ONNX Runtime):
every engine there is float32 and checked to 1e-4 relative of PyTorch, so the digest does not name it and a
store built by one is reused by another; `provenance["encoder"]` (outside the digest) records which built it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from tqdm.auto import tqdm

from .backbone import Backbone
from .data import ImageRecord, file_sha256, load_preprocessed
from .digests import (  # canonical_digest: also imported from here by partition, engine and pipelines
    canonical_digest,
    canonical_json,
    is_sha256,
    sha256_bytes,
    sha256_file,
)
from .encoders import open_image_encoder
from .errors import DataError, ImageDecodeError, ProvenanceMismatch, shown, shown_list
from .jsonfiles import read_json_object
from .paths import put_folder_in_place
from .preprocess import Preprocessing

log = logging.getLogger(__name__)

# 2: images decoded with the JPEG scan and PNG row checks (fedmedclip/data.py, load_image); a store of format 1
# may hold the features of a truncated image those checks now refuse, so it is not reused.
# 3: images of a mode with no faithful 8-bit conversion (a float TIFF, decoded all black), of several frames, or
# over the file size limit are refused (fedmedclip.preprocess.opened_image_problem, data.MAX_IMAGE_BYTES): a
# store of format 2 may hold their features.
# 4: provenance.json records the sha256 of features.safetensors and index.json (FILES_SHA256), checked at every
# load. A store of format 3 may have been edited (labels, ids, features) without a trace, and one of format 4
# without the hashes is refused, so that deleting them cannot turn the check off. `load` still reads a format-3
# store (checking what it can: shapes, finiteness, labels), but no run reuses one: its digest is not the format-4
# digest a run asks for, so the images are encoded once more, into a folder of their own, and the old one is
# left as it is.
STORE_FORMAT = 4
HASHED_SINCE_FORMAT = 4
DEFAULT_PROMPT = "a picture of a {}"
# provenance.json's {file name: sha256} of the store's other files; written by `save`, left out of
# FeatureStore.provenance (a site's report carries that, and its declaration takes no such key).
FILES_SHA256 = "files_sha256"
HASHED_FILES = ("features.safetensors", "index.json")
# Provenance entries that describe how a store was built or written, not what it holds: outside the digest.
UNDIGESTED = ("digest", "encoder", FILES_SHA256)


def image_list_sha256(records: list[ImageRecord], workers: int) -> str:
    """Hash of (image id, label, content hash) in order: a renamed, relabelled or edited image changes it."""
    with ThreadPoolExecutor(workers) as pool:
        contents = list(pool.map(file_sha256, [r.path for r in records]))
    h = hashlib.sha256()
    for r, c in zip(records, contents, strict=True):
        h.update(f"{r.image_id}\t{r.label}\t{c}\n".encode())
    return h.hexdigest()


def provenance_for(
    records: list[ImageRecord],
    class_names: list[str],
    backbone: Backbone,
    preprocessing: Preprocessing,
    prompt_template: str,
    workers: int,
) -> dict:
    prov = {
        "format": STORE_FORMAT,
        "backbone": backbone.identity(),
        "preprocessing": preprocessing.describe(),
        "prompt_template": prompt_template,
        "class_names": list(class_names),
        "n_images": len(records),
        "image_list_sha256": image_list_sha256(records, workers),
    }
    prov["digest"] = canonical_digest(prov)
    return prov


@dataclass
class FeatureStore:
    features: torch.Tensor  # float32 [N, D], raw (unnormalised) CLIP image embeddings
    labels: torch.Tensor  # int64 [N], indices into class_names
    image_ids: list[str]
    class_names: list[str]
    text_features: torch.Tensor  # float32 [C, D], raw prompt embeddings
    provenance: dict
    skipped: list[str] = field(default_factory=list)
    path: Path | None = None

    def rows(self, image_ids: list[str]) -> np.ndarray:
        """Row indices of the given image ids (skipped images are left out). An id the store neither holds nor
        skipped is a DataError: dropped silently, a training image went missing from the run unnoticed."""
        where = {iid: i for i, iid in enumerate(self.image_ids)}
        skipped = set(self.skipped)
        for i in image_ids:
            if i not in where and i not in skipped:
                problem = f"it holds no image {shown(i)}, neither encoded nor skipped as unreadable"
                if self.path is None:
                    raise DataError(f"feature store: {problem}")
                raise _damaged(self.path, ValueError(problem))
        return np.array([where[i] for i in image_ids if i in where], dtype=np.int64)

    def save(self, directory: Path) -> None:
        """Write atomically: a half-written store must never look valid. provenance.json records the sha256 of
        the other files (FILES_SHA256), which `load` checks."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".store-", dir=directory.parent))
        files = {
            "features.safetensors": save_tensors(
                {"features": self.features, "labels": self.labels, "text_features": self.text_features}
            ),
            "index.json": json.dumps(
                {"image_ids": self.image_ids, "class_names": self.class_names, "skipped": self.skipped}
            ).encode(),
        }
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        hashes = {name: sha256_bytes(data) for name, data in files.items()}
        written = {**self.provenance, FILES_SHA256: hashes}
        (tmp / "provenance.json").write_text(json.dumps(written, indent=2))
        # Stores are keyed by what they hold: one a concurrent writer put there first is this one.
        put_folder_in_place(
            tmp, directory, lambda: _complete_store(directory, self.provenance.get("digest", ""))
        )
        self.path = directory

    @classmethod
    def load(cls, directory: Path) -> FeatureStore:
        """The store `save` wrote at `directory`, or a DataError naming it and what is wrong: a cache damaged on
        disk stopped every run that reused it with a traceback, and one edited on disk (labels, image ids,
        features) trained silently. Its files are checked against the sha256 provenance.json records, its
        labels against its classes; `build_feature_store` checks the provenance's digest and that the store
        holds the images asked for."""
        try:
            provenance = _stored_provenance(directory)
            _check_files(directory, provenance.pop(FILES_SHA256, None), provenance.get("format"))
            tensors = load_file(str(directory / "features.safetensors"))
            index = read_json_object(directory / "index.json")
            store = cls(
                tensors["features"],
                tensors["labels"],
                [str(i) for i in index["image_ids"]],
                [str(c) for c in index["class_names"]],
                tensors["text_features"],
                provenance,
                [str(i) for i in index.get("skipped", [])],
                directory,
            )
            rows = len(store.image_ids)
            if store.features.shape[:1] != (rows,) or store.labels.shape != (rows,):
                raise ValueError(f"{rows} image ids for {tuple(store.features.shape)} features")
            if not (torch.isfinite(store.features).all() and torch.isfinite(store.text_features).all()):
                raise ValueError("non-finite features")
            _check_labels(store)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise _damaged(directory, exc) from None
        return store


def _check_files(directory: Path, recorded: object, store_format: object) -> None:
    """ValueError unless each HASHED_FILES file hashes as provenance.json records (`recorded`). Only a store
    written before the hashes were (an int format below HASHED_SINCE_FORMAT) may record none."""
    if recorded is None and isinstance(store_format, int) and store_format < HASHED_SINCE_FORMAT:
        return
    if not (
        isinstance(recorded, dict)
        and set(recorded) == set(HASHED_FILES)
        and all(isinstance(h, str) and is_sha256(h) for h in recorded.values())
    ):
        raise ValueError(
            f"provenance.json's {FILES_SHA256} is not {{file name: sha256}} of {', '.join(HASHED_FILES)}"
        )
    for name in HASHED_FILES:
        if not (directory / name).is_file():  # a link to /dev/zero, a FIFO: hashing it would never end
            raise ValueError(f"{name} is not a regular file")
        if sha256_file(directory / name) != recorded[name]:
            raise ValueError(f"{name} is not the file the store was written with (its sha256 differs)")


def _check_labels(store: FeatureStore) -> None:
    """ValueError for a label that names no class of the store (a class count of a training image fails
    later with a traceback, a prediction indexes past the class names)."""
    if store.labels.dtype != torch.int64:
        raise ValueError(f"labels of type {store.labels.dtype}, not int64")
    classes = len(store.class_names)
    outside = ((store.labels < 0) | (store.labels >= classes)).nonzero()
    if len(outside):
        row = int(outside[0])
        raise ValueError(
            f"label {int(store.labels[row])} of image {shown(store.image_ids[row])} is outside the range of the "
            f"{classes} classes (0 to {classes - 1})"
        )
    if store.text_features.shape != (classes, *store.features.shape[1:]):
        raise ValueError(
            f"{tuple(store.text_features.shape)} text features for {classes} classes of "
            f"{tuple(store.features.shape[1:])} features"
        )


def _holds_problem(store: FeatureStore, records: list[ImageRecord], class_names: list[str]) -> str | None:
    """Why `store` does not hold the features of `records` as `build_feature_store` would encode them (None when
    it does): its image ids, in order, are the records' less the skipped ones, and each label is the record's.
    A store reused by its provenance is checked so: an id renamed in index.json dropped its training image, ids
    swapped or labels edited trained on other labels, without a word."""
    if store.class_names != list(class_names):
        return f"its class names {shown(store.class_names)} are not the data's {shown(list(class_names))}"
    skipped = set(store.skipped)
    ids = [r.image_id for r in records]
    kept = [r for r in records if r.image_id not in skipped]
    if not skipped <= set(ids) or len(skipped) != len(store.skipped):
        return "the images it records as skipped are not among the data's"
    if [r.image_id for r in kept] != store.image_ids:
        if len(kept) != len(store.image_ids):
            return f"it holds {len(store.image_ids)} images, the data {len(kept)} readable ones"
        row = next(i for i, r in enumerate(kept) if r.image_id != store.image_ids[i])
        return f"its image {row} is {shown(store.image_ids[row])}, the data's is {shown(kept[row].image_id)}"
    label_index = {c: i for i, c in enumerate(class_names)}
    for rec, stored in zip(kept, store.labels.tolist(), strict=True):
        if label_index.get(rec.label) != stored:
            return f"it labels image {shown(rec.image_id)} {shown(class_names[stored])}, the data {shown(rec.label)}"
    return None


def _damaged(directory: Path, exc: Exception) -> DataError:
    return DataError(
        f"feature store {str(directory)!r} is damaged ({type(exc).__name__}: {exc}): delete it, and the next run "
        "encodes the images again"
    )


def _stored_provenance(directory: Path) -> dict:
    """A store's provenance.json (an object with its digest), else ValueError."""
    prov = read_json_object(directory / "provenance.json")
    if not isinstance(prov.get("digest"), str):
        raise ValueError("provenance.json has no digest")
    return prov


def _check_digest(prov: dict) -> None:
    """ValueError unless `prov`'s digest is that of its other entries, as `provenance_for` computed it: an entry
    edited (another backbone's name) was trusted, and recorded in the run's provenance, while the digest alone
    was compared."""
    if canonical_digest({k: v for k, v in prov.items() if k not in UNDIGESTED}) != prov["digest"]:
        raise ValueError("provenance.json does not hold the inputs its digest names (it was edited)")


def _differences(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    if not prefix:  # compared as JSON: a tuple requested and the list it was stored as are one value
        stored, wanted = json.loads(canonical_json(stored)), json.loads(canonical_json(wanted))
    out = []
    for key in sorted(set(stored) | set(wanted)):
        if not prefix and key in UNDIGESTED:
            continue
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: stored {str(a)[:60]!r} vs requested {str(b)[:60]!r}")
    return out


def _decode(record: ImageRecord, preprocessing: Preprocessing):
    try:
        return load_preprocessed(record.path, preprocessing)
    except ImageDecodeError as exc:
        return exc


def cached_store(cache_dir: str | Path, digest: str) -> Path:
    """Where a run's cache (`--cache-dir`) keeps the feature store of provenance `digest`: any run, task or
    party encoding the same inputs finds it there."""
    return Path(cache_dir) / "features" / digest[:24]


def build_feature_store(
    records: list[ImageRecord],
    class_names: list[str],
    backbone: Backbone,
    preprocessing: Preprocessing,
    directory: str | Path | None = None,
    prompt_template: str = DEFAULT_PROMPT,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    desc: str = "encoding",
    engine: str = "auto",
    encoder_cache: str | Path | None = None,
    device: str = "auto",
) -> FeatureStore:
    """Load the store at `directory` if its provenance matches, else encode the images into it.
    A store with different provenance is never overwritten: that is an error. With a run's `cache_dir`
    instead of `directory`, the store lives where `cached_store` says, so reuse is automatic.
    `engine` runs the image encoder (fedmedclip.encoders.ENGINES) on `device` (fedmedclip.encoders.DEVICES);
    `encoder_cache` keeps its exported graph."""
    if not records:
        raise DataError(f"no images to encode for {desc}")
    if (directory is None) == (cache_dir is None):
        raise ValueError("give exactly one of directory or cache_dir")
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    wanted = provenance_for(records, class_names, backbone, preprocessing, prompt_template, workers)
    directory = Path(directory) if directory is not None else cached_store(cache_dir, wanted["digest"])
    if (directory / "provenance.json").exists():
        try:
            stored = _stored_provenance(directory)
            _check_digest(stored)
        except (OSError, ValueError) as exc:
            raise _damaged(directory, exc) from None
        if stored.get("digest") == wanted["digest"]:
            log.info("reusing feature store %s", directory)
            store = FeatureStore.load(directory)
            problem = _holds_problem(store, records, class_names)
            if problem:
                raise _damaged(directory, ValueError(f"{problem}: it was edited"))
            return store
        raise ProvenanceMismatch(
            f"feature store {str(directory)!r} was built from different inputs:\n  "
            + "\n  ".join(_differences(stored, wanted))
            + "\nIt is left untouched: point at another directory, or delete it to rebuild."
        )
    if "{}" not in prompt_template:
        raise DataError(f"prompt template {prompt_template!r} must contain '{{}}' for the class name")

    encoder = open_image_encoder(backbone, preprocessing, engine, encoder_cache, device)
    label_index = {c: i for i, c in enumerate(class_names)}
    feats, labels, ids, skipped = [], [], [], []
    batches = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    bar = tqdm(total=len(records), desc=desc, unit="img", disable=not progress, leave=False)
    with ThreadPoolExecutor(workers) as pool:
        # Decode the next batch while the current one is encoded.
        pending = pool.map(lambda r: _decode(r, preprocessing), batches[0]) if batches else None
        for b, batch in enumerate(batches):
            decoded = list(pending)
            if b + 1 < len(batches):
                pending = pool.map(lambda r: _decode(r, preprocessing), batches[b + 1])
            arrays, kept = [], []
            for rec, arr in zip(batch, decoded, strict=True):
                if isinstance(arr, ImageDecodeError):
                    if not skip_bad:
                        raise arr
                    skipped.append(rec.image_id)
                    # %r: a file name may hold ESC or CR, which reached the terminal raw
                    log.warning("skipping unreadable image %r (%s)", rec.path, arr.reason)
                    continue
                arrays.append(arr)
                kept.append(rec)
            if arrays:
                feats.append(encoder.encode(np.stack(arrays)))
                labels += [label_index[r.label] for r in kept]
                ids += [r.image_id for r in kept]
            bar.update(len(batch))
    bar.close()
    if skipped:
        log.warning("%s: skipped %d unreadable image(s) of %d", desc, len(skipped), len(records))
    if not feats:
        raise DataError(f"{desc}: every image was unreadable")
    store = FeatureStore(
        features=torch.cat(feats).contiguous(),
        labels=torch.tensor(labels, dtype=torch.int64),
        image_ids=ids,
        class_names=list(class_names),
        text_features=backbone.encode_text([prompt_template.format(c) for c in class_names]).contiguous(),
        provenance={**wanted, "encoder": encoder.describe()},
        skipped=skipped,
    )
    if directory.exists() and not _complete_store(directory, wanted["digest"]):
        # An incomplete leftover without provenance.json (a complete one is another process's store of the same
        # images, written meanwhile: `save` keeps it).
        shutil.rmtree(directory)
    store.save(directory)
    return store


def _complete_store(directory: Path, digest: str) -> bool:
    try:
        return _stored_provenance(directory)["digest"] == digest
    except (OSError, ValueError):
        return False


def check_training_classes(stores: dict[str, FeatureStore], train_ids: dict[str, list[str]]) -> None:
    """Refuse a class that has no training image left at any site once the images are encoded: with
    `skip_bad` (--skip-bad-images) every image of a class can be skipped as unreadable, and the run would
    then train without the class while still predicting it. `stores` maps each site to its store, `train_ids`
    each site to its training image ids (the partition's `sites[s]["train"]`). Call it once every site's store
    exists, before training: the engine's preparation, or the pipeline's step after the sites' extraction."""
    class_names = next(iter(stores.values())).class_names
    counts = np.zeros(len(class_names), dtype=np.int64)
    for site, ids in train_ids.items():
        store = stores[site]
        rows = torch.from_numpy(store.rows(ids))
        counts += np.bincount(store.labels[rows].numpy(), minlength=len(class_names))
    empty = [c for c, n in zip(class_names, counts.tolist(), strict=True) if n == 0]
    if empty:
        skipped = sorted({i for site, ids in train_ids.items() for i in set(ids) & set(stores[site].skipped)})
        reason = (
            f"--skip-bad-images skipped {len(skipped)} unreadable training image(s): {shown_list(skipped)}"
            if skipped
            else "the partition put none of its images in a site's training split"
        )
        raise DataError(
            f"no training image left at any site for class(es) {', '.join(empty)} ({reason}); the run would "
            "never learn the class yet still predict it. Fix or replace the unreadable files, or remove the class."
        )

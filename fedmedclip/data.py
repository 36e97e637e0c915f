"""Image sources: an image-folder tree, a CSV manifest, and safe image decoding.

Class names are one global sorted list for every site (per-site folder listings would shift label
indices whenever a site lacks a class)."""

from __future__ import annotations

import codecs
import csv
import io
import logging
import os
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .digests import sha256_file
from .errors import DataError, ImageDecodeError, class_names_problem, shown, shown_list
from .jsonfiles import read_bounded
from .paths import check_file_within
from .preprocess import (
    MAX_IMAGE_PIXELS,  # noqa: F401  (imported from here too)
    Preprocessing,
    bomb_pixels,
    decoded_data_problem,
    opened_image_problem,
    parts_problem,
    pixel_limit_problem,
    to_rgb8,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
# The largest image file read: it is read whole before decoding. Far above any scan within the pixel limit
# (an 8,192 x 8,192 16-bit RGB TIFF, uncompressed, is 384 MiB; such a scan is stored compressed), far below a
# file that would take the memory of every decoding thread at once.
MAX_IMAGE_BYTES = 256 * 1024 * 1024

_SPLIT_ALIASES = {"train": "train", "training": "train", "test": "test", "testing": "test"}


@dataclass(frozen=True)
class ImageRecord:
    image_id: str  # path relative to the source root: stable across machines
    path: str  # absolute path
    label: str
    split: str  # "train" (the federated pool) or "test" (the global test set)
    site: str | None = None


@dataclass
class ImageSet:
    class_names: list[str]
    records: list[ImageRecord]
    source: str
    skipped: list[str] = field(default_factory=list)
    duplicates: dict | None = None  # what `deduplicate` found and did (None: not checked)

    def labels(self, records: list[ImageRecord] | None = None) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.class_names)}
        return np.array([index[r.label] for r in (records or self.records)], dtype=np.int64)

    def by_id(self) -> dict[str, ImageRecord]:
        return {r.image_id: r for r in self.records}

    def split(self, name: str) -> list[ImageRecord]:
        return [r for r in self.records if r.split == name]


# Pillow reports some damage only as a Python warning; warnings.catch_warnings swaps process-wide state, so one
# decode at a time holds it (decodes run in threads) and cannot restore another's filters.
_DECODE_LOCK = threading.Lock()
_PIL_DIR = os.path.dirname(Image.__file__) + os.sep


def load_image(path: str | Path, preprocessing: Preprocessing | None = None) -> Image.Image:
    """Open and fully decode an image as RGB, or raise ImageDecodeError naming the file.

    Strict on purpose, so that nothing damaged is trained on, and with the checks the server makes
    (fedmedclip.preprocess: one function each): a file over `MAX_IMAGE_BYTES`, a PNG of too many chunks, an
    image over `MAX_IMAGE_PIXELS` (in one wording, whether Pillow's own check or ours finds it), a mode with no
    faithful 8-bit RGB conversion (32-bit float) or more than one frame (`opened_image_problem`), and, given
    the `preprocessing` it is for, an image whose resize would be over the pixel limit (a thin strip), are
    refused from the header, before any pixel is decoded. Truncated data is an error whatever
    `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` says, so is any warning Pillow raises while it parses and decodes the
    file (corrupt metadata, a malformed file), and so are corrupt JPEG scan data and missing PNG rows, which
    Pillow decodes without an error (`decoded_data_problem`). The pixels returned are Pillow's."""
    path = str(path)
    try:
        data = _image_bytes(path)
        if parts := parts_problem(data):
            raise ImageDecodeError(path, " ".join(parts))
        with _DECODE_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Pillow's bomb check speaks first, in numbers of its own limit: above it a warning (ignored here:
            # our own check below names the size), above twice it an error (worded with ours, below).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
            try:
                img = Image.open(io.BytesIO(data))
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageDecodeError(
                        path, pixel_limit_problem(f"{w}x{h} = {w * h:,} pixels", MAX_IMAGE_PIXELS)
                    )
                if problem := opened_image_problem(img):
                    raise ImageDecodeError(path, problem)
                if preprocessing and (problem := preprocessing.resize_problem(img.size, MAX_IMAGE_PIXELS)):
                    raise ImageDecodeError(
                        path, pixel_limit_problem(problem, MAX_IMAGE_PIXELS) + "; crop it closer to a square"
                    )
                # A frame or tile bigger than the image itself (a malformed file) is refused while decoding.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
        _refuse_decoder_warnings(path, caught)
        if problem := decoded_data_problem(data, img):
            raise ImageDecodeError(path, problem)
        return to_rgb8(img)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            path, "cannot identify image file (not an image format Pillow reads)"
        ) from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        pixels = bomb_pixels(exc)
        what = f"{pixels:,} pixels" if pixels else "its size"
        raise ImageDecodeError(path, pixel_limit_problem(what, MAX_IMAGE_PIXELS)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(path, f"{type(exc).__name__}: {exc}") from None


def load_preprocessed(path: str | Path, preprocessing: Preprocessing) -> np.ndarray:
    """`preprocessing.to_uint8` of `load_image(path, preprocessing)`: the pixels an encoder takes, or an
    ImageDecodeError naming the file (one --skip-bad-images skips), never a bare ValueError or a resize that
    fills the memory."""
    return preprocessing.to_uint8(load_image(path, preprocessing))


def _image_bytes(path: str) -> bytes:
    """The file's bytes, read as every other file another party wrote is (jsonfiles.read_bounded: a regular
    file, never past MAX_IMAGE_BYTES): a 5 GB file was read whole, to a MemoryError traceback."""
    try:
        return read_bounded(path, MAX_IMAGE_BYTES)
    except ValueError as exc:
        raise ImageDecodeError(path, f"the file: {exc}") from None


def _refuse_decoder_warnings(path: str, caught: list[warnings.WarningMessage]) -> None:
    """Pillow's own warnings about the file become the error; anything else recorded meanwhile came from
    another thread's code and is passed on as if never caught."""
    damage = []
    for w in caught:
        if w.filename.startswith(_PIL_DIR) and not issubclass(w.category, DeprecationWarning):
            damage.append(w)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if damage:
        raise ImageDecodeError(path, f"decoder warning: {damage[0].category.__name__}: {damage[0].message}")


def _listed(value: str) -> str:
    """A file name or label in a list of them: as it is when printable and short, else as `shown` writes it
    (escaped, cut): a name holding ESC drove the terminal of whoever read the log, a 100,000-character label
    made a 300 KB line."""
    return value if value.isprintable() and len(value) <= 60 else shown(value)


def _check_classes(class_names: list[str], records: list[ImageRecord], source: str) -> None:
    if problem := class_names_problem(class_names):
        raise DataError(f"{source}: {problem}: rename its folder or label")
    present = {r.label for r in records}
    empty = [c for c in class_names if c not in present]
    if empty:
        raise DataError(f"{source}: class(es) with no images: {', '.join(empty)}")
    if not records:
        raise DataError(f"{source}: no images found")


# A class needs this many training images unless the class list is given explicitly. A label typo makes a
# class of one or two images; a real class this small cannot be learnt or measured across sites anyway (3 sites
# with 8:1:1 splits leave each site's validation and test split well under one of its images on average).
# The smallest class of the data sets we target has ~80 (ISIC 9-class); the synthetic sets have >= 24.
DEFAULT_MIN_CLASS_IMAGES = 10


def check_class_support(image_set: ImageSet, min_images: int = DEFAULT_MIN_CLASS_IMAGES) -> None:
    """Refuse a class list inferred from the data that looks like a labelling mistake: a class with fewer than
    `min_images` training images, or (when the source has a test split) present in only one of the training
    pool and the global test set. A typo in one row (`glioma_tumour` for `glioma_tumor`) otherwise silently
    becomes a class of its own. The error lists every class with its counts. Not for an explicit class list
    (`classes=` of the readers): that is the user's word, and labels outside it are refused already."""
    train = Counter(r.label for r in image_set.records if r.split == "train")
    test = Counter(r.label for r in image_set.records if r.split == "test")
    problems = []
    for c in image_set.class_names:
        if train[c] < min_images:
            problems.append(f"{shown(c)} has {train[c]} training image(s), fewer than {min_images}")
        if test and (train[c] == 0) != (test[c] == 0):
            where = "training pool" if train[c] else "global test set"
            problems.append(f"{shown(c)} is only in the {where}")
    if problems:
        counts = ", ".join(f"{_listed(c)} {train[c]}/{test[c]}" for c in image_set.class_names)
        raise DataError(
            f"{image_set.source}: suspicious classes: {'; '.join(problems)}. Images per class "
            f"(training/test): {counts}. A typo in a label makes a new class: fix the label, or if these "
            "classes are real, pass the class list explicitly (`classes`, --classes) or lower "
            "`min_class_images` (--min-class-images)."
        )


def from_image_folder(
    root: str | Path, classes: list[str] | None = None, allow_outside_root: bool = False
) -> ImageSet:
    """`<root>/<split>/<class>/*.jpg` with split folders Training/Testing (or train/test); the images of a
    class are every image file under its folder, in sub-folders too. Hidden files and folders (a name starting
    with ".": .thumbnails/, macOS's ._scan.jpg and .DS_Store) are skipped: they are a tool's, not the data's."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder or a .csv manifest" if root.exists() else "does not exist"
        raise DataError(f"data directory {str(root)!r} {what}")
    split_dirs: dict[str, Path] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        split = _SPLIT_ALIASES.get(d.name.lower())
        # Training/ and train/ (a case-sensitive file system): one was dropped without a word.
        if split and split in split_dirs:
            raise DataError(
                f"{root}: both {shown(split_dirs[split].name + '/')} and {shown(d.name + '/')} are its {split} "
                "split: merge them into one folder"
            )
        if split:
            split_dirs[split] = d
    if "train" not in split_dirs:
        found_names = shown_list(sorted(p.name for p in root.iterdir())) or "nothing"
        raise DataError(
            f"{root}: expected a Training/ (or train/) folder of class folders, found: {found_names}"
        )
    found: set[str] = set()
    records = []
    for split, d in split_dirs.items():
        for class_dir in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(
                f
                for f in class_dir.rglob("*")
                if f.is_file()
                and f.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in f.relative_to(class_dir).parts)
            )
            if not files:
                raise DataError(
                    f"class folder {str(class_dir)!r} contains no images (hidden files and folders, whose names "
                    'start with ".", are skipped)'
                )
            found.add(class_dir.name)
            for f in files:
                if not allow_outside_root:  # a symlink out of the data folder is not this data set's image
                    check_file_within(
                        f,
                        root,
                        f"image {shown(f.relative_to(root).as_posix())} of {root}",
                        "pass --allow-outside-root",
                    )
                records.append(
                    ImageRecord(f.relative_to(root).as_posix(), str(f.resolve()), class_dir.name, split)
                )
    class_names = _resolve_classes(sorted(found), classes, str(root))
    _check_classes(class_names, [r for r in records if r.split == "train"], f"{root} (training split)")
    return ImageSet(class_names, records, str(root.resolve()))


def _resolve_classes(found: list[str], classes: list[str] | None, source: str) -> list[str]:
    if classes is None:
        return found
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(f"{source}: unknown label(s) {shown_list(unknown)}; expected one of {classes}")
    return sorted(classes)


def from_csv(
    path: str | Path, classes: list[str] | None = None, allow_outside_root: bool = False
) -> ImageSet:
    """A CSV manifest with columns `path,label[,site][,split]`; relative paths are relative to the CSV.
    A path that resolves outside the CSV's folder (`..`, an absolute path, a symlink out) is refused unless
    `allow_outside_root`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {str(path)!r} does not exist")
    reader = csv.DictReader(io.StringIO(_manifest_text(path), newline=""))
    records = []
    try:
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(sorted(missing))}; need path,label[,site][,split]"
            )
        seen: dict[Path, int] = {}
        for row in reader:
            # The csv reader's line count is the row's last line: exact for a row of one line, wherever blank
            # lines were skipped (DictReader's own line_num lags a row behind, and did on a row it refused).
            line = reader.reader.line_num
            records.append(_manifest_record(path, line, row, seen, classes, allow_outside_root))
    except csv.Error as exc:  # Python 3.10's csv refuses a NUL byte; a field beyond csv's size limit
        raise DataError(f"{path}:{reader.reader.line_num}: not a readable CSV row: {exc}") from None
    class_names = _resolve_classes(sorted({r.label for r in records}), classes, str(path))
    _check_classes(class_names, [r for r in records if r.split == "train"], f"{path} (training split)")
    return ImageSet(class_names, records, str(path.resolve()))


def _manifest_text(path: Path) -> str:
    """The manifest's text: UTF-8 (a byte-order mark is dropped), else a DataError naming the line."""
    data = path.read_bytes()
    data = data[len(codecs.BOM_UTF8) :] if data.startswith(codecs.BOM_UTF8) else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}): save the manifest as UTF-8"
        ) from None


def _manifest_record(
    path: Path,
    line: int,
    row: dict,
    seen: dict[Path, int],
    classes: list[str] | None,
    allow_outside_root: bool,
) -> ImageRecord:
    """One row of a CSV manifest (`line`: its line) as an ImageRecord, or a DataError naming the line."""
    base = path.parent
    rel = (row.get("path") or "").strip()
    label = (row.get("label") or "").strip()
    if not rel or not label:
        raise DataError(f"{path}:{line}: empty path or label")
    if "\0" in rel:  # no file system path holds one: os calls raised ValueError("embedded null byte")
        raise DataError(f"{path}:{line}: image path {shown(rel)} contains a NUL byte")
    try:
        file = (base / rel).resolve()
    except RuntimeError:  # Python 3.10-3.12's resolve on a loop of symbolic links
        raise DataError(f"{path}:{line}: image path {shown(rel)} is a loop of symbolic links") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}:{line}: image path {shown(rel)}: {_os_reason(exc)}") from None
    # The same image twice (e.g. in train and test) would leak across the splits.
    if file in seen:
        raise DataError(f"{path}:{line}: image {shown(rel)} is already listed on line {seen[file]}")
    seen[file] = line
    if classes is not None and label not in classes:
        raise DataError(f"{path}:{line}: unknown label {shown(label)}; expected one of {sorted(classes)}")
    split_raw = (row.get("split") or "").strip().lower() or "train"  # empty or blank: the training pool
    split = _SPLIT_ALIASES.get(split_raw)
    if split is None:
        raise DataError(f"{path}:{line}: unknown split {shown(split_raw)}; use train or test")
    if not allow_outside_root:
        check_file_within(
            file,
            base,
            f"{path}:{line}: image {shown(rel)}",
            "pass allow_outside_root (the command line's --allow-outside-root) if that is intended",
        )
    try:
        is_file = file.is_file()
    except (OSError, ValueError) as exc:  # a name too long for the file system
        raise DataError(f"{path}:{line}: image {shown(rel)}: {_os_reason(exc)}") from None
    # The resolved path in full from here: stat took it (it refuses one over PATH_MAX); repr escapes it.
    if not is_file and file.is_dir():  # it said the image file 'does not exist'
        raise DataError(f"{path}:{line}: image path {str(file)!r} is a directory, not an image file")
    if not is_file:
        raise DataError(f"{path}:{line}: image file {str(file)!r} does not exist")
    site = (row.get("site") or "").strip() or None
    return ImageRecord(rel, str(file), label, split, site)


def _os_reason(exc: Exception) -> str:
    """An OSError's reason without the file name it repeats (a 100,000-character path twice in one line)."""
    return (isinstance(exc, OSError) and exc.strerror) or str(exc)


# ----------------------------------------------------------------------------- exact duplicates
DUPLICATE_POLICIES = ("drop", "keep", "refuse")
_HASH_THREADS = 8


def file_sha256(path: str) -> str:
    """sha256_file, an unreadable file an ImageDecodeError naming it."""
    try:
        return sha256_file(path)
    except OSError as exc:
        raise ImageDecodeError(path, f"{type(exc).__name__}: {exc.strerror or exc}") from None


def _sha256_or_none(path: str) -> str | None:
    try:
        return file_sha256(path)
    except ImageDecodeError:  # unreadable: left to the decoder, which refuses or skips it
        return None


def deduplicate(image_set: ImageSet, policy: str = "drop") -> ImageSet:
    """Find byte-identical files (sha256 of their contents) across the training pool and the test split.

    Copies carrying different labels are dropped from every split, and named in a warning. Then, with
    `drop` (the default), a group with a test copy loses its training-pool copies (the test copies stay, so the
    global test is the official one) and a group inside the pool keeps its first copy only: a site's
    validation and test images, and the global test, are then never copies of a training image. `keep` leaves
    the consistent copies (the published papers' setting); `refuse` stops at any duplicate. What was found
    and dropped is in the returned set's `duplicates` (results.json and provenance.json carry it)."""
    if policy not in DUPLICATE_POLICIES:
        raise DataError(
            f"unknown duplicates policy {policy!r}; choose one of {', '.join(DUPLICATE_POLICIES)}"
        )
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        digests = list(pool.map(_sha256_or_none, [r.path for r in image_set.records]))
    by_hash: dict[str, list[ImageRecord]] = {}
    for record, digest in zip(image_set.records, digests, strict=True):
        if digest is not None:
            by_hash.setdefault(digest, []).append(record)
    groups = sorted((g for g in by_hash.values() if len(g) > 1), key=lambda g: g[0].image_id)
    conflicting = [g for g in groups if len({r.label for r in g}) > 1]
    consistent = [g for g in groups if len({r.label for r in g}) == 1]
    across = sum(1 for g in groups if {r.split for r in g} == {"train", "test"})
    summary = {
        "policy": policy,
        "groups": len(groups),
        "files": sum(len(g) for g in groups),
        "groups_across_splits": across,
        "conflicting_groups": len(conflicting),
        "dropped_conflicting": sum(len(g) for g in conflicting),
        "dropped_training_copies": 0,
    }
    show = lambda g: " = ".join(f"{_listed(r.image_id)} ({_listed(r.label)})" for r in g)  # noqa: E731
    if policy == "refuse" and groups:
        raise DataError(
            f"{image_set.source}: {len(groups)} group(s) of byte-identical images ({across} across the training "
            f"and test splits, {len(conflicting)} with different labels), e.g. {show(groups[0])}; "
            "pass --duplicates drop (drop the training copies) or keep"
        )
    drop = {r.image_id for g in conflicting for r in g}
    if conflicting:
        log.warning(
            "%s: %d group(s) of byte-identical images carry different labels and are dropped from every "
            "split: %s%s",
            image_set.source,
            len(conflicting),
            "; ".join(show(g) for g in conflicting[:5]),
            " ..." if len(conflicting) > 5 else "",
        )
    if policy == "drop":
        for g in consistent:
            pool_copies = sorted((r for r in g if r.split == "train"), key=lambda r: r.image_id)
            extra = pool_copies if any(r.split == "test" for r in g) else pool_copies[1:]
            drop.update(r.image_id for r in extra)
            summary["dropped_training_copies"] += len(extra)
    if groups:
        log.info(
            "%s: %d group(s) of byte-identical images (%d files, %d groups across the training and test splits); "
            "dropped %d training-pool copies and %d copies with conflicting labels (--duplicates %s)",
            image_set.source,
            len(groups),
            summary["files"],
            across,
            summary["dropped_training_copies"],
            summary["dropped_conflicting"],
            policy,
        )
    records = [r for r in image_set.records if r.image_id not in drop]
    return ImageSet(image_set.class_names, records, image_set.source, list(image_set.skipped), summary)


def open_source(
    spec: str | Path, classes: list[str] | None = None, allow_outside_root: bool = False
) -> ImageSet:
    """A directory (image-folder tree) or a .csv manifest (`allow_outside_root`: see `from_csv`)."""
    p = Path(spec)
    if p.suffix.lower() == ".csv":
        return from_csv(p, classes, allow_outside_root)
    return from_image_folder(p, classes, allow_outside_root)

"""Image sources: an image-folder tree, a CSV manifest, and safe image decoding.

Class names are one global sorted list for every site (per-site folder listings would shift label
indices whenever a site lacks a class)."""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError, ImageDecodeError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
# Refuse decompression bombs: 8,192 x 8,192 is far beyond any scan we expect.
MAX_IMAGE_PIXELS = 8192 * 8192

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

    def labels(self, records: list[ImageRecord] | None = None) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.class_names)}
        return np.array([index[r.label] for r in (records or self.records)], dtype=np.int64)

    def by_id(self) -> dict[str, ImageRecord]:
        return {r.image_id: r for r in self.records}

    def split(self, name: str) -> list[ImageRecord]:
        return [r for r in self.records if r.split == name]


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB, or raise ImageDecodeError naming the file."""
    path = str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageDecodeError(path, f"{w}x{h} pixels exceeds the limit of {MAX_IMAGE_PIXELS}")
                img.load()
                return img.convert("RGB")
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as exc:
        raise ImageDecodeError(path, f"{type(exc).__name__}: {exc}") from None


def _check_classes(class_names: list[str], records: list[ImageRecord], source: str) -> None:
    present = {r.label for r in records}
    empty = [c for c in class_names if c not in present]
    if empty:
        raise DataError(f"{source}: class(es) with no images: {', '.join(empty)}")
    if not records:
        raise DataError(f"{source}: no images found")


def from_image_folder(root: str | Path, classes: list[str] | None = None) -> ImageSet:
    """`<root>/<split>/<class>/*.jpg` with split folders Training/Testing (or train/test)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {str(root)!r} does not exist")
    split_dirs = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        split = _SPLIT_ALIASES.get(d.name.lower())
        if split:
            split_dirs[split] = d
    if "train" not in split_dirs:
        raise DataError(
            f"{root}: expected a Training/ (or train/) folder of class folders, found: "
            f"{', '.join(p.name for p in root.iterdir()) or 'nothing'}"
        )
    found: set[str] = set()
    records = []
    for split, d in split_dirs.items():
        for class_dir in sorted(p for p in d.iterdir() if p.is_dir()):
            files = sorted(
                f for f in class_dir.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not files:
                raise DataError(f"class folder {str(class_dir)!r} contains no images")
            found.add(class_dir.name)
            for f in files:
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
        raise DataError(
            f"{source}: unknown label(s) {', '.join(map(repr, unknown))}; expected one of {classes}"
        )
    return sorted(classes)


def from_csv(path: str | Path, classes: list[str] | None = None) -> ImageSet:
    """A CSV manifest with columns `path,label[,site][,split]`; relative paths are relative to the CSV."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {str(path)!r} does not exist")
    base = path.parent
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(sorted(missing))}; need path,label[,site][,split]"
            )
        records = []
        seen: dict[Path, int] = {}
        for line, row in enumerate(reader, start=2):
            rel = (row.get("path") or "").strip()
            label = (row.get("label") or "").strip()
            if not rel or not label:
                raise DataError(f"{path}:{line}: empty path or label")
            # The same image twice (e.g. in train and test) would leak across the splits.
            key = (base / rel).resolve()
            if key in seen:
                raise DataError(f"{path}:{line}: image {rel!r} is already listed on line {seen[key]}")
            seen[key] = line
            if classes is not None and label not in classes:
                raise DataError(f"{path}:{line}: unknown label {label!r}; expected one of {sorted(classes)}")
            split_raw = (row.get("split") or "train").strip().lower()
            split = _SPLIT_ALIASES.get(split_raw)
            if split is None:
                raise DataError(f"{path}:{line}: unknown split {split_raw!r}; use train or test")
            file = (base / rel).resolve()
            if not file.is_file():
                raise DataError(f"{path}:{line}: image file {str(file)!r} does not exist")
            site = (row.get("site") or "").strip() or None
            records.append(ImageRecord(rel, str(file), label, split, site))
    class_names = _resolve_classes(sorted({r.label for r in records}), classes, str(path))
    _check_classes(class_names, [r for r in records if r.split == "train"], f"{path} (training split)")
    return ImageSet(class_names, records, str(path.resolve()))


def open_source(spec: str | Path, classes: list[str] | None = None) -> ImageSet:
    """A directory (image-folder tree) or a .csv manifest."""
    p = Path(spec)
    if p.suffix.lower() == ".csv":
        return from_csv(p, classes)
    return from_image_folder(p, classes)

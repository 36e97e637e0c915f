"""Image sources: an image-folder tree, a CSV manifest, and safe image decoding.

Class names are one global sorted list for every site (per-site folder listings would shift label
indices whenever a site lacks a class)."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import DataError, ImageDecodeError
from .paths import check_file_within
from .preprocess import to_rgb8

log = logging.getLogger(__name__)

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


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB, or raise ImageDecodeError naming the file.

    Strict on purpose, so that nothing damaged is trained on: truncated data is an error whatever
    `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` says, so is any warning Pillow raises while it parses and decodes the
    file (corrupt metadata, a malformed file, a decompression bomb), and a JPEG's entropy-coded data is checked
    (`jpeg_scan_problem`): libjpeg decodes garbage scan data into garbage pixels with only a warning, which
    Pillow drops."""
    path = str(path)
    try:
        data = Path(path).read_bytes()
        with _DECODE_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
            try:
                img = Image.open(io.BytesIO(data))
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageDecodeError(path, f"{w}x{h} pixels exceeds the limit of {MAX_IMAGE_PIXELS}")
                img.load()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
        _refuse_decoder_warnings(path, caught)
        if img.format == "JPEG":
            problem = _checked_jpeg_scan_problem(data)
            if problem:
                raise ImageDecodeError(path, f"corrupt JPEG data: {problem}")
        return to_rgb8(img)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            path, "cannot identify image file (not an image format Pillow reads)"
        ) from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as exc:
        raise ImageDecodeError(path, f"{type(exc).__name__}: {exc}") from None


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


# ----------------------------------------------------------------------------- JPEG scan check
# libjpeg treats damaged entropy-coded data as a warning: it substitutes zeros or garbage coefficients and the
# image decodes. Pillow discards those warnings, so this re-reads the Huffman-coded data of sequential JPEGs
# (baseline and extended: what scanners, PACS exports and nearly every data set write) symbol by symbol,
# without the inverse DCT, and reports what libjpeg would warn about plus what no encoder writes: an invalid
# code, a coefficient run past the end of a block, data that ends before the last block or leaves whole
# bytes over, restart markers missing or out of order. Progressive, lossless and arithmetic-coded JPEGs are
# left to libjpeg's own errors. About 6-10 ms for a 512x512 scan on one core.

_MARKER = re.compile(rb"\xff+([^\x00\xff])")  # 0xFF fill bytes, then a marker code (0xFF00 is stuffing)
_SEQUENTIAL_HUFFMAN_FRAMES = {0xC0, 0xC1}
_OTHER_FRAMES = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_LOOKUP_BITS = 10  # codes this short (nearly all) resolve in one table look-up
_EOB = 128  # a coefficient-index advance that ends the block
# Zero bytes after the data: more than one MCU can read, so running past the end is caught after each MCU.
_PAD_BYTES = 4096


class _HuffmanTable:
    """One DHT table as look-ups. An entry packs the bits a symbol takes (code plus the magnitude bits that
    follow it) with how far it moves the coefficient index (AC tables); 0 means "resolve the long way",
    -1 a symbol that cannot occur in this table."""

    def __init__(self, counts: bytes, symbols: bytes, is_ac: bool, max_size: int):
        self.is_ac, self.max_size, self.symbols = is_ac, max_size, symbols
        self.short = [0] * (1 << _LOOKUP_BITS)
        self.long: list[tuple[int, int, int, int]] = []  # (length, first code, last code, first symbol)
        code = k = 0
        for length in range(1, 17):
            n = counts[length - 1]
            if n and length > _LOOKUP_BITS:
                self.long.append((length, code, code + n - 1, k))
            elif n:
                span = 1 << (_LOOKUP_BITS - length)
                for i in range(n):
                    lo = (code + i) << (_LOOKUP_BITS - length)
                    self.short[lo : lo + span] = [self._entry(length, symbols[k + i])] * span
            code = (code + n) << 1
            k += n

    def _entry(self, length: int, symbol: int) -> int:
        run, size = symbol >> 4, symbol & 0x0F
        if size > self.max_size or (not self.is_ac and run):
            return -1
        if not self.is_ac:
            advance = 0
        elif size:
            advance = run + 1
        else:
            advance = 16 if run == 15 else _EOB  # ZRL: sixteen zeros; otherwise end of block
        return (length + size) | (advance << 8)

    def resolve(self, window16: int) -> int:
        for length, first, last, k in self.long:
            code = window16 >> (16 - length)
            if first <= code <= last:
                return self._entry(length, self.symbols[k + code - first])
        return -1


# Digests of JPEG files whose scan data passed, so a file read again in this process (another preprocessing,
# another run of a comparison grid) is not re-checked: the check costs several times the decode itself.
_SOUND_JPEGS: set[bytes] = set()
_SOUND_JPEGS_MAX = 200_000


def _checked_jpeg_scan_problem(data: bytes) -> str | None:
    digest = hashlib.blake2b(data, digest_size=16).digest()
    if digest in _SOUND_JPEGS:
        return None
    problem = jpeg_scan_problem(data)
    if problem is None:
        if len(_SOUND_JPEGS) >= _SOUND_JPEGS_MAX:
            _SOUND_JPEGS.clear()
        _SOUND_JPEGS.add(digest)
    return problem


def jpeg_scan_problem(data: bytes) -> str | None:
    """What is wrong with a JPEG file's structure or entropy-coded data, or None when nothing is (and for
    the non-sequential JPEGs this does not read). See the comment above for what is checked."""
    try:
        return _jpeg_problem(data)
    except IndexError:  # a segment shorter than its own fields say
        return "a malformed marker segment"


def _jpeg_problem(data: bytes) -> str | None:
    if data[:2] != b"\xff\xd8":
        return "no start-of-image marker"
    pos, frame, restart = 2, None, 0
    tables: dict[tuple[int, int], tuple[bytes, bytes]] = {}
    while True:
        m = _MARKER.match(data, pos)
        if not m:
            if pos >= len(data):
                return "the file ends without an end-of-image marker (truncated)"
            return f"unexpected bytes between segments at offset {pos}"
        code, pos = m.group(1)[0], m.end()
        if code == 0xD9:
            return None if frame else "no image frame before the end-of-image marker"
        if 0xD0 <= code <= 0xD7 or code == 0x01:
            continue  # markers without a length
        length = int.from_bytes(data[pos : pos + 2], "big")
        seg = data[pos + 2 : pos + length]
        if length < 2 or len(seg) != length - 2:
            return f"segment 0xFF{code:02X} at offset {pos - 2} is truncated"
        pos += 2 + len(seg)
        if code in _OTHER_FRAMES:
            return None
        if code in _SEQUENTIAL_HUFFMAN_FRAMES:
            height, width, n = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), seg[5]
            if height == 0:
                return None  # the height comes later in a DNL marker: left to libjpeg
            comps = {seg[6 + 3 * i]: (seg[7 + 3 * i] >> 4, seg[7 + 3 * i] & 15) for i in range(n)}
            frame = (seg[0], height, width, comps)
        elif code == 0xC4:
            i = 0
            while i + 17 <= len(seg):
                n = sum(seg[i + 1 : i + 17])
                tables[(seg[i] >> 4, seg[i] & 15)] = (
                    bytes(seg[i + 1 : i + 17]),
                    bytes(seg[i + 17 : i + 17 + n]),
                )
                i += 17 + n
        elif code == 0xDD:
            restart = int.from_bytes(seg[:2], "big")
        elif code == 0xDA:
            if frame is None:
                return "a scan before the frame header"
            intervals = []  # the scan's data split at its restart markers
            start = pos
            nxt = _MARKER.search(data, pos)
            while nxt and 0xD0 <= nxt.group(1)[0] <= 0xD7:
                intervals.append((data[start : nxt.start()], nxt.group(1)[0]))
                start = nxt.end()
                nxt = _MARKER.search(data, start)
            pos = nxt.start() if nxt else len(data)
            intervals.append((data[start:pos], None))
            problem = _scan_problem(frame, seg, tables, restart, intervals)
            if problem:
                return problem


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _scan_problem(frame, header: bytes, tables, restart: int, intervals) -> str | None:
    precision, height, width, comps = frame
    ns = header[0]
    selectors = [(header[1 + 2 * i], header[2 + 2 * i] >> 4, header[2 + 2 * i] & 15) for i in range(ns)]
    if tuple(header[1 + 2 * ns : 4 + 2 * ns]) != (0, 63, 0):
        return "invalid scan parameters for a sequential JPEG"
    if any(c not in comps for c, _, _ in selectors):
        return "a scan names a component the frame does not have"
    # The largest magnitude category a coefficient can have at this precision (DC, AC).
    max_dc, max_ac = (11, 10) if precision == 8 else (15, 14)
    try:
        coders = [
            (_HuffmanTable(*tables[(0, td)], False, max_dc), _HuffmanTable(*tables[(1, ta)], True, max_ac))
            for _, td, ta in selectors
        ]
    except KeyError:
        return "a scan uses a Huffman table that was never defined"
    h_max = max(h for h, _ in comps.values())
    v_max = max(v for _, v in comps.values())
    if ns == 1:  # non-interleaved: one block per MCU, over the component's own size
        h, v = comps[selectors[0][0]]
        mcus = _ceil_div(_ceil_div(width * h, h_max), 8) * _ceil_div(_ceil_div(height * v, v_max), 8)
        blocks = coders
    else:
        mcus = _ceil_div(width, 8 * h_max) * _ceil_div(height, 8 * v_max)
        blocks = [
            c
            for (cid, _, _), c in zip(selectors, coders, strict=True)
            for _ in range(comps[cid][0] * comps[cid][1])
        ]
    per_interval = restart or mcus
    expected = _ceil_div(mcus, per_interval)
    if len(intervals) != expected:
        return f"{len(intervals) - 1} restart marker(s) in a scan that needs {expected - 1}"
    for i, (raw, marker) in enumerate(intervals):
        if marker is not None and marker != 0xD0 + i % 8:
            return "restart markers out of order"
        problem = _interval_problem(raw, min(per_interval, mcus - i * per_interval), blocks)
        if problem:
            return problem
    return None


def _interval_problem(raw: bytes, mcus: int, blocks) -> str | None:
    """Decode the Huffman symbols of `mcus` MCUs from one restart interval's data."""
    unstuffed = raw.replace(b"\xff\x00", b"\xff")
    nbits = 8 * len(unstuffed)
    b = np.frombuffer(unstuffed + bytes(_PAD_BYTES), dtype=np.uint8).astype(np.int64)
    win = ((b[:-2] << 16) | (b[1:-1] << 8) | b[2:]).tolist()  # 24 bits from every byte offset
    p = 0
    shift = 24 - _LOOKUP_BITS
    short_mask = (1 << _LOOKUP_BITS) - 1
    for _ in range(mcus):
        for dc, ac in blocks:
            x, o = win[p >> 3], p & 7
            v = dc.short[(x >> (shift - o)) & short_mask] or dc.resolve((x >> (8 - o)) & 0xFFFF)
            if v < 0:
                return "an invalid Huffman code in the scan data"
            p += v
            k = 1
            while k < 64:
                x, o = win[p >> 3], p & 7
                v = ac.short[(x >> (shift - o)) & short_mask] or ac.resolve((x >> (8 - o)) & 0xFFFF)
                if v < 0:
                    return "an invalid Huffman code in the scan data"
                p += v & 0xFF
                k += v >> 8
            if 64 < k < _EOB:
                return "a run of coefficients past the end of a block"
        if p > nbits:
            return "the scan data ends before the last block (premature end of data)"
    if nbits - p >= 8:
        return f"{(nbits - p) // 8} extraneous byte(s) after the last block"
    return None


def _check_classes(class_names: list[str], records: list[ImageRecord], source: str) -> None:
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
            problems.append(f"{c!r} has {train[c]} training image(s), fewer than {min_images}")
        if test and (train[c] == 0) != (test[c] == 0):
            where = "training pool" if train[c] else "global test set"
            problems.append(f"{c!r} is only in the {where}")
    if problems:
        counts = ", ".join(f"{c} {train[c]}/{test[c]}" for c in image_set.class_names)
        raise DataError(
            f"{image_set.source}: suspicious classes: {'; '.join(problems)}. Images per class "
            f"(training/test): {counts}. A typo in a label makes a new class: fix the label, or if these "
            "classes are real, pass the class list explicitly (`classes`, --classes) or lower "
            "`min_class_images` (--min-class-images)."
        )


def from_image_folder(
    root: str | Path, classes: list[str] | None = None, allow_outside_root: bool = False
) -> ImageSet:
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
                if not allow_outside_root:  # a symlink out of the data folder is not this data set's image
                    check_file_within(
                        f,
                        root,
                        f"image {f.relative_to(root).as_posix()!r} of {root}",
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
        raise DataError(
            f"{source}: unknown label(s) {', '.join(map(repr, unknown))}; expected one of {classes}"
        )
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
            if not allow_outside_root:
                check_file_within(
                    file,
                    base,
                    f"{path}:{line}: image {rel!r}",
                    "pass allow_outside_root (the command line's --allow-outside-root) if that is intended",
                )
            if not file.is_file():
                raise DataError(f"{path}:{line}: image file {str(file)!r} does not exist")
            site = (row.get("site") or "").strip() or None
            records.append(ImageRecord(rel, str(file), label, split, site))
    class_names = _resolve_classes(sorted({r.label for r in records}), classes, str(path))
    _check_classes(class_names, [r for r in records if r.split == "train"], f"{path} (training split)")
    return ImageSet(class_names, records, str(path.resolve()))


# ----------------------------------------------------------------------------- exact duplicates
DUPLICATE_POLICIES = ("drop", "keep", "refuse")
_HASH_THREADS = 8


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise ImageDecodeError(path, f"{type(exc).__name__}: {exc.strerror or exc}") from None
    return h.hexdigest()


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
    show = lambda g: " = ".join(f"{r.image_id} ({r.label})" for r in g)  # noqa: E731
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

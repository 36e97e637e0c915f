"""Data sources and bad inputs (clear errors naming the file or class), and the feature store's
provenance rules (reuse on a match, refuse a mismatch, never touch a stored file)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedmedclip.backbone import load_backbone, make_preprocessing
from fedmedclip.data import (
    DEFAULT_MIN_CLASS_IMAGES,
    ImageRecord,
    ImageSet,
    check_class_support,
    from_csv,
    from_image_folder,
    load_image,
    open_source,
)
from fedmedclip.errors import DataError, ImageDecodeError, ProvenanceMismatch
from fedmedclip.features import FeatureStore, build_feature_store, check_training_classes


def _png(path: Path, seed: int, size: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size + 8), dtype=np.uint8)
    Image.fromarray(arr, mode="L").save(path)
    return path


def _jpeg_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny (inconsistent) body: a decompression bomb
    as far as a reader that trusts the header is concerned."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def make_folder(root: Path, classes=("glioma", "normal"), n_train=3, n_test=2) -> Path:
    for ci, c in enumerate(classes):
        for i in range(n_train):
            _png(root / "Training" / c / f"{i}.png", 100 * ci + i)
        for i in range(n_test):
            _png(root / "Testing" / c / f"{i}.png", 1000 + 100 * ci + i)
    return root


# ----------------------------------------------------------------------------- decoding bad files


def test_load_image_decodes_rgb(tmp_path):
    img = load_image(_png(tmp_path / "a.png", 0))
    assert img.mode == "RGB" and img.size == (56, 48)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("corrupt.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, ""),
        ("truncated.jpg", None, "truncated"),
        ("notes.jpg", b"this is a text file, not a scan\n" * 10, "cannot identify"),
        ("empty.png", b"", ""),
        ("bomb-pil.png", _png_header(20_000, 20_000), "exceeds the limit"),
        ("bomb-warn.png", _png_header(10_000, 10_000), "exceeds the limit"),
        ("bomb-ours.png", _png_header(9_000, 9_000), "exceeds the limit"),
    ],
)
def test_unreadable_images_raise_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content if content is not None else _jpeg_bytes()[: len(_jpeg_bytes()) // 2])
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert reason.lower() in str(info.value).lower()
    assert isinstance(info.value, DataError)


def test_missing_image_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found") as info:
        load_image(tmp_path / "gone.jpg")
    assert "gone.jpg" in str(info.value)


# ----------------------------------------------------------------------------- image folders


def test_image_folder_layout(tmp_path):
    root = make_folder(tmp_path / "bt", classes=("pituitary", "glioma", "normal"))
    ims = open_source(root)
    assert ims.class_names == ["glioma", "normal", "pituitary"]  # one global sorted list
    assert len(ims.split("train")) == 9 and len(ims.split("test")) == 6
    r = ims.split("train")[0]
    assert r.image_id == "Training/glioma/0.png" and Path(r.path).is_file() and r.site is None
    assert ims.labels(ims.split("train")).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_a_symlink_out_of_an_image_folder_is_refused_unless_allowed(tmp_path):
    root = make_folder(tmp_path / "bt", classes=("pituitary", "glioma", "normal"))
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8)).save(outside)
    (root / "Training" / "glioma" / "smuggled.png").symlink_to(outside)
    with pytest.raises(DataError, match="smuggled.png.*outside the data root.*--allow-outside-root"):
        open_source(root)
    ims = open_source(root, allow_outside_root=True)
    assert any(r.image_id.endswith("smuggled.png") for r in ims.records)


def test_image_folder_errors(tmp_path):
    root = make_folder(tmp_path / "bt")
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(DataError, match="'.*notes.txt' is a file, not a folder or a .csv manifest"):
        open_source(tmp_path / "notes.txt")
    (root / "Training" / "meningioma").mkdir()
    with pytest.raises(DataError, match="meningioma.*contains no images"):
        from_image_folder(root)
    (root / "Training" / "meningioma").rmdir()
    with pytest.raises(DataError, match="unknown label.*'normal'"):
        from_image_folder(root, classes=["glioma", "pituitary"])
    # a class that only the test split has: the training pool lacks it
    _png(root / "Testing" / "pituitary" / "0.png", 5)
    with pytest.raises(DataError, match="no images: pituitary"):
        from_image_folder(root)
    with pytest.raises(DataError, match="does not exist"):
        from_image_folder(tmp_path / "nowhere")
    (tmp_path / "flat" / "glioma").mkdir(parents=True)
    with pytest.raises(DataError, match="Training"):
        from_image_folder(tmp_path / "flat")


# ----------------------------------------------------------------------------- CSV manifests


def _manifest(tmp_path: Path, rows: list[str], header: str = "path,label,site,split") -> Path:
    for i in range(5):
        _png(tmp_path / "img" / f"{i}.png", i)
    p = tmp_path / "manifest.csv"
    p.write_text("\n".join([header, *rows]) + "\n")
    return p


def test_csv_manifest(tmp_path):
    p = _manifest(
        tmp_path,
        [
            "img/0.png,b,h1,train",
            "img/1.png,a,h2,Training",
            "img/2.png,a,,test",
            "img/3.png,b,h1,",
            "img/4.png,b,h1, ",
        ],
    )
    ims = from_csv(p)
    assert ims.class_names == ["a", "b"]
    assert [(r.image_id, r.label, r.site, r.split) for r in ims.records] == [
        ("img/0.png", "b", "h1", "train"),
        ("img/1.png", "a", "h2", "train"),
        ("img/2.png", "a", None, "test"),
        ("img/3.png", "b", "h1", "train"),  # no split: the training pool
        ("img/4.png", "b", "h1", "train"),  # a blank one too (it was "unknown split ''")
    ]
    assert Path(ims.records[0].path) == (tmp_path / "img" / "0.png").resolve()
    assert open_source(p).class_names == ["a", "b"]
    # a declared class list may name classes the manifest lacks only in its test split
    assert from_csv(p, classes=["a", "b"]).class_names == ["a", "b"]


@pytest.mark.parametrize(
    ("rows", "header", "pattern"),
    [
        (["img/0.png,a"], "path,site", "missing column.*label"),
        (["img/0.png,a"], "file,label", "missing column.*path"),
        (
            ["img/0.png,a,h1,train", "img/1.png,tumour,h1,train"],
            None,
            r"manifest.csv:3: unknown label 'tumour'",
        ),
        (["img/0.png,a,h1,validation"], None, "manifest.csv:2: unknown split 'validation'"),
        (["img/9.png,a,h1,train"], None, r"9.png.*does not exist"),
        ([",a,h1,train"], None, "empty path or label"),
        (["img/0.png,a,h1,test"], None, r"training split\): class\(es\) with no images: a"),
        ([], None, "no images found"),
        (
            ["img/0.png,a,h1,train", "img/1.png,b,h1,train", "./img/0.png,a,,test"],
            None,
            r"manifest.csv:4: image './img/0.png' is already listed on line 2",
        ),
    ],
)
def test_csv_manifest_errors(tmp_path, rows, header, pattern):
    p = _manifest(tmp_path, rows, header or "path,label,site,split")
    with pytest.raises(DataError, match=pattern):
        from_csv(p, classes=["a", "b"] if "tumour" in pattern else None)


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "nope.csv")


# ----------------------------------------------------------------------------- feature store


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


@pytest.fixture
def images(tmp_path):
    ims = open_source(make_folder(tmp_path / "data", n_train=4, n_test=1))
    return ims.split("train"), ims.class_names


def _snapshot(directory: Path) -> dict:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
    }


def test_store_contents(tiny, images, tmp_path):
    records, classes = images
    prep = make_preprocessing("squash", tiny)
    store = build_feature_store(
        records, classes, tiny, prep, directory=tmp_path / "s", progress=False, batch_size=3
    )
    assert store.features.shape == (8, tiny.feature_dim) and store.features.dtype == torch.float32
    assert store.image_ids == [r.image_id for r in records]
    assert store.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # raw (unnormalised) image features of the preprocessed image
    one = prep.normalise(torch.from_numpy(prep.to_uint8(load_image(records[5].path)))[None])
    assert torch.allclose(store.features[5], tiny.encode_images(one)[0], atol=1e-4)
    assert not torch.allclose(store.features.norm(dim=1), torch.ones(8))
    assert torch.equal(
        store.text_features, tiny.encode_text(["a picture of a glioma", "a picture of a normal"])
    )
    prov = store.provenance
    assert prov["backbone"]["weights_sha256"] == tiny.weights_sha256
    assert prov["preprocessing"]["name"] == "squash" and prov["prompt_template"] == "a picture of a {}"
    assert prov["n_images"] == 8 and len(prov["image_list_sha256"]) == 64
    loaded = FeatureStore.load(tmp_path / "s")
    assert torch.equal(loaded.features, store.features) and loaded.image_ids == store.image_ids
    assert loaded.rows([records[3].image_id, records[0].image_id]).tolist() == [3, 0]
    with pytest.raises(DataError, match="holds no image 'not/there.png'"):
        loaded.rows(["not/there.png"])


@pytest.mark.parametrize(
    "name, content",
    [
        ("features.safetensors", b"\x00" * 64),
        ("index.json", b"{bad"),
        ("index.json", b"{}"),
        ("index.json", b'{"image_ids": ["a"], "class_names": ["glioma", "normal"]}'),
        ("provenance.json", b"{bad"),
        ("provenance.json", b"[]"),
    ],
    ids=[
        "features-garbage",
        "index-not-json",
        "index-empty",
        "index-other-rows",
        "prov-not-json",
        "prov-list",
    ],
)
def test_a_damaged_store_is_refused_in_one_line_naming_it(tiny, images, tmp_path, name, content):
    """A feature store damaged on disk (a cache folder of every run) is refused naming the store and what is
    wrong, when a run reuses it and when it is loaded: each of these was a traceback (SafetensorError,
    JSONDecodeError, KeyError, AttributeError) at every start."""
    records, classes = images
    prep = make_preprocessing("squash", tiny)
    build = lambda: build_feature_store(  # noqa: E731
        records, classes, tiny, prep, directory=tmp_path / "s", progress=False
    )
    build()
    (tmp_path / "s" / name).write_bytes(content)
    for call in (build, lambda: FeatureStore.load(tmp_path / "s")):
        with pytest.raises(DataError, match=r"feature store .*/s' is damaged .*delete it") as err:
            call()
        assert "\n" not in str(err.value)


def test_a_store_another_process_wrote_first_is_kept_and_a_different_one_is_refused(tiny, images, tmp_path):
    """Processes sharing a cache may encode the same images at once: the second to finish finds the first's
    store in place and keeps it; a store of other inputs never replaces what is there."""
    records, classes = images
    prep = make_preprocessing("squash", tiny)
    store = build_feature_store(records, classes, tiny, prep, directory=tmp_path / "s", progress=False)
    written = (tmp_path / "s" / "features.safetensors").read_bytes()
    store.save(tmp_path / "s")  # the same store again, as the slower of two writers
    assert (tmp_path / "s" / "features.safetensors").read_bytes() == written
    other = FeatureStore(
        store.features + 1, store.labels, store.image_ids, store.class_names, store.text_features,
        {**store.provenance, "digest": "0" * 64},
    )  # fmt: skip
    with pytest.raises(OSError):
        other.save(tmp_path / "s")
    assert (tmp_path / "s" / "features.safetensors").read_bytes() == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "s"]  # no temporary folder left behind


def test_store_reused_when_provenance_matches(tiny, images, tmp_path, monkeypatch):
    records, classes = images
    prep = make_preprocessing("squash", tiny)
    first = build_feature_store(records, classes, tiny, prep, directory=tmp_path / "s", progress=False)
    before = _snapshot(tmp_path / "s")

    def no_encoding(*a, **k):
        raise AssertionError("a matching store must be loaded, not re-encoded")

    monkeypatch.setattr(tiny, "encode_images", no_encoding)
    again = build_feature_store(records, classes, tiny, prep, directory=tmp_path / "s", progress=False)
    assert torch.equal(again.features, first.features) and torch.equal(again.labels, first.labels)
    assert again.provenance["digest"] == first.provenance["digest"]
    assert again.provenance == json.loads(json.dumps(first.provenance))
    assert _snapshot(tmp_path / "s") == before


def test_store_refuses_a_mismatch_and_is_left_untouched(tiny, images, tmp_path, monkeypatch):
    records, classes = images
    squash, clip = make_preprocessing("squash", tiny), make_preprocessing("clip", tiny)
    d = tmp_path / "s"
    build_feature_store(records, classes, tiny, squash, directory=d, progress=False)
    before = _snapshot(d)
    monkeypatch.setattr(tiny, "encode_images", lambda *a: pytest.fail("must not encode on a mismatch"))

    with pytest.raises(ProvenanceMismatch, match="preprocessing") as info:
        build_feature_store(records, classes, tiny, clip, directory=d, progress=False)
    assert str(d) in str(info.value) and "untouched" in str(info.value)
    with pytest.raises(ProvenanceMismatch, match="prompt_template"):
        build_feature_store(
            records, classes, tiny, squash, directory=d, prompt_template="an MRI of {}", progress=False
        )
    _png(Path(records[2].path), seed=999)  # an edited image, same name and label
    with pytest.raises(ProvenanceMismatch, match="image_list_sha256"):
        build_feature_store(records, classes, tiny, squash, directory=d, progress=False)
    relabelled = [*records[:-1], ImageRecord(records[-1].image_id, records[-1].path, "glioma", "train")]
    with pytest.raises(ProvenanceMismatch):
        build_feature_store(relabelled, classes, tiny, squash, directory=d, progress=False)
    assert _snapshot(d) == before


def test_the_cache_keys_stores_by_provenance(tiny, images, tmp_path):
    records, classes = images
    prep = make_preprocessing("squash", tiny)
    a = build_feature_store(records, classes, tiny, prep, cache_dir=tmp_path / "c", progress=False)
    b = build_feature_store(records[:5], classes, tiny, prep, cache_dir=tmp_path / "c", progress=False)
    assert a.path != b.path and a.path.parent == b.path.parent == tmp_path / "c" / "features"
    assert a.path.name == a.provenance["digest"][:24]
    assert torch.allclose(b.features, a.features[:5], atol=1e-5)


def test_corrupt_image_raises_or_is_skipped_with_a_count(tiny, images, tmp_path, caplog):
    records, classes = images
    prep = make_preprocessing("squash", tiny)
    Path(records[1].path).write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ImageDecodeError) as info:
        build_feature_store(records, classes, tiny, prep, directory=tmp_path / "a", progress=False)
    assert records[1].path in str(info.value)
    assert not (tmp_path / "a").exists()  # nothing half-written

    with caplog.at_level(logging.WARNING, logger="fedmedclip.features"):
        store = build_feature_store(
            records, classes, tiny, prep, directory=tmp_path / "b", progress=False, skip_bad=True
        )
    assert store.skipped == [records[1].image_id]
    assert len(store.image_ids) == len(store.features) == len(records) - 1
    assert records[1].image_id not in store.image_ids
    assert "skipped 1 unreadable image(s) of 8" in caplog.text
    assert FeatureStore.load(tmp_path / "b").skipped == [records[1].image_id]


def test_store_refuses_nothing_to_encode_and_bad_template(tiny, images, tmp_path):
    records, classes = images
    prep = make_preprocessing("squash", tiny)
    with pytest.raises(DataError, match="no images"):
        build_feature_store([], classes, tiny, prep, directory=tmp_path / "x", progress=False)
    with pytest.raises(DataError, match="template"):
        build_feature_store(
            records, classes, tiny, prep, directory=tmp_path / "x", prompt_template="mri", progress=False
        )
    for r in records[:2]:
        Path(r.path).write_bytes(b"garbage")
    with pytest.raises(DataError, match="every image was unreadable"):
        build_feature_store(
            records[:2], classes, tiny, prep, directory=tmp_path / "y", progress=False, skip_bad=True
        )


# ----------------------------------------------------------------------------- damage the decoder hides


def _sound_jpeg(size=(64, 48), mode="RGB", **save) -> bytes:
    """A real JPEG from Pillow's encoder, of smooth content (most blocks end early, as in scans)."""
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    rgb = np.stack([(xx * 4) % 256, (yy * 5) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format="JPEG", quality=save.pop("quality", 90), **save)
    return buf.getvalue()


def _garbage_scan(jpeg: bytes, seed: int) -> bytes:
    """The same file, header and end marker intact, with the entropy-coded scan (between the SOS header
    and EOI) overwritten by random bytes. No 0xFF in the garbage, so no marker appears in it: libjpeg then
    decodes it without an error, and Pillow returns garbage pixels without a word."""
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")
    end = jpeg.rindex(b"\xff\xd9")
    garbage = np.random.default_rng(seed).integers(0, 255, end - start, dtype=np.uint8).tobytes()
    return jpeg[:start] + garbage + jpeg[end:]


@pytest.mark.parametrize(
    ("seed", "save"), [(seed, {}) for seed in range(6)] + [(seed, {"progressive": True}) for seed in range(3)]
)
def test_jpeg_with_garbage_scan_data_is_an_error_naming_the_file(tmp_path, seed, save):
    path = tmp_path / f"scan_{seed}.jpg"
    path.write_bytes(_garbage_scan(_sound_jpeg(**save), seed))
    with Image.open(path) as img:  # what the audit saw: Pillow decodes it silently
        img.load()
    with pytest.raises(ImageDecodeError, match="corrupt JPEG data") as info:
        load_image(path)
    assert info.value.path == str(path) and str(path) in str(info.value)


@pytest.mark.parametrize(
    "save",
    [
        {},
        {"mode": "L"},
        {"mode": "CMYK"},  # Adobe CMYK, as some scanners write
        {"subsampling": 0},
        {"subsampling": 2, "quality": 30},
        {"optimize": True},  # per-image Huffman tables
        {"quality": 100, "size": (200, 40)},  # long codes, partial MCUs
        {"restart_marker_blocks": 3},  # restart intervals
        {"progressive": True},
    ],
)
def test_sound_jpegs_decode_unchanged(tmp_path, save):
    size, mode = save.pop("size", (64, 48)), save.pop("mode", "RGB")
    data = _sound_jpeg(size, mode, **save)
    path = tmp_path / "ok.jpg"
    path.write_bytes(data)
    with Image.open(io.BytesIO(data)) as img:
        want = np.asarray(img.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(path)), want)


@pytest.mark.needs_shared
def test_sound_jpegs_of_the_real_mri_set_pass(brain_mri):
    """No false alarm on real scans: every 97th JPEG of the brain-tumour MRI set."""
    files = sorted(brain_mri.rglob("*.jpg"))[::97]
    assert len(files) > 30
    for f in files:
        load_image(f)


def test_truncated_jpeg_is_an_error_even_when_pillow_is_told_to_pad(tmp_path, monkeypatch):
    from PIL import ImageFile

    data = _sound_jpeg()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) * 2 // 3])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other library may set it
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # left as it was found
    # with the end marker put back, the scan still stops short: premature end of data
    path.write_bytes(data[: len(data) * 2 // 3] + b"\xff\xd9")
    with pytest.raises(ImageDecodeError, match="premature end"):
        load_image(path)


def test_a_png_whose_data_ends_before_its_last_row_is_refused(tmp_path):
    """Pillow pads a PNG whose zlib stream ends cleanly after a few rows with zeros and reports nothing: the
    rows are counted (fedmedclip.png_rows, as the server does), and a complete PNG still loads."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def png(rows_sent: int) -> bytes:  # 200 x 100, grey, 8 bits: each row a filter byte and 200 samples
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", 200, 100, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (201 * rows_sent), 9))
            + chunk(b"IEND", b"")
        )

    path = tmp_path / "short.png"
    path.write_bytes(png(10))
    assert Image.open(path).load() is not None  # what Pillow alone says: nothing wrong
    with pytest.raises(
        ImageDecodeError, match="PNG truncated: its image data ends after about 10 of its 100"
    ):
        load_image(path)
    path.write_bytes(png(100))
    assert load_image(path).size == (200, 100)


def test_a_pillow_warning_about_the_file_is_an_error(tmp_path):
    """An APNG control chunk claiming 0 frames: Pillow warns and decodes the default image anyway."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    buf = io.BytesIO()
    Image.new("L", (8, 8), 7).save(buf, format="PNG")
    png = buf.getvalue()
    path = tmp_path / "odd.png"
    path.write_bytes(png[:33] + chunk(b"acTL", struct.pack(">II", 0, 0)) + png[33:])  # after IHDR
    filters = list(warnings.filters)
    with pytest.raises(ImageDecodeError, match="decoder warning: UserWarning: Invalid APNG") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert list(warnings.filters) == filters  # process-wide filters restored


def test_corrupt_jpeg_is_skipped_with_skip_bad_images(tiny, tmp_path):
    ims = open_source(make_folder(tmp_path / "data", n_train=4, n_test=1))
    records = ims.split("train")
    jpg = tmp_path / "data" / "Training" / "glioma" / "bad.jpg"
    jpg.write_bytes(_garbage_scan(_sound_jpeg(), 0))
    records = [*records, ImageRecord("Training/glioma/bad.jpg", str(jpg), "glioma", "train")]
    prep = make_preprocessing("squash", tiny)
    with pytest.raises(ImageDecodeError, match="bad.jpg.*corrupt JPEG data"):
        build_feature_store(records, ims.class_names, tiny, prep, directory=tmp_path / "a", progress=False)
    store = build_feature_store(
        records, ims.class_names, tiny, prep, directory=tmp_path / "b", progress=False, skip_bad=True
    )
    assert store.skipped == ["Training/glioma/bad.jpg"] and len(store.image_ids) == len(records) - 1


# ----------------------------------------------------------------------------- suspicious class lists


def _image_set(train: dict[str, int], test: dict[str, int]) -> ImageSet:
    records = [
        ImageRecord(f"{split}/{c}/{i}.png", f"/nowhere/{split}/{c}/{i}.png", c, split)
        for split, counts in (("train", train), ("test", test))
        for c, n in counts.items()
        for i in range(n)
    ]
    return ImageSet(sorted(set(train) | set(test)), records, "/nowhere/manifest.csv")


def test_a_label_typo_in_a_manifest_is_refused_with_every_class_count(tmp_path):
    rows = []
    for c in ("glioma_tumor", "no_tumor"):
        for i in range(12):
            _png(tmp_path / "img" / c / f"{i}.png", hash((c, i)) % 1000)
            rows.append(f"img/{c}/{i}.png,{c},,train")
        for i in range(12, 14):
            _png(tmp_path / "img" / c / f"{i}.png", hash((c, i)) % 1000)
            rows.append(f"img/{c}/{i}.png,{c},,test")
    rows[3] = rows[3].replace(",glioma_tumor,", ",glioma_tumour,")  # one train row
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(["path,label,site,split", *rows]) + "\n")
    ims = from_csv(manifest)
    assert ims.class_names == ["glioma_tumor", "glioma_tumour", "no_tumor"]  # what went unnoticed
    with pytest.raises(DataError) as info:
        check_class_support(ims)
    msg = str(info.value)
    assert "'glioma_tumour' has 1 training image(s), fewer than 10" in msg
    assert "'glioma_tumour' is only in the training pool" in msg
    assert "glioma_tumor 11/2, glioma_tumour 1/0, no_tumor 12/2" in msg
    assert "manifest.csv" in msg and "--classes" in msg
    # the explicit class list is the user's word: the typo is then an unknown label
    with pytest.raises(DataError, match=r"manifest.csv:5: unknown label 'glioma_tumour'"):
        from_csv(manifest, classes=["glioma_tumor", "no_tumor"])


@pytest.mark.parametrize("name", ["a\x1b[31mred", "line\nbreak", "carriage\rreturn", " "])
def test_a_class_name_with_control_characters_is_refused(tmp_path, name):
    """A class is named by its folder or a manifest's label, and printed by every console, log, model card and
    `predict`: ESC, CR or a newline in one reached every terminal that showed it (and the served model's
    answers). Refused naming it, from a folder and from a manifest."""
    for split in ("Training", "Testing"):
        for c in (name, "b"):
            _png(tmp_path / "folders" / split / c / "0.png", 1)
    with pytest.raises(DataError, match="class name .* (holds control characters|is empty)"):
        from_image_folder(tmp_path / "folders")
    _png(tmp_path / "img" / "0.png", 2)
    _png(tmp_path / "img" / "1.png", 3)
    manifest = tmp_path / "manifest.csv"
    label = '"' + name + '"'
    manifest.write_text(f"path,label,site,split\nimg/0.png,{label},,train\nimg/1.png,b,,test\n")
    with pytest.raises(DataError, match="holds control characters|empty path or label"):
        from_csv(manifest)


def test_class_support_minimum_and_splits():
    check_class_support(_image_set({"a": 10, "b": 30}, {"a": 1, "b": 1}))  # exactly the minimum
    with pytest.raises(DataError, match=r"'a' has 9 training image\(s\), fewer than 10.*a 9/1, b 30/1"):
        check_class_support(_image_set({"a": 9, "b": 30}, {"a": 1, "b": 1}))
    check_class_support(_image_set({"a": 9, "b": 30}, {"a": 1, "b": 1}), min_images=9)
    with pytest.raises(DataError, match="'b' is only in the training pool"):
        check_class_support(_image_set({"a": 20, "b": 20}, {"a": 3}))
    # no test split at all: only the minimum applies (the partition refuses a source without one)
    check_class_support(_image_set({"a": 20, "b": 20}, {}))


def test_the_synthetic_sets_pass_the_class_check(tmp_path):
    from fedmedclip import synthetic

    # the smallest synthetic set the tests use: 12 images per class and site, 2 sites
    manifest = synthetic.generate(tmp_path / "s", sites=2, per_class_per_site=12, test_per_class=6, size=16)
    check_class_support(open_source(manifest), DEFAULT_MIN_CLASS_IMAGES)


# ----------------------------------------------------------------------------- classes lost to skipping


def test_skipping_every_training_image_of_a_class_is_refused_naming_it(tiny, images, tmp_path):
    records, classes = images  # glioma 0-3, normal 0-3
    prep = make_preprocessing("squash", tiny)
    sites = {"a": [records[i] for i in (0, 1, 4, 5)], "b": [records[i] for i in (2, 3, 6, 7)]}
    train_ids = {s: [r.image_id for r in rs] for s, rs in sites.items()}
    normal = [r for r in records if r.label == "normal"]

    def stores(tag):
        return {
            s: build_feature_store(
                rs, classes, tiny, prep, directory=tmp_path / f"{tag}{s}", progress=False, skip_bad=True
            )
            for s, rs in sites.items()
        }

    Path(normal[0].path).write_bytes(b"garbage")
    check_training_classes(stores("one"), train_ids)  # one of the four lost: fine
    for r in normal[1:]:
        Path(r.path).write_bytes(b"garbage")
    with pytest.raises(DataError) as info:
        check_training_classes(stores("all"), train_ids)
    msg = str(info.value)
    assert "for class(es) normal (" in msg and "glioma" not in msg
    assert "--skip-bad-images skipped 4 unreadable training image(s)" in msg
    assert all(r.image_id in msg for r in normal)


# ----------------------------------------------------------------------------- high bit depth
def _png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG (grey HxW or RGB HxWx3), written by hand: Pillow cannot write 16-bit RGB."""
    import struct
    import zlib

    h, w = values.shape[:2]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    color = 2 if values.ndim == 3 else 0
    header = struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


def test_16_bit_pngs_are_scaled_not_saturated_in_training_and_serving(tmp_path):
    """A full-range 16-bit gradient (grey `I;16` as exported MRI/CT slices are, and 16-bit RGB) keeps its
    gradient: value >> 8 in every channel, in training (`load_image`) and in what serving decodes with
    (`Preprocessing.to_uint8`, the same function). Pillow's own conversion saturated 99.6 % of the grey one."""
    from PIL import Image

    from fedmedclip.preprocess import Preprocessing

    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    grey = _png16(tmp_path / "grey16.png", gradient)
    rgb = _png16(tmp_path / "rgb16.png", np.stack([gradient, gradient // 2, 65535 - gradient], axis=-1))
    assert Image.open(grey).mode == "I;16"
    expected = {
        grey: np.stack([gradient >> 8] * 3, axis=-1),
        rgb: np.stack([gradient >> 8, (gradient // 2) >> 8, (65535 - gradient) >> 8], axis=-1),
    }
    serving = Preprocessing("squash", 256, "bicubic", False, (0.5,) * 3, (0.5,) * 3)
    for path, want in expected.items():
        trained = np.asarray(load_image(path))
        np.testing.assert_array_equal(trained, want.astype(np.uint8))
        assert (trained == 255).mean() < 0.01
        with Image.open(path) as image:  # what the server's decode hands to_uint8: the file as opened
            served = serving.to_uint8(image)
        np.testing.assert_array_equal(served[:4, :, :], serving.to_uint8(Image.fromarray(trained))[:4, :, :])


# ----------------------------------------------------------------------------- exact duplicates
def test_exact_duplicates_drop_the_training_copies_and_conflicting_labels_everywhere(
    data_with_duplicates, caplog
):
    from fedmedclip.data import deduplicate, open_source

    manifest, added = data_with_duplicates
    image_set = open_source(manifest)
    ids = {r.image_id for r in image_set.records}
    dropped = deduplicate(image_set, "drop")
    kept = {r.image_id for r in dropped.records}
    assert dropped.duplicates == {
        "policy": "drop",
        "groups": 3,
        "files": 6,
        "groups_across_splits": 1,
        "conflicting_groups": 1,
        "dropped_conflicting": 2,
        "dropped_training_copies": 2,
    }
    assert ids - kept == {
        added["copy_of_test"][0],  # the training copy of a test image (the test copy stays)
        added["pool_copy"][0],  # the second of two copies inside the pool (by id)
        added["conflict"][0],  # both copies with different labels
        "train/site_0/normal/0002.png",
    }
    assert any(
        "different labels" in r.getMessage() and "conflict.png (round_lesion)" in r.getMessage()
        for r in caplog.records
    )
    kept_all = deduplicate(image_set, "keep")
    assert {r.image_id for r in image_set.records} - {r.image_id for r in kept_all.records} == {
        added["conflict"][0],
        "train/site_0/normal/0002.png",
    }
    with pytest.raises(
        DataError, match=r"3 group\(s\) of byte-identical images \(1 across the training and test"
    ):
        deduplicate(image_set, "refuse")


def test_train_reports_the_duplicates_and_takes_a_run_id(data_with_duplicates, tmp_path, capsys):
    """`fedmedclip train --duplicates drop` (the default) on data with duplicates: the console, results.json
    and provenance.json say what was found and dropped; `--run-id` (documented) is accepted and recorded."""
    from fedmedclip.cli import main

    manifest, _ = data_with_duplicates
    out = tmp_path / "run"
    args = [
        "-q",
        "train",
        "--data",
        str(manifest),
        "--sites",
        "2",
        "--rounds",
        "1",
        "--min-class-images",
        "2",
    ]
    args += ["--out", str(out)]
    assert main([*args, "--cache-dir", str(tmp_path / "cache"), "--run-id", "dup-check", "--no-track"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["run_id"] == "dup-check"
    assert results["data"]["duplicates"]["dropped_training_copies"] == 2
    assert json.loads((out / "provenance.json").read_text())["_dataset"] == results["data"]
    printed = capsys.readouterr().out
    assert (
        "3 groups of byte-identical images (1 across training and test): dropped 2 training copies, 2 with conflicting labels"
        in printed
    )


@pytest.mark.parametrize(
    "flag, value",
    [("--size", "0"), ("--size", "1"), ("--size", "100000"), ("--sites", "0"), ("--per-class", "-1")],
)
def test_synth_refuses_settings_no_run_can_use_in_one_line(tmp_path, capsys, flag, value):
    """Size 0 was Pillow's traceback, size 1 a division by zero, a huge size a MemoryError; no sites or a
    negative count wrote a set that every run then refused. Refused before anything is written."""
    from conftest import error_lines

    from fedmedclip.cli import main

    out = tmp_path / "synth"
    assert main(["-q", "synth", str(out), flag, value]) == 2
    text = capsys.readouterr().err
    err = error_lines(text)
    assert len(err) == 1 and err[0].startswith("error: synthetic data: ") and f"got {value}" in err[0]
    assert "Traceback" not in text
    assert not out.exists()


def test_a_manifest_that_is_not_utf8_or_names_a_nul_byte_is_refused_naming_the_line(tmp_path):
    """A manifest in another encoding was a UnicodeDecodeError traceback, a NUL byte in a path a ValueError
    (embedded null byte): each a DataError naming the file and its line, as any other bad row is. A UTF-8
    byte-order mark (as spreadsheet programs write) is not part of the first column's name."""
    p = _manifest(tmp_path, ["img/0.png,a,h1,train", "img/1.png,b,h1,train"])
    p.write_bytes(p.read_bytes() + "img/2.png,caf\u00e9,h1,train\n".encode("latin-1"))
    with pytest.raises(
        DataError, match=re.escape(f"{p}:4: not UTF-8 text (byte 0xe9): save the manifest as UTF-8")
    ):
        from_csv(p)
    p.write_text("path,label,site,split\nimg/0.png,a,h1,train\nimg/1\x00.png,b,h1,train\n")
    with pytest.raises(DataError, match=re.escape(f"{p}:3: image path 'img/1\\x00.png' contains a NUL byte")):
        from_csv(p)
    p.write_text("path,label,site,split\nimg/0.png,a,h1,train\nimg/1.png,b\x00,h1,train\n")
    with pytest.raises(DataError, match=re.escape(f"{p}:3: ")):
        from_csv(p, classes=["a", "b"])  # a NUL elsewhere in a row: named by its line too
    p.write_bytes(b"\xef\xbb\xbfpath,label\nimg/0.png,a\nimg/1.png,b\n")
    assert [r.label for r in from_csv(p).records] == ["a", "b"]


def test_a_failed_generation_of_the_synthetic_data_leaves_no_folder_in_the_cache(tmp_path, monkeypatch):
    """The temporary folder the synthetic data is generated into was left behind, empty, by every generation
    that failed (an option generate() did not take)."""
    from fedmedclip import synthetic
    from fedmedclip.config import TrainConfig
    from fedmedclip.preparation import _local_source

    def fail(out_dir, **kwargs):
        (Path(out_dir) / "half").mkdir()
        raise OSError("disk full")

    cfg = TrainConfig(out="", cache_dir=str(tmp_path / "cache"), synthetic={"size": 8}).validate()
    monkeypatch.setattr(synthetic, "generate", fail)
    with pytest.raises(OSError, match="disk full"):
        _local_source(cfg)
    assert list((tmp_path / "cache" / "synthetic").iterdir()) == []

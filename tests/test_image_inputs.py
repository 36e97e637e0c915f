"""Image inputs training and serving must refuse alike, each in one line naming the file and the problem, never a
traceback or a silently wrong data set. Before these fixes (an audit's findings):
- a 32-bit float TIFF (mode F) decoded all black and trained; a multi-page TIFF or an animation trained on its
  first frame;
- with both Training/ and train/, one was dropped; a class folder's hidden .thumbnails/ and ._ files were
  training images;
- a thin 1x100000 PNG (277 bytes) was resized to 224x22,400,000 (15 GB) for --preprocessing clip, a
  MemoryError traceback; a 5 GB file was read whole;
- a CSV row naming a symbolic-link loop raised RuntimeError; a natural partition's site of one image ended in
  a BatchNorm traceback;
- the server accepted a JPEG with corrupt scan data that training refuses; training had no PNG chunk limit;
- the pixel limit was quoted as three different numbers; a 100,000-character path or label made a 300 KB
  "line", and a bad row after a blank line was reported on the wrong line; hostile file names reached the log
  raw.
Tiny files built here; library functions called directly (no training run)."""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_features import _png_header

from fedmedclip.data import ImageRecord, ImageSet, deduplicate, from_csv, from_image_folder, load_image
from fedmedclip.errors import DataError, ImageDecodeError
from fedmedclip.preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocessing

CLIP = Preprocessing("clip", 224, "bicubic", True, CLIP_MEAN, CLIP_STD)
SQUASH = Preprocessing("squash", 16, "bilinear", False, IMAGENET_MEAN, IMAGENET_STD)
LIMIT = "exceeds the limit of 67,108,864 pixels"


def _rgb(size=(24, 20), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _refused(path: Path, *words: str) -> str:
    """load_image's refusal of `path`: one line naming the file and each of `words`."""
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    message = str(info.value)
    assert info.value.path == str(path) and repr(str(path)) in message and "\n" not in message
    for word in words:
        assert word in message, message
    return message


def _serving():
    from serving.errors import RequestRejected
    from serving.images import decode_image
    from serving.options import Limits

    return RequestRejected, decode_image, Limits()


def _served_refusal(data: bytes, pre: Preprocessing = SQUASH):
    RequestRejected, decode_image, limits = _serving()
    with pytest.raises(RequestRejected) as info:
        decode_image(data, 0, pre, limits)
    return info.value


# ----------------------------------------------------------------------------- A1: image modes
def test_a_float_tiff_is_refused_naming_its_mode_in_training_and_in_the_shared_conversion(tmp_path):
    values = np.random.default_rng(3).random((16, 16)).astype(np.float32)  # [0, 1], as exporters write
    path = _save(Image.fromarray(values), tmp_path / "scan.tif")
    assert Image.open(path).mode == "F"
    _refused(path, "image mode 'F'", "no faithful 8-bit RGB conversion")
    # the conversion training and serving share refuses it too (serving's to_uint8 is this one)
    with pytest.raises(ValueError, match="image mode 'F'"):
        SQUASH.to_uint8(Image.fromarray(values))


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "I;16", "CMYK"])
def test_modes_the_conversion_maps_still_load(tmp_path, mode):
    image = _rgb().convert(mode) if mode != "I;16" else Image.new("I;16", (8, 8), 40000)
    path = _save(image, tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"))
    assert load_image(path).mode == "RGB"


# ----------------------------------------------------------------------------- A2, A3: image folders
def test_both_training_and_train_folders_are_refused_naming_both(tmp_path):
    for split in ("Training", "train", "Testing"):
        for c in ("a", "b"):
            _save(_rgb(), tmp_path / split / c / "0.png")
    with pytest.raises(DataError) as info:
        from_image_folder(tmp_path)
    assert "'Training/'" in str(info.value) and "'train/'" in str(info.value)


def test_hidden_files_and_folders_are_not_images_of_a_class(tmp_path):
    for c in ("a", "b"):
        _save(_rgb(), tmp_path / "Training" / c / "0.png")
        _save(_rgb(), tmp_path / "Testing" / c / "0.png")
    _save(_rgb(), tmp_path / "Training" / "a" / ".thumbnails" / "0.png")  # a viewer's cache
    (tmp_path / "Training" / "a" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS's resource fork
    _save(_rgb(), tmp_path / "Training" / ".cache" / "0.png")  # not a class
    _save(_rgb(), tmp_path / "Training" / "b" / "sub" / "1.png")  # a plain sub-folder is the class's
    ims = from_image_folder(tmp_path)
    assert ims.class_names == ["a", "b"]
    assert sorted(r.image_id for r in ims.split("train")) == [
        "Training/a/0.png",
        "Training/b/0.png",
        "Training/b/sub/1.png",
    ]


# ----------------------------------------------------------------------------- A4: a resize over the limit
def test_a_thin_strip_is_refused_before_its_resize_in_training_and_serving(tmp_path):
    from fedmedclip import features

    # 1 x 2,000: resized to 224 on its short side it is 224 x 448,000 = 100 M pixels (a 1 x 100,000 one: 15 GB)
    strip = _save(Image.new("L", (1, 2000), 128), tmp_path / "strip.png")
    got = features._decode(ImageRecord("strip.png", str(strip), "a", "train"), CLIP)
    assert isinstance(got, ImageDecodeError), type(got)  # one --skip-bad-images skips, not a traceback
    message = str(got)
    assert repr(str(strip)) in message and "224x448000 = 100,352,000 pixels" in message and LIMIT in message
    # the same check in the server, from the header, and in to_uint8 itself before it resizes
    from serving.images import _header_pixels

    RequestRejected, _, limits = _serving()
    with pytest.raises(RequestRejected) as info:
        _header_pixels([strip.read_bytes()], limits, CLIP)
    assert info.value.code == "image_aspect_ratio"
    assert "1x2000: resized to 224 pixels on its short side it would be 224x448000" in info.value.message
    with pytest.raises(ValueError, match="224x448000"):
        CLIP.to_uint8(Image.open(strip))
    assert features._decode(ImageRecord("strip.png", str(strip), "a", "train"), SQUASH).shape == (16, 16, 3)


# ----------------------------------------------------------------------------- A5: file size
def test_a_file_over_the_byte_limit_is_refused_before_it_is_read(tmp_path):
    from fedmedclip import data

    limit = getattr(data, "MAX_IMAGE_BYTES", 256 * 1024 * 1024)
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:  # sparse: no disk, and nothing is read
        f.write(_encoded(_rgb(), "PNG"))
        f.truncate(limit + 1)
    _refused(path, f"{limit + 1:,} bytes", f"over the limit of {limit:,} bytes")


# ----------------------------------------------------------------------------- A6: frames
@pytest.mark.parametrize(("name", "fmt"), [("stack.tif", "TIFF"), ("anim.gif", "GIF"), ("anim.png", "PNG")])
def test_an_image_of_several_frames_is_refused(tmp_path, name, fmt):
    frames = [_rgb(seed=s) for s in range(3)]
    data = _encoded(frames[0], fmt, save_all=True, append_images=frames[1:])
    path = tmp_path / name
    path.write_bytes(data)
    _refused(path, "more than one frame")
    if fmt == "PNG":  # an APNG: the server refuses it in the same words
        refusal = _served_refusal(data)
        assert (
            refusal.code == "unsupported_image"
            and "image 0 (PNG) holds more than one frame" in refusal.message
        )
    single = tmp_path / f"single-{name}"
    single.write_bytes(_encoded(frames[0], fmt))
    assert load_image(single).size == (24, 20)


def test_a_camera_jpeg_with_previews_and_a_tiff_with_a_thumbnail_are_their_first_image(tmp_path):
    """Frames that are previews of the first are not other images: a camera's JPEG with the MP extension
    (Pillow's MPO) and a TIFF whose other page is a smaller thumbnail decode to their first frame, in training
    and in serving; a TIFF whose other page is as large is a stack, refused."""
    first, other = _rgb((64, 48), seed=1), _rgb((64, 48), seed=2)
    mpo = _encoded(first, "MPO", save_all=True, append_images=[other])
    (tmp_path / "camera.jpg").write_bytes(mpo)
    assert Image.open(tmp_path / "camera.jpg").format == "MPO"
    want = np.asarray(Image.open(io.BytesIO(_encoded(first, "JPEG"))).convert("RGB"))
    assert np.array_equal(np.asarray(load_image(tmp_path / "camera.jpg")), want)
    RequestRejected, decode_image, limits = _serving()
    assert decode_image(mpo, 0, SQUASH, limits)[0].shape == (16, 16, 3)
    thumb = _encoded(first, "TIFF", save_all=True, append_images=[other.resize((16, 12))])
    (tmp_path / "slide.tif").write_bytes(thumb)
    assert np.array_equal(np.asarray(load_image(tmp_path / "slide.tif")), np.asarray(first))
    stack = _encoded(first, "TIFF", save_all=True, append_images=[other.resize((64, 12))])
    (tmp_path / "stack.tif").write_bytes(stack)
    _refused(tmp_path / "stack.tif", "more than one frame")


# ----------------------------------------------------------------------------- B1: symbolic-link loop
def test_a_manifest_row_naming_a_symlink_loop_is_refused_in_one_line(tmp_path):
    (tmp_path / "l1.jpg").symlink_to(tmp_path / "l2.jpg")
    (tmp_path / "l2.jpg").symlink_to(tmp_path / "l1.jpg")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nl1.jpg,a\n")
    with pytest.raises(DataError, match=r"m\.csv:2: image path 'l1\.jpg' is a loop of symbolic links"):
        from_csv(manifest)


# ----------------------------------------------------------------------------- B2: natural sites too small
def test_a_natural_partition_with_a_site_too_small_is_refused_naming_each(tmp_path):
    from fedmedclip.partition import make_partition

    records = [ImageRecord(f"t/{i}.png", f"/x/t/{i}.png", "ab"[i % 2], "test") for i in range(4)]
    sizes = {"hosp_a": 40, "hosp_b": 40, "tiny": 1, "small": 6}
    for site, n in sizes.items():
        records += [
            ImageRecord(f"{site}/{i}.png", f"/x/{site}/{i}.png", "ab"[i % 2], "train", site) for i in range(n)
        ]
    with pytest.raises(DataError) as info:
        make_partition(ImageSet(["a", "b"], records, "/x"), "natural", None, reference_fraction=0)
    message = str(info.value)
    assert "'tiny' (1)" in message and "'small' (6)" in message and "hosp_a" not in message
    assert "at least 10" in message
    big = [r for r in records if r.site not in ("tiny", "small")]
    assert make_partition(ImageSet(["a", "b"], big, "/x"), "natural", None).site_names == ["hosp_a", "hosp_b"]


# ----------------------------------------------------------------------------- C1: corrupt JPEG scan data
def _garbage_scan(jpeg: bytes) -> bytes:
    """The JPEG with its entropy-coded data replaced by random bytes without 0xFF (no marker): Pillow decodes it
    without a word, libjpeg-turbo in strict mode refuses it."""
    sos = jpeg.index(b"\xff\xda")
    start, end = sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big"), jpeg.rindex(b"\xff\xd9")
    return (
        jpeg[:start]
        + np.random.default_rng(1).integers(0, 255, end - start, dtype=np.uint8).tobytes()
        + jpeg[end:]
    )


def test_a_jpeg_with_corrupt_scan_data_is_refused_by_the_server_as_by_training(tmp_path):
    data = _garbage_scan(_encoded(_rgb((32, 32)), "JPEG", quality=90))
    Image.open(io.BytesIO(data)).load()  # Pillow alone takes it
    path = tmp_path / "scan.jpg"
    path.write_bytes(data)
    trained = _refused(path, "corrupt JPEG data")
    refusal = _served_refusal(data)
    assert refusal.code == "corrupt_image" and "image 0 (JPEG)" in refusal.message
    assert trained.split("corrupt JPEG data")[1] in refusal.message  # the same check's words
    _, decode_image, limits = _serving()
    assert decode_image(_encoded(_rgb((32, 32)), "JPEG"), 0, SQUASH, limits)[0].shape == (16, 16, 3)


# ----------------------------------------------------------------------------- C2: PNG chunk limits
def test_a_png_of_too_many_chunks_is_refused_by_training_as_by_the_server(tmp_path):
    png = _encoded(_rgb((8, 8)), "PNG")
    empty = struct.pack(">I", 0) + b"teSt" + struct.pack(">I", zlib.crc32(b"teSt"))
    data = png[:33] + empty * 1_100 + png[33:]  # after IHDR: 1,100 ancillary chunks, over 1,024
    path = tmp_path / "chunks.png"
    path.write_bytes(data)
    words = "holds over 65,536 chunks, or over 1,024 besides its image data"
    _refused(path, words)
    from serving.images import _header_pixels

    RequestRejected, _, limits = _serving()
    with pytest.raises(RequestRejected, match=words):
        _header_pixels([data], limits, SQUASH)


# ----------------------------------------------------------------------------- D1: one pixel limit, one message
@pytest.mark.parametrize(
    # ours alone; over Pillow's warning threshold (89,478,485); over its error threshold (twice that)
    ("width", "height", "size"),
    [
        (9_000, 9_000, "9000x9000 = 81,000,000 pixels"),
        (10_000, 10_000, "10000x10000 = 100,000,000 pixels"),
        (20_000, 20_000, "400,000,000 pixels"),
    ],
)
def test_the_pixel_limit_is_one_limit_in_one_message(tmp_path, width, height, size):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(width, height))
    message = _refused(path, f"{size} {LIMIT}")
    assert "89478485" not in message and "178956970" not in message and "Decompression" not in message


# ----------------------------------------------------------------------------- D3: long values, right lines
def test_long_manifest_values_are_cut_and_rows_reported_on_their_line(tmp_path):
    from fedmedclip.data import check_class_support

    for i in range(3):
        _save(_rgb(seed=i), tmp_path / f"{i}.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "y" * 100_000 + ",a\n")
    with pytest.raises(DataError) as info:
        from_csv(manifest)
    assert ":2: image 'yyy" in str(info.value) and len(str(info.value)) < 300
    manifest.write_text("path,label\n0.png,a\n" + "x" * 200_000 + ",a\n")  # over csv's field limit: line 3
    with pytest.raises(DataError, match=r"m\.csv:3: not a readable CSV row"):
        from_csv(manifest)
    manifest.write_text("path,label\n\ngone.png,a\n")  # a blank line 2: the row is line 3
    with pytest.raises(DataError, match=r"m\.csv:3: image file .*gone\.png' does not exist"):
        from_csv(manifest)
    manifest.write_text("path,label\n0.png,a\n1.png,a\n2.png," + "z" * 100_000 + "\n")
    with pytest.raises(DataError) as info:
        check_class_support(from_csv(manifest), 2)
    assert "'zzz" in str(info.value) and len(str(info.value)) < 1000


# ----------------------------------------------------------------------------- D4: hostile names in the log
HOSTILE = "x\x1b[2J\x1b[31mPWNED.png"


def test_hostile_file_names_reach_the_log_escaped(tmp_path, caplog):
    for split in ("Training", "Testing"):
        for c in ("a", "b"):
            _save(_rgb(seed=ord(c)), tmp_path / split / c / "0.png")
    copy = tmp_path / "Training" / "a" / HOSTILE  # a copy of b's image, labelled a: dropped with a warning
    copy.write_bytes((tmp_path / "Training" / "b" / "0.png").read_bytes())
    with caplog.at_level(logging.WARNING, logger="fedmedclip.data"):
        deduplicate(from_image_folder(tmp_path))
    assert "carry different labels" in caplog.text
    assert "\x1b" not in caplog.text and "\\x1b[2J" in caplog.text


def test_a_skipped_image_with_a_hostile_name_is_logged_escaped(tmp_path, caplog, monkeypatch):
    import torch

    from fedmedclip import features

    class Encoder:
        def encode(self, batch):
            return torch.zeros(len(batch), 4)

        def describe(self):
            return {"engine": "fake"}

    class Backbone:
        def identity(self):
            return {"name": "fake"}

        def encode_text(self, texts):
            return torch.zeros(len(texts), 4)

    monkeypatch.setattr(features, "open_image_encoder", lambda *args: Encoder())
    good = _save(_rgb(), tmp_path / "good.png")
    bad = tmp_path / HOSTILE
    bad.write_bytes(b"not an image")
    records = [ImageRecord(p.name, str(p), "a", "train") for p in (good, bad)]
    with caplog.at_level(logging.WARNING, logger="fedmedclip.features"):
        store = features.build_feature_store(
            records,
            ["a"],
            Backbone(),
            SQUASH,
            directory=tmp_path / "store",
            progress=False,
            skip_bad=True,
            workers=1,
        )
    assert store.skipped == [HOSTILE]
    assert "skipping unreadable image" in caplog.text and "\x1b" not in caplog.text
    assert "\\x1b[31mPWNED.png" in caplog.text
    assert os.path.exists(bad)


# ----------------------------------------------------------------------------- A7: scans
def _with_scans_repeated(data: bytes, times: int) -> bytes:
    """A progressive JPEG whose refinement scans (those after its first, each with the tables before it) are
    written `times` over: each repeat is a few hundred bytes, and the decoder walks the whole image again."""
    pos, parts = 2, []
    while data[pos + 1] != 0xD9:
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if data[pos + 1] == 0xDA:  # the scan's data runs to the next marker neither stuffed nor a restart
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        parts.append((data[pos + 1], data[pos:end]))
        pos = end
    first_scan = next(i for i, (m, _) in enumerate(parts) if m == 0xDA)
    refinement = b"".join(seg for _, seg in parts[first_scan + 1 :])
    return b"\xff\xd8" + b"".join(seg for _, seg in parts) + refinement * times + b"\xff\xd9"


def test_a_jpeg_of_too_many_scans_is_refused_before_it_is_decoded(tmp_path):
    """A 469 kB progressive 6000x6000 JPEG whose refinement scans were repeated 1,000 times (each decoded over
    the whole image) took 30 s of CPU to decode, and the server decoded it twice and answered 200: two such
    requests held both decoding threads for three minutes. Over MAX_JPEG_SCANS it is refused unread, in
    training and in the server alike; an ordinary progressive JPEG (about 10 scans) is not."""
    from fedmedclip.preprocess import MAX_JPEG_SCANS

    progressive = _encoded(_rgb((64, 64)), "JPEG", progressive=True, quality=90)
    assert load_image(_save_bytes(tmp_path / "ok.jpg", progressive)).size == (64, 64)
    bomb = _with_scans_repeated(progressive, MAX_JPEG_SCANS // 5)
    assert len(bomb) < 100_000 and Image.open(io.BytesIO(bomb)).load() is not None  # Pillow decodes it
    _refused(_save_bytes(tmp_path / "bomb.jpg", bomb), f"JPEG holds over {MAX_JPEG_SCANS} scans")
    refusal = _served_refusal(bomb)
    assert (
        refusal.code == "too_many_scans"
        and f"image 0 (JPEG) holds over {MAX_JPEG_SCANS} scans" in refusal.message
    )


def _save_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path

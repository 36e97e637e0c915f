"""The two preprocessing recipes of the reference code, and the checks of an encoded image that training and
serving share, free of torch at import time.

Split in two so that the served ONNX graph and training agree exactly: `Preprocessing.to_uint8`
(decode-side geometry, PIL) gives an HxWx3 uint8 array; `Preprocessing.normalise` (torch ops,
exported into the ONNX graph) turns a uint8 NHWC batch into the float NCHW tensor the encoder takes.
Training (`fedmedclip.data.load_image`) and serving (`serving/images.py`) refuse the same files with the
checks here: PNG chunk counts, the pixel limit and its wording, image modes and frames, a resize beyond the
pixel limit, corrupt JPEG scan data and short PNG rows.
The server imports this module without torch installed (nor simplejpeg, imported where it is used).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .errors import shown
from .png_rows import png_chunks, png_rows_problem

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

PREPROCESSING_NAMES = ("clip", "squash")

# The largest image side a recipe may have: the largest a backbone's config may declare (backbone._SIZE_BOUNDS),
# whose image size every recipe takes. Here, not there, so that the torch-free server reads it too.
MAX_IMAGE_SIZE = 2048

# The most pixels (width*height) training decodes or resizes an image to (fedmedclip.data.load_image,
# Preprocessing.to_uint8): 8,192 x 8,192 is far beyond any scan we expect. The server has its own limit,
# --max-image-pixels (serving/options.py), checked with the same functions.
MAX_IMAGE_PIXELS = 8192 * 8192

# Pillow modes holding more than 8 bits per grey value: exported MRI/CT slices are often 16-bit PNGs (I;16).
# Pillow's own convert("RGB") clips them at 255 instead of scaling them.
_HIGH_BIT_GREY = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# The modes to_rgb8 maps faithfully: the 16-bit grey ones above, and those Pillow's convert("RGB") maps
# (alpha dropped; CMYK, YCbCr, LAB and HSV by their colour formulas). Not "F": 32-bit floats of any range,
# which convert clips to 0..255 (a float TIFF of values in [0, 1] trained as an all-black image); nor
# premultiplied "La"/"RGBa", which no file format Pillow reads opens as.
_CONVERTED = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
RGB8_MODES = _HIGH_BIT_GREY | _CONVERTED


def pixel_limit_problem(what: str, limit: int) -> str:
    """The one wording of training's refusal for the pixel limit, whichever check finds it (an image's size from
    its header, Pillow's own decompression-bomb check, the size a recipe resizes it to): `what`, then `limit`.
    (The server's refusals name its own limit and the flag setting it: `Limits.exceeded`.)"""
    return f"{what} exceeds the limit of {limit:,} pixels"


def bomb_pixels(exc: Exception) -> int | None:
    """The image size that Pillow's own decompression-bomb warning or error names, None if its words changed:
    Pillow checks before our header check sees the size, in numbers of its own limit that are not ours."""
    found = re.search(r"Image size \((\d+) pixels\)", str(exc))
    return int(found[1]) if found else None


# Chunks of one PNG: Pillow reads each in Python (the header's before the pixels, the rest after them), and
# 300,000 empty ones (3.6 MB) took 1.4 s of a decoding thread before any budget counted it. A real file has a
# few ancillary chunks and its image data in chunks of 8 KiB or more: a 64 MiB PNG, 8,192.
MAX_PNG_CHUNKS = 65_536
MAX_PNG_ANCILLARY_CHUNKS = 1_024  # every chunk but the image data (IDAT)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_chunks_problem(data: bytes) -> str | None:
    """Why a PNG holds too many chunks to be read, else None (not a PNG: None): counted from their lengths, at
    most as many as the limits allow, before Pillow walks them."""
    if not data.startswith(PNG_MAGIC):
        return None
    ancillary = 0
    for chunks, (kind, _, _) in enumerate(png_chunks(data), start=1):
        ancillary += kind != b"IDAT"
        if chunks > MAX_PNG_CHUNKS or ancillary > MAX_PNG_ANCILLARY_CHUNKS:
            return (
                f"holds over {MAX_PNG_CHUNKS:,} chunks, or over {MAX_PNG_ANCILLARY_CHUNKS:,} besides its image "
                "data: no PNG needs that many"
            )
    return None


# The most scans a JPEG may hold. An encoder writes one (baseline) or about ten (a progressive script: libjpeg's
# has 10, mozjpeg's up to about 20); each scan is decoded over the whole image again, so a 469 kB progressive
# 6000x6000 JPEG repeating its refinement scans 1,000 times held a decoding thread for 30 s of CPU, twice.
MAX_JPEG_SCANS = 100
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # after a scan: not stuffed, not a restart marker


def _jpeg_scans_problem(data: bytes) -> str | None:
    """Why a JPEG holds too many scans to be decoded, else None (not a JPEG, or malformed: the decoder says
    what): its segments walked by their lengths, each scan's entropy-coded data skipped to the next marker,
    before any is decoded."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, scans = 2, 0
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            break
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker != 0xDA:
            pos = end
            continue
        scans += 1
        if scans > MAX_JPEG_SCANS:
            return f"holds over {MAX_JPEG_SCANS} scans: no encoder writes that many (a progressive JPEG has about 10)"
        after = _JPEG_MARKER.search(data, end)
        if after is None:
            break
        pos = after.start()
    return None


def parts_problem(data: bytes) -> tuple[str, str] | None:
    """(format, why) when an encoded file holds more parts than its decoder should walk (a PNG's chunks, a JPEG's
    scans), else None: counted from the bytes, before Pillow parses or decodes any of it."""
    for fmt, problem in (("PNG", _png_chunks_problem), ("JPEG", _jpeg_scans_problem)):
        if why := problem(data):
            return fmt, why
    return None


def _mode_problem(mode: str) -> str | None:
    if mode in RGB8_MODES:
        return None
    what = " (32-bit floating point, of no fixed range)" if mode == "F" else ""
    return f"image mode {shown(mode)}{what} has no faithful 8-bit RGB conversion: save it as 8- or 16-bit integer grey or RGB"


def opened_image_problem(image: Image.Image) -> str | None:
    """Why an opened image (its header parsed, no pixel decoded yet) cannot be decoded faithfully to one 8-bit
    RGB image, else None: a mode to_rgb8 does not map (`RGB8_MODES`), or more than one image in its frames (a
    multi-page TIFF, an animated GIF, APNG or WebP: `_holds_other_images`), of which Pillow would silently
    give the first."""
    if problem := _mode_problem(image.mode):
        return problem
    # is_animated: Pillow's n_frames > 1, read without walking every frame
    if getattr(image, "is_animated", False) and _holds_other_images(image):
        return (
            "holds more than one frame (a multi-page file or an animation): save the one image to use alone"
        )
    return None


# The most pages of a TIFF looked at for one that is another image rather than a preview of the first.
MAX_TIFF_PAGES = 64


def _holds_other_images(image: Image.Image) -> bool:
    """Whether a file of several frames holds another image than its first, rather than previews of it: a
    camera's JPEG with the MP extension (Pillow's MPO: frame 0 is the primary image, the others its previews or
    a stereo pair's other eye) holds none; a TIFF's pages flagged reduced-resolution (NewSubfileType bit 0) or
    smaller on both sides than the first (a scanner's or a slide's thumbnail) are previews, any other page is
    another image (a stack of slices)."""
    if image.format == "MPO":
        return False
    if image.format != "TIFF":
        return True
    first = image.size
    try:
        for page in range(1, min(image.n_frames, MAX_TIFF_PAGES + 1)):
            image.seek(page)
            reduced = int(image.tag_v2.get(254, 0)) & 1
            if not (reduced or (image.size[0] < first[0] and image.size[1] < first[1])):
                return True
        return image.n_frames > MAX_TIFF_PAGES + 1
    finally:
        image.seek(0)


# ----------------------------------------------------------------------------- JPEG scan check
# libjpeg treats damaged entropy-coded data as a warning: it substitutes zeros or garbage coefficients and the
# image decodes. Pillow discards those warnings, so the file is decoded a second time by libjpeg-turbo through
# simplejpeg in strict mode, which turns every such warning into an error: an invalid Huffman code, data that
# ends before the last block or leaves bytes over, restart markers missing or out of order, in sequential and
# progressive JPEGs alike. Decoding to grayscale skips the colour work (the entropy-coded data of every
# component is still read): about 0.35 ms for a 512x512 MRI JPEG on one core, a third of Pillow's own decode.


def jpeg_scan_problem(data: bytes) -> str | None:
    """What libjpeg-turbo finds wrong with a JPEG file's structure or entropy-coded data when told to refuse
    what it would only warn about, or None when nothing is."""
    import simplejpeg  # here: the server imports this module, and checks at its start that simplejpeg is there

    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True)
    except ValueError as exc:
        return re.sub(r"^corrupt jpeg data:\s*", "", str(exc), flags=re.IGNORECASE) or "undecodable"
    return None


def decoded_data_problem(data: bytes, image: Image.Image) -> str | None:
    """What is wrong with the data of a file Pillow decoded (`image`, loaded) without an error, else None: a
    JPEG's entropy-coded data (`jpeg_scan_problem`: libjpeg decodes garbage into garbage pixels with only a
    warning, which Pillow drops), a PNG's rows (`png_rows_problem`: Pillow pads a PNG whose data ends early
    with zeros)."""
    if image.format in ("JPEG", "MPO") and (problem := jpeg_scan_problem(data)):
        return f"corrupt JPEG data: {problem}"
    if image.format == "PNG" and (problem := png_rows_problem(data, image.size)):
        return f"PNG {problem}"
    return None


def to_rgb8(image: Image.Image) -> Image.Image:
    """An image as 8-bit RGB with its full bit depth kept in range: 16-bit grey (`I;16`, and `I` as some
    Pillow versions open 16-bit PNGs) by its high byte, value >> 8, exactly as Pillow reads a 16-bit-per-channel
    RGB PNG; every other mode of `RGB8_MODES` as Pillow converts it; another mode a ValueError. Training
    (`fedmedclip.data.load_image`) and serving (`Preprocessing.to_uint8`) both go through this one function, and
    both refused a file of several images when they opened it (`opened_image_problem`: walking a TIFF's pages
    again here made Pillow decode its first page twice)."""
    if problem := _mode_problem(image.mode):
        raise ValueError(problem)
    if image.mode == "RGB":
        return image  # convert would copy it: load_image's RGB is converted again in to_uint8
    if image.mode not in _HIGH_BIT_GREY:
        return image.convert("RGB")
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"grey values {values.min()}..{values.max()} are outside 16 bits: no scale for them")
    return Image.fromarray((values >> 8).astype(np.uint8), mode="L").convert("RGB")


def channel_values_problem(name: str, values) -> str | None:
    """Why `values` cannot be an image mean (or, `name` ending in std, an image std), None when they can: three
    finite numbers, a std's above 0 (it divides)."""
    std = name.endswith("std")
    numbers = isinstance(values, list | tuple) and len(values) == 3
    if (
        numbers
        and all(type(v) in (int, float) and math.isfinite(v) for v in values)
        and not (std and min(values) <= 0)
    ):
        return None
    return f"{name} is {shown(values)}, not three finite numbers" + (" above 0" if std else "")


@dataclass(frozen=True)
class Preprocessing:
    """One preprocessing recipe. `clip`: resize short side + centre crop + CLIP mean/std (FACMIC code).
    `squash`: plain SxS resize + ImageNet mean/std (FedMedCLIP code)."""

    name: str
    size: int
    resample: str
    center_crop: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """What `to_uint8` resizes an image of `size` (width, height) to before its centre crop: the short side
        to `size`, the long one in proportion; a squash, straight to size x size. The server bounds it from an
        image's header before decoding (a thin strip is scaled up on both sides)."""
        if not self.center_crop:
            return self.size, self.size
        w, h = size
        scale = self.size / min(w, h)
        return max(self.size, round(w * scale)), max(self.size, round(h * scale))

    def resize_problem(self, size: tuple[int, int], max_pixels: int) -> str | None:
        """What an image of `size` (width, height) would become, when `resized_size` is over `max_pixels`, else
        None: a thin strip is scaled up by the crop size on both sides (a 277-byte 1x100000 PNG became
        224x22,400,000, 15 GB; a 952-byte 300000x1 PNG, 1.7 GB in a server's decoding thread). Training
        (`fedmedclip.data.load_image`) and serving (`serving/images.py`) check it from the header, before any
        pixel is decoded; training words the refusal with `pixel_limit_problem`, the server with its flag."""
        new_w, new_h = self.resized_size(size)
        if new_w * new_h <= max_pixels:
            return None
        width, height = size
        return (
            f"{width}x{height}: resized to {self.size} pixels on its short side it would be {new_w}x{new_h} = "
            f"{new_w * new_h:,} pixels"
        )

    def to_uint8(self, image: Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
        """Geometry only: 8-bit RGB (`to_rgb8`), resized (and cropped) to size x size, as uint8 HxWx3. ValueError
        for an image `to_rgb8` refuses, or one whose resize `resize_problem` refuses (`max_pixels`: the server
        passes its own limit)."""
        if problem := self.resize_problem(image.size, max_pixels):  # before the resize allocates it
            raise ValueError(pixel_limit_problem(problem, max_pixels) + "; crop it closer to a square")
        image = to_rgb8(image)
        new_w, new_h = self.resized_size(image.size)
        image = image.resize((new_w, new_h), _RESAMPLE[self.resample])
        if self.center_crop:
            left = (new_w - self.size) // 2
            top = (new_h - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        return np.array(image, dtype=np.uint8)

    def normalise(self, images_uint8):
        """uint8 NHWC torch tensor -> float32 NCHW, scaled to [0,1] and standardised."""
        import torch

        device = images_uint8.device  # the batch's (feature extraction on a GPU): constants go where it is
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        # One contiguous NCHW float tensor, then the same three operations in place: the values are those of
        # `(x / 255 - mean) / std` to the bit, at a quarter of the time on a CPU (a batch of 32 224x224 images:
        # 3 ms instead of 13 ms on one thread), where three fresh 19 MB tensors cost more than the arithmetic.
        x = images_uint8.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        return x.div_(255.0).sub_(mean).div_(std)

    def describe(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """The recipe `describe` wrote. ValueError names a field no recipe has (an exported model's metadata is
        whoever registered it's: a size of 0 or a std of 0 would serve every image standardised to nonsense)."""
        size, resample, center_crop = d["size"], d["resample"], d["center_crop"]
        if type(size) is not int or not 1 <= size <= MAX_IMAGE_SIZE:
            raise ValueError(
                f"preprocessing size is {shown(size)}, not an integer from 1 to {MAX_IMAGE_SIZE}"
            )
        if resample not in _RESAMPLE:  # to_uint8 would fail on every image
            raise ValueError(f"preprocessing resample is {shown(resample)}, not one of {sorted(_RESAMPLE)}")
        if type(center_crop) is not bool:  # bool("false") is True
            raise ValueError(f"preprocessing center_crop is {shown(center_crop)}, not true or false")
        mean, std = d["mean"], d["std"]
        if problem := channel_values_problem("preprocessing mean", mean) or channel_values_problem(
            "preprocessing std", std
        ):
            raise ValueError(problem)
        return cls(
            name=d["name"],
            size=size,
            resample=resample,
            center_crop=center_crop,
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
        )

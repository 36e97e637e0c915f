"""Server-side image decoding: encoded JPEG/PNG bytes -> the uint8 [S, S, 3] array the ONNX graph takes.

Geometry is exactly training's (`Preprocessing.to_uint8`). Every failure is a `RequestRejected` naming
the image by its index in the request, so one bad file gives the client a 400 and the server keeps going.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from fedmedclip.preprocess import Preprocessing

from .errors import RequestRejected

ACCEPTED_FORMATS = ("JPEG", "PNG")
_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}


@dataclass(frozen=True)
class Limits:
    """Per-request limits. Defaults fit a GPU server taking scans of up to ~6000x6000 pixels."""

    max_batch_images: int = 64  # images in one request
    max_image_pixels: int = 40_000_000  # width*height of one encoded image, checked before decoding
    max_request_bytes: int = 64 * 1024 * 1024  # whole request body (REST) / message (gRPC)

    def __post_init__(self) -> None:
        for name in ("max_batch_images", "max_image_pixels", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def install_pil_guards(limits: Limits) -> None:
    """Process-wide PIL settings. PIL itself refuses above 2x MAX_IMAGE_PIXELS inside Image.open (our own
    header check refuses above 1x first); truncated files must fail, never be silently padded."""
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    # Between 1x and 2x the limit PIL only warns; decode_image refuses those from the header itself. Set once
    # here: warnings.catch_warnings() per image is not thread-safe, and images decode on a thread pool.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def as_encoded_bytes(item: object, index: int) -> bytes:
    """One element of a BYTES tensor. Binary (REST binary extension, gRPC) gives bytes; JSON can only carry
    strings, so a JSON string is read as base64 of the file."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str):
        try:
            return base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise RequestRejected(
                "bad_base64",
                f"image {index}: a BYTES element sent as a JSON string must be the base64 of a JPEG/PNG "
                "file (or send the tensor as binary data)",
            ) from None
    raise RequestRejected("bad_dtype", f"image {index}: expected bytes, got {type(item).__name__}")


def decode_image(data: bytes, index: int, pre: Preprocessing, limits: Limits) -> np.ndarray:
    """Decode one JPEG/PNG file and apply the training geometry. Refuses oversized images from the header,
    before any pixel is decoded (decompression bombs)."""
    if len(data) == 0:
        raise RequestRejected("empty_image", f"image {index} is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        fmt = next((f for magic, f in _MAGIC.items() if data.startswith(magic)), None)
        if fmt is not None:
            raise RequestRejected(
                "corrupt_image", f"image {index} starts like a {fmt} file but is corrupt or truncated"
            ) from None
        raise RequestRejected(
            "not_an_image",
            f"image {index} is not a JPEG or PNG file ({len(data)} bytes starting {data[:8]!r})",
        ) from None
    except Image.DecompressionBombError as exc:
        raise RequestRejected(
            "image_too_large",
            f"image {index} is over the limit of {limits.max_image_pixels:,} pixels "
            f"(server option --max-image-pixels): {exc}",
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RequestRejected("corrupt_image", f"image {index} has a corrupt header: {exc}") from None
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise RequestRejected("corrupt_image", f"image {index} has an empty size {width}x{height}")
        if width * height > limits.max_image_pixels:
            raise RequestRejected(
                "image_too_large",
                f"image {index} is {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{limits.max_image_pixels:,} (server option --max-image-pixels)",
            )
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise RequestRejected(
                "corrupt_image", f"image {index} ({image.format}) is corrupt or truncated: {exc}"
            ) from None
        try:
            return pre.to_uint8(image)
        except (OSError, ValueError) as exc:
            raise RequestRejected(
                "corrupt_image",
                f"image {index} ({image.format}, mode {image.mode}) cannot be converted: {exc}",
            ) from None

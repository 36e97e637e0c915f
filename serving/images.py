"""Server-side image decoding: encoded JPEG/PNG bytes -> the uint8 [S, S, 3] array the ONNX graph takes.

Geometry is exactly training's (`Preprocessing.to_uint8`). Every failure is a `RequestRejected` naming
the image by its index in the request, so one bad file gives the client a 400 and the server keeps going.

A few kilobytes of PNG can decode to tens of megapixels, so a request is budgeted before and while it is
decoded: every image's size is read from its header first and the request is refused when their total is
over `max_request_pixels`; decoding then stops (and the request is refused) once its images have taken
`max_decode_seconds` of CPU. `DecodePool` shares the decoding threads fairly: one request never has more
than half of them, so a request of many large images cannot hold up another client's small one.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import io
import logging
import os
import struct
import time
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from fedmedclip.preprocess import Preprocessing

from .errors import RequestRejected
from .options import Limits

log = logging.getLogger("fedmedclip.serving")

ACCEPTED_FORMATS = ("JPEG", "PNG")
_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}


def install_pil_guards(limits: Limits) -> None:
    """Process-wide PIL settings. PIL itself refuses above 2x MAX_IMAGE_PIXELS inside Image.open (our own
    header check refuses above 1x first); truncated files must fail, never be silently padded."""
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    # Between 1x and 2x the limit PIL only warns; decode_image refuses those from the header itself. Set once
    # here: warnings.catch_warnings() per image is not thread-safe, and images decode on a thread pool.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def as_encoded_bytes(item: object, index: int) -> bytes:
    """One element of a BYTES tensor: bytes from binary data (REST binary extension, gRPC) and from JSON
    strings alike, which serving.protocol has already read as base64."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    raise RequestRejected("bad_dtype", f"image {index}: expected bytes, got {type(item).__name__}")


def _open(data: bytes, index: int, limits: Limits) -> Image.Image:
    """Parse one file's header (no pixel is decoded) and refuse it when it is not a JPEG/PNG or too large."""
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
    width, height = image.size
    problem = None
    if width < 1 or height < 1:
        problem = RequestRejected("corrupt_image", f"image {index} has an empty size {width}x{height}")
    elif width * height > limits.max_image_pixels:
        problem = RequestRejected(
            "image_too_large",
            f"image {index} is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{limits.max_image_pixels:,} (server option --max-image-pixels)",
        )
    if problem is not None:
        image.close()
        raise problem
    return image


def image_pixels(data: bytes, index: int, limits: Limits) -> int:
    """width*height of one encoded file, from its header; refuses what decode_image would refuse up front."""
    with _open(data, index, limits) as image:
        width, height = image.size
    return width * height


def decode_image(data: bytes, index: int, pre: Preprocessing, limits: Limits) -> np.ndarray:
    """Decode one JPEG/PNG file and apply the training geometry. Refuses oversized images from the header,
    before any pixel is decoded (decompression bombs)."""
    with _open(data, index, limits) as image:
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise RequestRejected(
                "corrupt_image", f"image {index} ({image.format}) is corrupt or truncated: {exc}"
            ) from None
        if image.format == "PNG":
            _check_png_rows(data, index, image.size)
        try:
            return pre.to_uint8(image)
        except (OSError, ValueError) as exc:
            raise RequestRejected(
                "corrupt_image",
                f"image {index} ({image.format}, mode {image.mode}) cannot be converted: {exc}",
            ) from None


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_raw_size(width: int, height: int, bit_depth: int, colour_type: int, interlaced: bool) -> int:
    """Bytes of the filtered scanlines a complete PNG image decompresses to (PNG spec, sections 7-8)."""
    bits = bit_depth * _PNG_CHANNELS.get(colour_type, 4)
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        cols, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if cols > 0 and rows > 0:
            total += rows * (1 + -(-(cols * bits) // 8))
    return total


def _check_png_rows(data: bytes, index: int, size: tuple[int, int]) -> None:
    """Refuse a PNG whose image data stops before its last row. PIL pads such a file with zeros when the
    zlib stream ends cleanly early (a 109-byte 30000x1000 "image" of one row decodes without an error), so
    the data is inflated once more, without keeping it, and its length compared with what the header says."""
    try:
        width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
        expected = _png_raw_size(width, height, depth, colour, interlace == 1)
        inflater, produced, pos = zlib.decompressobj(), 0, 8
        while pos + 8 <= len(data) and produced < expected:
            length, kind = struct.unpack(">I4s", data[pos : pos + 8])
            if kind == b"IDAT":
                chunk = data[pos + 8 : pos + 8 + length]
                while chunk and produced < expected:
                    produced += len(inflater.decompress(chunk, 1 << 20))
                    chunk = inflater.unconsumed_tail
            elif kind == b"IEND":
                break
            pos += 12 + length
    except (struct.error, zlib.error) as exc:
        raise RequestRejected("corrupt_image", f"image {index} (PNG) is corrupt: {exc}") from None
    if (width, height) != tuple(size) or produced < expected:
        rows = produced * height // max(expected, 1)
        raise RequestRejected(
            "corrupt_image",
            f"image {index} (PNG) is truncated: its image data ends after about {rows} of its {height} rows",
        )


# Requests that decoded at least this many pixels hand the freed memory back to the OS afterwards: glibc
# keeps a decoding thread's freed megapixel buffers in that thread's arena otherwise, and the server's
# resident memory only ever grows.
_TRIM_AFTER_PIXELS = 16_000_000


def _find_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim  # glibc only
    except (OSError, AttributeError, TypeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def _release_freed_memory() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class DecodePool:
    """Decoding threads shared by all requests. A request keeps at most `per_request` (half the threads) of
    its images in the pool at once, so the pool's queue interleaves requests: another client's image waits
    behind at most that many of a big request's, never behind all of them."""

    def __init__(self, threads: int = 0):
        self.threads = threads if threads > 0 else min(8, os.cpu_count() or 1)
        self.per_request = max(1, self.threads // 2)
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")

    async def decode(
        self,
        blobs: list[bytes],
        pre: Preprocessing,
        limits: Limits,
        on_decoded: Callable[[int, float], None] | None = None,
    ) -> np.ndarray:
        """uint8 [N, S, S, 3] for N encoded files, in order, within the request budgets of `limits`.
        `on_decoded(pixels, cpu_seconds)` is called on the event loop after each image (metrics)."""
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(self._executor, _header_pixels, blobs, limits)
        total = sum(pixels)
        if total > limits.max_request_pixels:
            raise RequestRejected(
                "request_too_many_pixels",
                f"the request's {len(blobs)} images hold {total:,} pixels in all, over the per-request budget "
                f"of {limits.max_request_pixels:,} (server option --max-request-pixels); send fewer or "
                "smaller images per request",
            )
        decoded: list[np.ndarray | None] = [None] * len(blobs)
        pending: dict[asyncio.Future, int] = {}
        spent = 0.0  # CPU seconds this request's images took to decode
        refusal: RequestRejected | None = None
        following = 0
        while following < len(blobs) or pending:
            while following < len(blobs) and len(pending) < self.per_request and refusal is None:
                if spent > limits.max_decode_seconds:
                    refusal = RequestRejected(
                        "decode_budget",
                        f"decoding {following} of the request's {len(blobs)} images took {spent:.1f} s of CPU, "
                        f"over the per-request budget of {limits.max_decode_seconds:g} s (server option "
                        "--max-decode-seconds); send fewer or smaller images per request",
                    )
                    break
                i = following
                pending[loop.run_in_executor(self._executor, _decode_timed, blobs[i], i, pre, limits)] = i
                following += 1
            if not pending:
                break
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                try:
                    decoded[i], cpu = future.result()
                except RequestRejected as exc:
                    refusal = refusal or exc  # the rest still in the pool finish; nothing new starts
                    continue
                spent += cpu
                if on_decoded is not None:
                    on_decoded(pixels[i], cpu)
        if total >= _TRIM_AFTER_PIXELS:
            await loop.run_in_executor(self._executor, _release_freed_memory)
        if refusal is not None:
            raise refusal
        return np.stack(decoded)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _header_pixels(blobs: list[bytes], limits: Limits) -> list[int]:
    return [image_pixels(b, i, limits) for i, b in enumerate(blobs)]


def _decode_timed(data: bytes, index: int, pre: Preprocessing, limits: Limits) -> tuple[np.ndarray, float]:
    started = time.thread_time()  # this thread's CPU time: what this image cost, whatever else runs
    image = decode_image(data, index, pre, limits)
    return image, time.thread_time() - started

"""Server-side image decoding: encoded JPEG/PNG bytes -> the uint8 [S, S, 3] array the ONNX graph takes, with
training's geometry (`Preprocessing.to_uint8`), refusing what training refuses with training's own checks
(fedmedclip.preprocess: chunk counts, image modes and frames, corrupt JPEG scan data, short PNG rows). Every
failure is a `RequestRejected` naming the image by its index in the request: one bad file gets the client a
400 and the server keeps going. A few kilobytes of PNG can decode to tens of megapixels, so a request is
budgeted: its bytes (`max_request_bytes`), its images' sizes read from their headers first
(`max_request_pixels`; each, and the size it is resized to, within `max_image_pixels`), and decoding stops
once its images have taken `max_decode_seconds` of CPU."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import io
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from fedmedclip.preprocess import (
    PNG_MAGIC,
    Preprocessing,
    bomb_pixels,
    decoded_data_problem,
    opened_image_problem,
    parts_problem,
)

from . import metrics
from .errors import RequestRejected, ServingError
from .options import Limits

_MAGIC = {b"\xff\xd8\xff": "JPEG", PNG_MAGIC: "PNG"}
_FEWER = "; send fewer or smaller images per request"


def install_pil_guards(limits: Limits) -> None:
    """Process-wide PIL settings. PIL itself refuses above 2x MAX_IMAGE_PIXELS inside Image.open (our own
    header check refuses above 1x first); truncated files must fail, never be silently padded. And the JPEG
    scan check training makes (fedmedclip.preprocess.jpeg_scan_problem) needs simplejpeg: without it the
    server does not start, rather than serve JPEGs training would refuse."""
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        raise ServingError(
            "the server checks JPEG data as training does, with simplejpeg, which is not installed: "
            "pip install simplejpeg (the version of constraints.txt)"
        ) from None
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    # Between 1x and 2x the limit PIL only warns; _open refuses those from the header itself. Set once
    # here: warnings.catch_warnings() per image is not thread-safe, and images decode on a thread pool.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _corrupt(index: int, problem: str) -> RequestRejected:
    return RequestRejected("corrupt_image", f"image {index} {problem}")


def _open(data: bytes, index: int, limits: Limits) -> Image.Image:
    """Parse one file's header (no pixel is decoded); refuse it unless it is a JPEG/PNG within the pixel
    limit, a PNG within the chunk limits, of one frame and a mode training decodes (the checks of
    fedmedclip.preprocess, which training makes too). (Pillow itself refuses a width or height of 0 as
    unidentified.)"""
    if not data:
        raise RequestRejected("empty_image", f"image {index} is empty (0 bytes)")
    if parts := parts_problem(data):
        fmt, problem = parts
        code = "too_many_chunks" if fmt == "PNG" else "too_many_scans"
        raise RequestRejected(code, f"image {index} ({fmt}) {problem}")
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG", "PNG"))
    except UnidentifiedImageError:
        fmt = next((f for magic, f in _MAGIC.items() if data.startswith(magic)), None)
        if fmt is not None:
            raise _corrupt(index, f"starts like a {fmt} file but is corrupt or truncated") from None
        problem = f"image {index} is not a JPEG or PNG file ({len(data)} bytes starting {data[:8]!r})"
        raise RequestRejected("not_an_image", problem) from None
    except Image.DecompressionBombError as exc:
        # PIL refuses above twice our limit, in words naming its own limit (2x ours): the client is told
        # ours, and the image's size from PIL's message.
        pixels = bomb_pixels(exc)
        size = f" {pixels:,} pixels," if pixels else ""
        raise limits.exceeded("image_too_large", "max_image_pixels", f"image {index} is{size}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _corrupt(index, f"has a corrupt header: {exc}") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        image.close()
        size = f"image {index} is {width}x{height} = {width * height:,} pixels,"
        raise limits.exceeded("image_too_large", "max_image_pixels", size)
    if problem := opened_image_problem(image):
        fmt = image.format
        image.close()
        raise RequestRejected("unsupported_image", f"image {index} ({fmt}) {problem}")
    return image


def _header_pixels(blobs: list[bytes], limits: Limits, pre: Preprocessing) -> list[int]:
    """Each image's width*height from its header, within the per-image limit; and within the same limit the
    image it is resized to before the centre crop (`Preprocessing.resize_problem`, which training checks
    too: a thin strip is scaled up by the crop size on both sides)."""
    pixels = []
    for index, data in enumerate(blobs):
        with _open(data, index, limits) as image:
            width, height = image.size
        if problem := pre.resize_problem((width, height), limits.max_image_pixels):
            what = f"image {index} is {problem},"
            raise limits.exceeded(
                "image_aspect_ratio", "max_image_pixels", what, "; crop it closer to a square"
            )
        pixels.append(width * height)
    return pixels


def decode_image(data: bytes, index: int, pre: Preprocessing, limits: Limits) -> tuple[np.ndarray, float]:
    """One JPEG/PNG file with the training geometry applied, and the CPU seconds this thread took for it."""
    started = time.thread_time()  # this thread's CPU time: what this image cost, whatever else runs
    with _open(data, index, limits) as image:
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise _corrupt(index, f"({image.format}) is corrupt or truncated: {exc}") from None
        # What Pillow decodes without an error and training refuses: corrupt JPEG scan data, missing PNG rows.
        if problem := decoded_data_problem(data, image):
            raise _corrupt(index, f"({image.format}) is refused: {problem}")
        try:
            pixels = pre.to_uint8(image, limits.max_image_pixels)
        except (OSError, ValueError) as exc:
            problem = f"({image.format}, mode {image.mode}) cannot be converted: {exc}"
            raise _corrupt(index, problem) from None
    return pixels, time.thread_time() - started


# Requests that decoded at least this many pixels hand the freed memory back to the OS afterwards: glibc
# keeps a decoding thread's freed megapixel buffers in that thread's arena otherwise, and the server's
# resident memory only ever grows.
_TRIM_AFTER_PIXELS = 16_000_000
try:
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim  # glibc only
except (OSError, AttributeError, TypeError):
    _malloc_trim = None


class DecodePool:
    """Decoding threads shared by all requests. A request keeps at most half the threads' worth of its images
    in the pool at once, so another client's image waits behind at most that many of a big request's, never
    behind all of them."""

    def __init__(self, threads: int, model: str):  # threads 0: one per core, at most 8
        self.model, self.threads = model, threads if threads > 0 else min(8, os.cpu_count() or 1)
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")

    async def decode(self, blobs: list[bytes], pre: Preprocessing, limits: Limits) -> np.ndarray:
        """uint8 [N, S, S, 3] for N encoded files, in order, within the request budgets of `limits`."""
        total = sum(len(b) for b in blobs)
        if total > limits.max_request_bytes:
            # 413 / RESOURCE_EXHAUSTED, as the transports' own size limits answer: only a gRPC message within
            # its framing allowance (serving.server) gets here.
            what = f"{total:,} bytes of images in one request,"
            raise limits.exceeded("request_too_large", "max_request_bytes", what, status=413)
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(self._executor, _header_pixels, blobs, limits, pre)
        if sum(pixels) > limits.max_request_pixels:
            what = f"the request's {len(blobs)} images hold {sum(pixels):,} pixels in all,"
            raise limits.exceeded("request_too_many_pixels", "max_request_pixels", what, _FEWER)
        slots, spent, refusal = asyncio.Semaphore(max(1, self.threads // 2)), 0.0, None

        async def decode_one(i: int) -> np.ndarray | None:
            nonlocal spent, refusal
            async with slots:
                if refusal is None and spent > limits.max_decode_seconds:
                    what = f"decoding {i} of the request's {len(blobs)} images took {spent:.1f} s of CPU,"
                    refusal = limits.exceeded("decode_budget", "max_decode_seconds", what, _FEWER)
                if refusal is not None:  # the images already in the pool finish; nothing new starts
                    return None
                try:
                    image, cpu = await loop.run_in_executor(
                        self._executor, decode_image, blobs[i], i, pre, limits
                    )
                except Exception as exc:  # a refusal, or a bug: raised once the images in the pool finish
                    refusal = refusal or exc
                    return None
                spent += cpu
            metrics.DECODED_IMAGES.labels(self.model).inc()
            metrics.DECODED_PIXELS.labels(self.model).inc(pixels[i])
            metrics.DECODE_SECONDS.labels(self.model).observe(cpu)
            return image

        decoded = await asyncio.gather(*(decode_one(i) for i in range(len(blobs))))
        if sum(pixels) >= _TRIM_AFTER_PIXELS and _malloc_trim is not None:
            await loop.run_in_executor(self._executor, _malloc_trim, 0)
        if refusal is not None:
            raise refusal
        return np.stack(decoded)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

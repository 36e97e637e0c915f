"""A PNG whose image data stops before its last row, which Pillow decodes without an error: it pads the missing
rows with zeros when the zlib stream ends cleanly early (a 109-byte 30000x1000 "image" of one row decodes). Used
where images are decoded for training (fedmedclip.data.load_image) and serving (serving/images.py). Standard
library only: the serving image carries only numpy and Pillow of the core's dependencies."""

from __future__ import annotations

import struct
import zlib

_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_chunks(data: bytes):
    """(type, offset of its data, length) of each chunk of PNG `data` in order, IEND the last; read from the
    chunk headers alone, stopping where the data ends."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        yield kind, pos + 8, length
        if kind == b"IEND":
            return
        pos += 12 + length


def png_rows_problem(data: bytes, size: tuple[int, int]) -> str | None:
    """What is wrong with the rows of a PNG Pillow opened as `size` (`corrupt: ...`, `truncated: ...`), else
    None. The image data is inflated once more, without keeping it, and its length compared with what the
    header says."""
    try:
        width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
        # The bytes of filtered scanlines a complete image decompresses to (PNG spec, sections 7-8).
        bits, expected = depth * _CHANNELS.get(colour, 4), 0
        for x0, y0, dx, dy in _ADAM7 if interlace == 1 else ((0, 0, 1, 1),):
            cols, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
            if cols > 0 and rows > 0:
                expected += rows * (1 + -(-(cols * bits) // 8))
        inflater, produced = zlib.decompressobj(), 0
        for kind, start, length in png_chunks(data):
            if produced >= expected:
                break
            chunk = data[start : start + length] if kind == b"IDAT" else b""
            while chunk and produced < expected:
                produced += len(inflater.decompress(chunk, 1 << 20))
                chunk = inflater.unconsumed_tail
    except (struct.error, zlib.error) as exc:
        return f"corrupt: {exc}"
    if (width, height) != tuple(size) or produced < expected:
        rows = produced * height // max(expected, 1)
        return f"truncated: its image data ends after about {rows} of its {height} rows"
    return None

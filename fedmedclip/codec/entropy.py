"""Byte coders: the last stages of a chain. Their inverse never inflates past the limit it is given."""

from __future__ import annotations

import zlib

from .stages import ByteCoder, CodecError

# zlib's strategies by the name written into a chain; `huffman` skips the string matching, which finds
# nothing in quantised noise and only costs match codes.
_STRATEGIES = {
    "default": zlib.Z_DEFAULT_STRATEGY,
    "huffman": zlib.Z_HUFFMAN_ONLY,
    "filtered": zlib.Z_FILTERED,
}


def bounded_inflate(data: bytes, limit: int, exact: bool) -> bytes:
    """zlib-decompress at most `limit` bytes (exactly `limit` when `exact`). A stream that would produce
    more is refused after producing limit + 1 bytes, never all of them."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as exc:
        raise CodecError(f"corrupt payload body: zlib: {exc}") from None
    if len(out) > limit:
        raise CodecError(
            f"payload body inflates past {limit} bytes (what its header and the size cap allow): refused"
        )
    if not d.eof:
        raise CodecError(f"truncated payload body: the zlib stream ends early after {len(out)} bytes")
    if d.unused_data:
        raise CodecError(f"payload has {len(d.unused_data)} bytes of trailing data after its zlib stream")
    if exact and len(out) != limit:
        raise CodecError(f"payload body inflates to {len(out)} bytes, its header says {limit}")
    return out


class Zlib(ByteCoder):
    name = "zlib"

    def __init__(self, level: int = 6, strategy: str = "default"):
        if strategy not in _STRATEGIES:
            raise ValueError(f"unknown zlib strategy {strategy!r}; choose one of {', '.join(_STRATEGIES)}")
        self.level, self.strategy = level, strategy

    def params(self):
        # The historic codecs' chain is just zlib at level 6: keep their spec short.
        p = {"level": self.level}
        if self.strategy != "default":
            p["strategy"] = self.strategy
        return p

    def forward(self, data: bytes) -> bytes:
        if self.strategy == "default":
            return zlib.compress(data, self.level)
        c = zlib.compressobj(self.level, zlib.DEFLATED, 15, 9, _STRATEGIES[self.strategy])
        return c.compress(data) + c.flush()

    def inverse(self, data: bytes, limit: int, exact: bool) -> bytes:
        return bounded_inflate(data, limit, exact)

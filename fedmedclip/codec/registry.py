"""The registered codecs: a new codec is one `register_codec` line (its stages are classes in transforms.py,
quantisers.py or entropy.py). Payloads name their codec and record its chain; a receiver decodes only
codecs registered here, with the chain registered here."""

from __future__ import annotations

from types import MappingProxyType

from .chain import Codec
from .entropy import Zlib
from .quantisers import BlockQuant, Float16, Float32, Int8Rows
from .stages import CodecError
from .transforms import Delta, ErrorFeedback

_REGISTRY: dict[str, Codec] = {}
# Read-only view, name -> Codec, in registration order (`name in CODECS`, `", ".join(CODECS)` work).
CODECS = MappingProxyType(_REGISTRY)
DIRECTIONS = ("up", "down")


def register_codec(codec: Codec, *, replace: bool = False) -> Codec:
    if not isinstance(codec, Codec):
        raise TypeError(f"register_codec takes a Codec, got {type(codec).__name__}")
    if codec.name in _REGISTRY and not replace:
        raise CodecError(f"a codec named {codec.name!r} is already registered")
    _REGISTRY[codec.name] = codec
    return codec


def unregister_codec(name: str) -> Codec:
    """Remove a codec (tests and plug-ins that registered one for a while); the built-ins stay."""
    if name in _BUILTIN:
        raise CodecError(f"codec {name!r} is built in and cannot be removed")
    if name not in _REGISTRY:
        raise CodecError(f"no codec named {name!r} is registered")
    return _REGISTRY.pop(name)


def get_codec(name: str, direction: str | None = None) -> Codec:
    """The registered codec `name`; with `direction` ("up": site -> server, "down": server -> sites), also
    refuses a codec that cannot travel that way."""
    if name not in _REGISTRY:
        raise CodecError(f"unknown codec {name!r}; choose one of {', '.join(_REGISTRY)}")
    codec = _REGISTRY[name]
    if direction is not None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction is 'up' or 'down', got {direction!r}")
        if direction not in codec.directions:
            raise CodecError(
                f"codec {name!r} sends a difference to a module the receiver must already hold; it can carry "
                "site updates (uplink) only, not the global module (downlink)"
            )
    return codec


register_codec(
    Codec("fp16-zlib", Float16(), coders=(Zlib(6),), fmc1=True, summary="fp16, zlib (the reference)")
)
register_codec(
    Codec("int8-zlib", Int8Rows(), coders=(Zlib(6),), fmc1=True, summary="int8 with a scale per row, zlib")
)
register_codec(Codec("fp32-zlib", Float32(), coders=(Zlib(6),), fmc1=True, summary="exact fp32, zlib"))
register_codec(
    Codec(
        "delta-ef-q4-zlib",
        BlockQuant(bits=4, block=256, rms_step=0.5),
        transforms=(Delta(), ErrorFeedback()),
        coders=(Zlib(9, "huffman"),),
        summary="uplink: difference to the received global module, error feedback, 4-bit blocks, zlib",
        # 3.6 bits x 525,312 values + 1 kB = 237 kB of body: FedMedCLIP's FAM at ViT-B/32 width stays under 250 kB.
        max_bits_per_value=3.6,
    )
)

_BUILTIN = frozenset(_REGISTRY)

"""Serialising module parameters for the wire. Only this crosses a site's boundary.

A codec is a registered object (`CODECS`, name -> `Codec`) with an encoder and a decoder: a chain of
tensor transforms (difference to a reference, error feedback), one quantiser (fp16, fp32, int8 per row,
low-bit blocks) and byte coders (zlib), recorded in the payload's header (`wire.py` has the format).
Uplink and downlink choose their codecs separately; `get_codec(name, direction)` refuses a codec that
cannot travel one way.

- `fp16-zlib` (the reference), `int8-zlib` (a scale per row), `fp32-zlib` (exact): `encode_state` writes
  them in the historic FMC1 format, byte-for-byte; `encode` writes FMC2 with the same values.
- `delta-ef-q4-zlib` (uplink only): the update's difference to the global module the site received, plus
  the site's error-feedback residual, in 4-bit blocks, zlib. FedMedCLIP's FAM at ViT-B/32 width: < 250 kB.

Refused, with a CodecError naming the tensor or field: NaN/Inf in what is encoded or decoded, values beyond
fp16's range in an fp16 codec, and every payload that is truncated, mislabelled, lies about its sizes or
shapes, inflates past its header or the size cap (never inflated to find out), or does not match the
receiver's template."""

from __future__ import annotations

from .chain import Codec, Decoded, Encoded, decode_fmc1
from .entropy import Zlib
from .quantisers import BlockQuant, Float16, Float32, Int8Rows
from .registry import CODECS, DIRECTIONS, get_codec, register_codec, unregister_codec
from .stages import ByteCoder, CodecError, Quantiser, TensorTransform, WireContext
from .transforms import Delta, ErrorFeedback, reference_digest
from .wire import DEFAULT_MAX_BYTES, MAGIC_V1, MAGIC_V2, template_cap, template_of, unpack

MAGIC = MAGIC_V1  # the historic name

__all__ = [
    "CODECS",
    "DEFAULT_MAX_BYTES",
    "DIRECTIONS",
    "MAGIC",
    "MAGIC_V1",
    "MAGIC_V2",
    "BlockQuant",
    "ByteCoder",
    "Codec",
    "CodecError",
    "Decoded",
    "Delta",
    "Encoded",
    "ErrorFeedback",
    "Float16",
    "Float32",
    "Int8Rows",
    "Quantiser",
    "TensorTransform",
    "WireContext",
    "Zlib",
    "decode",
    "decode_state",
    "encode",
    "encode_state",
    "get_codec",
    "reference_digest",
    "register_codec",
    "template_of",
    "unregister_codec",
]


def encode(state, codec: str, *, reference=None, memory=None, meta=None) -> Encoded:
    """Encode `state` with the registered `codec` (FMC2).

    reference: the module state both ends hold (for the uplink: the decoded global module the site received);
    needed by codecs with a `delta` stage, ignored by the others. memory: the sender's error-feedback residual
    returned by its previous call (None the first time); `Encoded.memory` is the one to keep. meta: a small
    JSON object recorded in the header (run id, round, site, sample count)."""
    return get_codec(codec).encode(state, reference=reference, memory=memory, meta=meta)


def decode(payload, *, reference=None, template=None, max_bytes=None, codec: str | None = None) -> Decoded:
    """A payload (FMC1 or FMC2) -> Decoded(state, meta, codec).

    reference: what a `delta` codec's payload is added to (its digest must match the sender's). template:
    {name: (shape, dtype)} of the expected state (see `template_of`): a missing, extra, duplicated or renamed
    tensor, or another shape or dtype, is refused before the body is inflated. max_bytes: the most bytes of
    tensor data the body may inflate to (default: what the template allows, else DEFAULT_MAX_BYTES).
    codec: refuse payloads of any other codec."""
    magic, header, body = unpack(payload)
    if max_bytes is not None:
        cap = int(max_bytes)
    else:
        cap = template_cap(template) if template is not None else DEFAULT_MAX_BYTES
    name = header.get("codec")
    if codec is not None and name != codec:
        raise CodecError(f"payload is coded with {name!r}, expected {codec!r}")
    if magic == MAGIC_V1:
        fmc1 = [n for n, c in CODECS.items() if c.fmc1]
        return decode_fmc1(header, body, template=template, cap=cap, codec_names=fmc1)
    if header.get("format") != 2:
        raise CodecError(f"unsupported payload format {header.get('format')!r} (this version reads 2)")
    if not isinstance(name, str):
        raise CodecError("corrupt payload header: no codec name")
    return get_codec(name).decode(header, body, reference=reference, template=template, cap=cap)


def encode_state(state, codec: str = "fp16-zlib", level: int = 6) -> bytes:
    """The stateless form: no reference, no memory, no meta. The historic codecs write FMC1 exactly as
    before (`level`: their zlib level); others write FMC2. Codecs that need a reference or keep memory are
    refused: use `encode`."""
    c = get_codec(codec)
    if c.fmc1:
        return c.encode_fmc1(state, level)
    if c.needs_reference or c.keeps_memory:
        raise CodecError(
            f"codec {codec!r} codes against a reference or keeps error-feedback memory: use "
            "fedmedclip.codec.encode(state, codec, reference=..., memory=...)"
        )
    return c.encode(state).payload


def decode_state(payload) -> dict:
    """Back to float32 (int64 for counters) tensors. Payloads of codecs that need a reference are refused."""
    return decode(payload).state

"""The envelope around every payload, and the checks a receiver runs before it inflates anything.

    magic (4 bytes) | header length (uint32, little-endian) | header (UTF-8 JSON) | body

`FMC1` (the historic format, still read and written for fp16-zlib, int8-zlib and fp32-zlib by
`encode_state`): header {"codec", "tensors"}, body = zlib of the tensors' bytes concatenated.
`FMC2`: header {"format": 2, "codec", "chain", "stage_data", "meta", "tensors", "raw_nbytes"}; the body is
the tensors' bytes concatenated (`raw_nbytes` long) passed through the chain's byte coders.

Each tensor entry: name, shape, stored dtype (the quantiser's tag, or int64), its stored byte count (which
must be what its shape implies), plus the quantiser's own fields (int8-rows: rows)."""

from __future__ import annotations

import json
import struct

import torch

from ..jsonfiles import KeyTwice, loads
from .stages import CodecError, numel

MAGIC_V1 = b"FMC1"
MAGIC_V2 = b"FMC2"
# Without a template, the largest body a receiver inflates: a whole ViT-B/32 in fp32 is ~350 MB.
DEFAULT_MAX_BYTES = 1 << 30
MAX_META_BYTES = 64 << 10
_MAX_DIMS = 16


def pack(magic: bytes, header: dict, body: bytes) -> bytes:
    hb = json.dumps(header).encode()
    return magic + struct.pack("<I", len(hb)) + hb + body


def _no_constants(token: str):
    raise ValueError(f"{token} is not valid JSON here")


def unpack(payload) -> tuple[bytes, dict, bytes]:
    """(magic, header, body) of a payload, or a CodecError saying what is wrong with its envelope."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(f"a payload is bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) < 8:
        raise CodecError(f"payload of {len(payload)} bytes is too short to be a fedmedclip module payload")
    magic = payload[:4]
    if magic not in (MAGIC_V1, MAGIC_V2):
        raise CodecError(f"payload is not a fedmedclip module payload (magic {magic!r})")
    (n,) = struct.unpack("<I", payload[4:8])
    if n > len(payload) - 8:
        raise CodecError(f"truncated payload: its header claims {n} bytes, only {len(payload) - 8} follow")
    try:
        header = loads(payload[8 : 8 + n].decode("utf-8"), unique=True, parse_constant=_no_constants)
    except KeyTwice as exc:
        raise CodecError(f"corrupt payload header: {exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CodecError(f"corrupt payload header (not JSON): {exc}") from None
    if not isinstance(header, dict):
        raise CodecError(f"corrupt payload header: a JSON object expected, got {type(header).__name__}")
    return magic, header, payload[8 + n :]


def check_meta(meta) -> dict:
    """A small JSON object (run id, round, site, sample count...), recorded in the header as is."""
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise CodecError("meta must be a dict with string keys")
    try:
        text = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"meta is not plain JSON: {exc}") from None
    if len(text) > MAX_META_BYTES:
        raise CodecError(f"meta takes {len(text)} bytes of JSON; at most {MAX_META_BYTES}")
    return json.loads(text)


# ------------------------------------------------------------------ tensor entries and templates
def dtype_name(dtype) -> str:
    """'float32' / 'int64' style names for torch or numpy dtypes or strings ('torch.float32' too)."""
    return str(dtype).removeprefix("torch.")


def decoded_dtype(stored: str) -> str:
    """What a stored tensor decodes to: integers stay int64, every float storage becomes float32."""
    return "int64" if stored == "int64" else "float32"


def template_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The template a receiver checks payloads against: {name: (shape, decoded dtype)}."""
    return {k: (tuple(v.shape), "float32" if v.is_floating_point() else "int64") for k, v in state.items()}


def _normalise_template(template) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for name, spec in template.items():
        try:
            shape, dtype = spec
            out[name] = (tuple(int(d) for d in shape), dtype_name(dtype))
        except (TypeError, ValueError):
            raise CodecError(f"template entry {name!r} must be (shape, dtype), got {spec!r}") from None
    return out


def template_cap(template) -> int:
    """The largest body a state of this template can need in any codec (8 bytes per value, plus scales)."""
    return sum(8 * numel(shape) + 64 for shape, _ in _normalise_template(template).values())


def read_entries(header: dict) -> list[tuple[str, tuple[int, ...], str, dict]]:
    """The header's tensor entries as (name, shape, stored dtype, entry), each well-formed and unique."""
    entries = header.get("tensors")
    if not isinstance(entries, list):
        raise CodecError("corrupt payload header: no tensor list")
    out, seen = [], set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise CodecError(f"corrupt payload header: tensor entry {i} is not an object")
        name, shape, stored, nbytes = e.get("name"), e.get("shape"), e.get("dtype"), e.get("nbytes")
        if not isinstance(name, str) or not name:
            raise CodecError(f"corrupt payload header: tensor entry {i} has no name")
        if name in seen:
            raise CodecError(f"payload holds tensor {name!r} twice")
        seen.add(name)
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise CodecError(f"tensor {name!r}: bad shape {shape!r} in the payload header")
        if not isinstance(stored, str):
            raise CodecError(f"tensor {name!r}: bad stored dtype {stored!r} in the payload header")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise CodecError(f"tensor {name!r}: bad byte count {nbytes!r} in the payload header")
        out.append((name, tuple(shape), stored, e))
    return out


def check_template(entries, template) -> None:
    """Every tensor of the template, nothing else, with the template's shape and dtype; names the culprits."""
    want = _normalise_template(template)
    have = {name: (shape, decoded_dtype(stored)) for name, shape, stored, _ in entries}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        parts = ([f"missing {', '.join(map(repr, missing))}"] if missing else []) + (
            [f"unexpected {', '.join(map(repr, extra))}"] if extra else []
        )
        raise CodecError(f"payload does not match the expected module: {'; '.join(parts)}")
    for name, (shape, dtype) in want.items():
        got_shape, got_dtype = have[name]
        if got_shape != shape:
            raise CodecError(
                f"tensor {name!r}: shape {list(got_shape)} in the payload, expected {list(shape)}"
            )
        if got_dtype != dtype:
            raise CodecError(f"tensor {name!r}: dtype {got_dtype} in the payload, expected {dtype}")

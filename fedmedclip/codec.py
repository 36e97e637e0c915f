"""Serialising module parameters for the wire. Only this crosses a site's boundary.

Format: magic `FMC1`, a 4-byte header length, a JSON header (codec, and per tensor: name,
shape, stored dtype, byte length), then the zlib-compressed concatenation of tensor bytes.
- `fp16-zlib` (the reference): float tensors cast to fp16, lossless zlib on top.
- `int8-zlib`: float tensors quantised per row (one fp32 scale per output row, symmetric).
- `fp32-zlib`: exact, for comparisons.
Non-float tensors (BatchNorm's num_batches_tracked) travel as int64."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import torch

from .errors import FedMedClipError

MAGIC = b"FMC1"
CODECS = ("fp16-zlib", "int8-zlib", "fp32-zlib")


class CodecError(FedMedClipError):
    pass


def _quantise_rows(t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    scale = rows.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(rows / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q.numpy(), scale.to(torch.float32).numpy()


def encode_state(state: dict[str, torch.Tensor], codec: str = "fp16-zlib", level: int = 6) -> bytes:
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    entries, chunks = [], []
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        entry = {"name": name, "shape": list(t.shape)}
        if not t.is_floating_point():
            data = t.to(torch.int64).numpy().tobytes()
            entry["dtype"] = "int64"
        elif codec == "fp16-zlib":
            data = t.to(torch.float16).numpy().tobytes()
            entry["dtype"] = "float16"
        elif codec == "fp32-zlib":
            data = t.to(torch.float32).numpy().tobytes()
            entry["dtype"] = "float32"
        else:
            q, scale = _quantise_rows(t.to(torch.float32))
            data = scale.tobytes() + q.tobytes()
            entry["dtype"] = "int8-rows"
            entry["rows"] = int(scale.shape[0])
        entry["nbytes"] = len(data)
        entries.append(entry)
        chunks.append(data)
    header = json.dumps({"codec": codec, "tensors": entries}).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + zlib.compress(b"".join(chunks), level)


def decode_state(payload: bytes) -> dict[str, torch.Tensor]:
    """Back to float32 (int64 for counters) tensors."""
    if payload[:4] != MAGIC or len(payload) < 8:
        raise CodecError("payload is not a fedmedclip module update (bad magic)")
    (n,) = struct.unpack("<I", payload[4:8])
    try:
        header = json.loads(payload[8 : 8 + n])
        body = zlib.decompress(payload[8 + n :])
    except (ValueError, zlib.error) as exc:
        raise CodecError(f"corrupt module update: {exc}") from None
    out, offset = {}, 0
    try:
        for e in header["tensors"]:
            raw = body[offset : offset + e["nbytes"]]
            offset += e["nbytes"]
            shape = tuple(e["shape"])
            if e["dtype"] == "int8-rows":
                rows = e["rows"]
                scale = np.frombuffer(raw[: 4 * rows], dtype=np.float32)
                q = np.frombuffer(raw[4 * rows :], dtype=np.int8).reshape(rows, -1).astype(np.float32)
                arr = (q * scale[:, None]).reshape(shape)
            elif e["dtype"] in ("float16", "float32", "int64"):
                arr = np.frombuffer(raw, dtype=np.dtype(e["dtype"])).reshape(shape)
                arr = arr.astype(np.int64 if e["dtype"] == "int64" else np.float32)
            else:
                raise ValueError(f"unknown stored dtype {e['dtype']!r}")
            out[e["name"]] = torch.from_numpy(np.array(arr))
    except (KeyError, TypeError, ValueError) as exc:
        # A header that parses but does not describe its body (wrong shape, dtype, missing key).
        raise CodecError(f"corrupt module update: {type(exc).__name__}: {exc}") from None
    if offset != len(body):
        raise CodecError("corrupt module update: payload length does not match its header")
    return out

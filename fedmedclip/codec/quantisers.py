"""How one float tensor is stored: fp16, fp32, int8 per row (the historic codecs, byte-for-byte as before),
and blockwise low-bit quantisation with one step per block (for differences to a reference)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .stages import CodecError, Quantiser, numel

FP16_MAX = 65504.0


def _array(raw: bytes, dtype, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


class Float16(Quantiser):
    """IEEE half precision. A value beyond fp16's range is an error, never an inf on the wire."""

    name = "fp16"
    tag = "float16"
    largest = FP16_MAX

    def encode_tensor(self, name, t, coarseness=1.0):
        if t.numel():
            peak = float(t.abs().max())
            if peak > FP16_MAX:
                raise CodecError(
                    f"tensor {name!r}: |value| {peak:.6g} overflows fp16 (max {FP16_MAX:g}); "
                    "send it with fp32-zlib or as a difference to a reference"
                )
        return {}, t.to(torch.float16).numpy().tobytes()

    def expected_nbytes(self, name, shape, entry):
        return 2 * numel(shape)

    def decode_tensor(self, name, shape, entry, raw):
        return torch.from_numpy(_array(raw, np.float16, shape).astype(np.float32))


class Float32(Quantiser):
    """Exact."""

    name = "fp32"
    tag = "float32"

    def encode_tensor(self, name, t, coarseness=1.0):
        return {}, t.to(torch.float32).numpy().tobytes()

    def expected_nbytes(self, name, shape, entry):
        return 4 * numel(shape)

    def decode_tensor(self, name, shape, entry, raw):
        return torch.from_numpy(_array(raw, np.float32, shape).copy())


def _rows_of(shape: tuple[int, ...]) -> int:
    """int8-rows: one scale per output row (the first dimension); a vector or scalar is one row."""
    return shape[0] if len(shape) > 1 else 1


class Int8Rows(Quantiser):
    """Symmetric int8 with one fp32 scale per row: stored as the scales, then the int8 values."""

    name = "int8-rows"
    tag = "int8-rows"

    def encode_tensor(self, name, t, coarseness=1.0):
        rows = _rows_of(tuple(t.shape))
        if t.numel() == 0:
            return {"rows": rows}, np.zeros(rows, dtype=np.float32).tobytes()
        flat = t.reshape(rows, -1)
        scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(flat / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        return {"rows": rows}, scale.to(torch.float32).numpy().tobytes() + q.numpy().tobytes()

    def expected_nbytes(self, name, shape, entry):
        rows = _rows_of(shape)
        if entry.get("rows") != rows:
            raise CodecError(
                f"tensor {name!r}: header says {entry.get('rows')!r} int8 rows, its shape {list(shape)} has {rows}"
            )
        return 4 * rows + numel(shape)

    def decode_tensor(self, name, shape, entry, raw):
        rows = entry["rows"]
        if numel(shape) == 0:
            return torch.zeros(shape, dtype=torch.float32)
        scale = np.frombuffer(raw[: 4 * rows], dtype=np.float32)
        q = np.frombuffer(raw[4 * rows :], dtype=np.int8).reshape(rows, -1).astype(np.float32)
        return torch.from_numpy(np.array((q * scale[:, None]).reshape(shape)))


class BlockQuant(Quantiser):
    """Uniform quantisation in blocks of `block` consecutive values (in the flattened tensor), each block
    with its own fp32 step; symbols are integers in [-L, L], L = 2^(bits-1) - 1, one byte each, so the byte
    coder after it sees one symbol per byte (zlib's Huffman stage then codes near their entropy, which packed
    nibbles would hide from it).

    step = max(absmax / L, rms_step * rms) per block. The first term means nothing is ever clipped, so the
    error of every value is at most step / 2; the second sets the resolution relative to the block's spread
    rather than its single largest value: a step of about one standard deviation makes most symbols 0 or
    +-1 (about 2 bits of entropy), and with error feedback what a step leaves out is sent in later rounds.
    rms_step 0 gives plain absmax scaling."""

    name = "blockq"
    tag = "blockq"
    scalable = True

    def __init__(self, bits: int = 4, block: int = 256, rms_step: float = 0.0):
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be within 2..8, got {bits}")
        if block < 1:
            raise ValueError(f"block must be positive, got {block}")
        if not (rms_step >= 0 and math.isfinite(rms_step)):
            raise ValueError(f"rms_step must be finite and >= 0, got {rms_step}")
        self.bits, self.block, self.rms_step = bits, block, float(rms_step)
        self.levels = 2 ** (bits - 1) - 1

    def params(self):
        return {"bits": self.bits, "block": self.block, "rms_step": self.rms_step}

    def _blocks(self, n: int) -> int:
        return -(-n // self.block)

    def steps_and_symbols(
        self, t: torch.Tensor, coarseness: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(steps [nb] float32, symbols [nb, block] int8) of a finite float32 tensor; `coarseness` > 1
        multiplies every step (a codec's size budget asks for it)."""
        flat = t.reshape(-1)
        n, nb = flat.numel(), self._blocks(flat.numel())
        blocks = F.pad(flat, (0, nb * self.block - n)).reshape(nb, self.block)
        absmax = blocks.abs().amax(dim=1)
        step = absmax / self.levels
        if self.rms_step > 0:
            # Scaled by absmax so squaring cannot overflow; padding zeros do not count in the last block.
            counts = torch.full((nb,), float(self.block))
            counts[-1] = n - (nb - 1) * self.block
            safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
            rms = safe * torch.sqrt(((blocks / safe.unsqueeze(1)) ** 2).sum(dim=1) / counts)
            step = torch.maximum(step, self.rms_step * rms)
        if coarseness != 1.0:
            step = step * coarseness
        safe_step = torch.where(step > 0, step, torch.ones_like(step))
        symbols = torch.round(blocks / safe_step.unsqueeze(1)).clamp(-self.levels, self.levels)
        return step, symbols.to(torch.int8)

    def encode_tensor(self, name, t, coarseness=1.0):
        if t.numel() == 0:
            return {}, b""
        step, symbols = self.steps_and_symbols(t, coarseness)
        return {}, step.numpy().tobytes() + symbols.reshape(-1)[: t.numel()].numpy().tobytes()

    def expected_nbytes(self, name, shape, entry):
        n = numel(shape)
        return 4 * self._blocks(n) + n

    def decode_tensor(self, name, shape, entry, raw):
        n = numel(shape)
        if n == 0:
            return torch.zeros(shape, dtype=torch.float32)
        nb = self._blocks(n)
        step = np.frombuffer(raw[: 4 * nb], dtype=np.float32)
        symbols = np.frombuffer(raw[4 * nb :], dtype=np.int8)
        if not (np.isfinite(step).all() and (step >= 0).all()):
            raise CodecError(f"tensor {name!r}: a block step is negative or not finite")
        if symbols.size and int(np.abs(symbols.astype(np.int16)).max()) > self.levels:
            raise CodecError(f"tensor {name!r}: a symbol lies outside +-{self.levels} ({self.bits} bits)")
        padded = np.zeros(nb * self.block, dtype=np.float32)
        padded[:n] = symbols
        values = torch.from_numpy(padded).reshape(nb, self.block) * torch.from_numpy(step.copy()).unsqueeze(1)
        return values.reshape(-1)[:n].reshape(shape).contiguous()


class Int64:
    """Integer tensors (BatchNorm's num_batches_tracked) travel exactly, whatever the codec."""

    tag = "int64"

    @staticmethod
    def encode_tensor(t: torch.Tensor) -> bytes:
        return t.to(torch.int64).numpy().tobytes()

    @staticmethod
    def expected_nbytes(shape: tuple[int, ...]) -> int:
        return 8 * numel(shape)

    @staticmethod
    def decode_tensor(shape: tuple[int, ...], raw: bytes) -> torch.Tensor:
        return torch.from_numpy(_array(raw, np.int64, shape).copy())

"""The three kinds of wire stage a codec chains, and the context they share.

A codec is a chain of stages, applied in order when encoding and undone in reverse when decoding:

    tensor transforms*  ->  one quantiser  ->  byte coders*
    {name: float32 tensor}  {name: (entry, bytes)}  bytes

- A `TensorTransform` maps the float tensors to float tensors of the same names and shapes (difference to a
  reference, error feedback, secure aggregation's clip, fixed-point grid and mask). Its `inverse` runs at
  the receiver.
- A `Quantiser` stores one float32 tensor as bytes plus a few header fields, and reads it back.
- A `ByteCoder` maps the concatenated tensor bytes to bytes (entropy coding). Its inverse must never produce
  more than the limit it is given: that is what stops decompression bombs.

Integer tensors (BatchNorm's counters) bypass the transforms and the quantiser: they travel as int64.
Adding a stage is one class here or in a sibling module, plus a codec in the registry that uses it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import FedMedClipError


class CodecError(FedMedClipError):
    """A payload that cannot be produced or accepted: the message names the tensor or the field."""


Tensors = dict[str, torch.Tensor]


@dataclass
class WireContext:
    """What the stages of one encode or decode call share.

    reference: the module state both ends hold (the decoded global module the site received).
    memory: the sender's error-feedback residual from its previous call (None at first).
    stage_data: per-payload values a stage records in the header (e.g. the reference's digest), by stage name.
    inputs: per-call values the caller gives a stage, by stage name, never written to the header unless the
    stage records them itself (secure aggregation's mask, the public grid of the round).
    """

    reference: Tensors | None = None
    memory: Tensors | None = None
    stage_data: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)


class Stage:
    """Common to every stage: a registered name and the parameters that are written into the header's chain."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def params(self) -> dict:
        return {}

    def spec(self) -> dict:
        return {"name": self.name, **self.params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class TensorTransform(Stage):
    kind = "transform"
    needs_reference: ClassVar[bool] = False
    # True for error feedback: the codec computes the sender's new residual at this point of the chain.
    keeps_memory: ClassVar[bool] = False

    def forward(self, tensors: Tensors, ctx: WireContext) -> Tensors:
        raise NotImplementedError

    def inverse(self, tensors: Tensors, ctx: WireContext) -> Tensors:
        raise NotImplementedError


class Quantiser(Stage):
    kind = "quantiser"
    # The `dtype` field of a tensor entry this quantiser writes; one quantiser may read several (legacy tags).
    tag: ClassVar[str] = ""
    # True when `coarseness` > 1 makes the stored tensor cheaper to code (a codec's size budget needs it).
    scalable: ClassVar[bool] = False
    # The largest magnitude it stores finitely: float32's (steps and scales are float32) unless it says less.
    largest: ClassVar[float] = float(torch.finfo(torch.float32).max)

    def encode_tensor(self, name: str, t: torch.Tensor, coarseness: float = 1.0) -> tuple[dict, bytes]:
        """A finite float32 tensor -> (extra header fields of its entry, stored bytes). `coarseness`
        multiplies a scalable quantiser's step; the decoder never needs it (steps are stored)."""
        raise NotImplementedError

    def expected_nbytes(self, name: str, shape: tuple[int, ...], entry: dict) -> int:
        """The stored size a tensor of this shape must have; a header claiming another size is lying."""
        raise NotImplementedError

    def decode_tensor(self, name: str, shape: tuple[int, ...], entry: dict, raw: bytes) -> torch.Tensor:
        """Stored bytes -> float32 tensor of `shape` (the size is already checked)."""
        raise NotImplementedError


class ByteCoder(Stage):
    kind = "coder"

    def forward(self, data: bytes) -> bytes:
        raise NotImplementedError

    def inverse(self, data: bytes, limit: int, exact: bool) -> bytes:
        """Undo `forward`, producing at most `limit` bytes (exactly `limit` when `exact`); anything more is a
        CodecError raised before it is produced."""
        raise NotImplementedError


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

"""A codec: a named chain of stages with an encoder and a decoder (see stages.py for the chain's shape)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .entropy import Zlib, bounded_inflate
from .quantisers import Float16, Float32, Int8Rows, Int64
from .stages import ByteCoder, CodecError, Quantiser, Tensors, TensorTransform, WireContext, numel
from .wire import (
    MAGIC_V1,
    MAGIC_V2,
    check_meta,
    check_template,
    pack,
    read_entries,
)


@dataclass(frozen=True)
class Encoded:
    payload: bytes
    # The sender's new error-feedback residual (keep it with the sender's checkpoint and pass it to the next
    # encode call); None for codecs without error feedback.
    memory: Tensors | None
    codec: str = ""


@dataclass(frozen=True)
class Decoded:
    state: Tensors  # float32 (int64 for counters), in the sender's order
    meta: dict
    codec: str


def _check_finite(name: str, t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise CodecError(f"tensor {name!r}: {what} holds NaN or Inf; refused")


def split_state(state) -> tuple[Tensors, Tensors, list[str]]:
    """(float tensors as float32, integer tensors, order) of a state to send; refuses non-finite values. An
    empty state is a valid one: a method whose module has no parameters (zero-shot) still sends its rounds."""
    if not isinstance(state, dict):
        raise CodecError("a state to encode is a dict of tensors")
    floats, ints = {}, {}
    for name, t in state.items():
        if not isinstance(name, str) or not name:
            raise CodecError(f"state keys are tensor names, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise CodecError(f"tensor {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        if t.is_floating_point():
            _check_finite(name, t, "the state")
            if t.dtype != torch.float32:
                t = t.to(torch.float32)
                _check_finite(name, t, "the state cast to float32")
            floats[name] = t
        elif t.is_complex():
            raise CodecError(f"tensor {name!r}: complex tensors cannot be sent")
        else:
            ints[name] = t
    return floats, ints, list(state)


# Steps are at least absmax / L (L <= 127), so after 1.25^k > 2 * 127 (k = 25) every symbol is 0 and a body
# costs about 32 bits per block: any budget of at least 1 bit per value fits well before this many tries.
_MAX_COARSENING = 40

# Bytes a body may take beyond its budget: zlib's framing and the scales of small tensors, which would
# otherwise make a budget per value unreachable for a state of a few values.
_BUDGET_ALLOWANCE = 1024

# The historic payloads (FMC1) name their storage per tensor; these read it.
LEGACY_QUANTISERS: dict[str, Quantiser] = {q.tag: q for q in (Float16(), Float32(), Int8Rows())}


@dataclass(frozen=True, eq=False)
class Codec:
    """`transforms` (float tensors -> float tensors), then `quantiser` (each float tensor -> bytes), then
    `coders` (bytes -> bytes). `fmc1`: one of the historic codecs, which `encode_state` still writes in the
    FMC1 format byte-for-byte (their FMC2 payloads decode to the same values).

    `max_bits_per_value`: a size budget for the coded body, in bits per float value sent (plus 1 kB for
    framing, which matters only for states of a few values). When the first
    encoding is over it, the quantiser's steps are made coarser by 1.25x until it fits (deterministic; the
    factor is recorded in the header's stage_data). With error feedback, what the coarser steps leave out
    is sent in later rounds. Needs a scalable quantiser."""

    name: str
    quantiser: Quantiser
    transforms: tuple[TensorTransform, ...] = ()
    coders: tuple[ByteCoder, ...] = ()
    summary: str = ""
    fmc1: bool = False
    max_bits_per_value: float | None = None

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError("a codec needs a name")
        kinds = [s.kind for s in self.transforms] + [self.quantiser.kind] + [c.kind for c in self.coders]
        order = ["transform"] * len(self.transforms) + ["quantiser"] + ["coder"] * len(self.coders)
        if kinds != order:
            raise ValueError(f"codec {self.name!r}: the chain must be transforms, one quantiser, coders")
        if self.fmc1 and (
            self.transforms or [c.spec() for c in self.coders] != [{"name": "zlib", "level": 6}]
        ):
            raise ValueError("only a quantiser followed by zlib level 6 has an FMC1 form")
        if self.max_bits_per_value is not None and not (
            self.quantiser.scalable and self.max_bits_per_value >= 1
        ):
            raise ValueError(
                f"codec {self.name!r}: a size budget needs a scalable quantiser and >= 1 bit per value"
            )

    @property
    def needs_reference(self) -> bool:
        return any(t.needs_reference for t in self.transforms)

    @property
    def keeps_memory(self) -> bool:
        return any(t.keeps_memory for t in self.transforms)

    @property
    def directions(self) -> tuple[str, ...]:
        """A codec that codes against a reference only works where the receiver is sure to hold it: the
        uplink (the server made the global module the site trained from). A site that missed rounds has no
        previous global module to add a downlink difference to."""
        return ("up",) if self.needs_reference else ("up", "down")

    def chain(self) -> list[dict]:
        return [s.spec() for s in (*self.transforms, self.quantiser, *self.coders)]

    def describe(self) -> str:
        return " > ".join(s.name for s in (*self.transforms, self.quantiser, *self.coders))

    # ---------------------------------------------------------------- encoder
    def _encode_tensors(
        self, state, reference, memory, coarseness: float = 1.0, inputs: dict | None = None
    ) -> tuple[list[dict], bytes, dict, Tensors | None]:
        floats, ints, order = split_state(state)
        if memory is not None and not self.keeps_memory:
            raise CodecError(f"codec {self.name!r} keeps no error-feedback memory, but memory= was given")
        ctx = WireContext(reference=reference, memory=memory, inputs=dict(inputs or {}))
        x, ef_at, ef_input = floats, None, None
        for i, stage in enumerate(self.transforms):
            x = stage.forward(x, ctx)
            if stage.keeps_memory:
                ef_at, ef_input = i, x
        entries, chunks, stored = [], [], {}
        for name in order:
            if name in ints:
                data = Int64.encode_tensor(ints[name])
                entry = {"name": name, "shape": list(ints[name].shape), "dtype": Int64.tag}
            else:
                _check_finite(name, x[name], f"the input of {self.quantiser.name}")
                extras, data = self.quantiser.encode_tensor(name, x[name], coarseness)
                entry = {"name": name, "shape": list(x[name].shape), "dtype": self.quantiser.tag, **extras}
                stored[name] = (entry, data)
            entry["nbytes"] = len(data)
            entries.append(entry)
            chunks.append(data)
        new_memory = None
        if ef_at is not None:
            # What the receiver will reconstruct at the error-feedback point: the residual is the rest.
            xhat = {
                n: self.quantiser.decode_tensor(n, tuple(e["shape"]), e, d) for n, (e, d) in stored.items()
            }
            for stage in reversed(self.transforms[ef_at + 1 :]):
                xhat = stage.inverse(xhat, ctx)
            new_memory = {n: ef_input[n] - xhat[n] for n in ef_input}
        return entries, b"".join(chunks), ctx.stage_data, new_memory

    def encode(self, state, *, reference=None, memory=None, meta=None, inputs=None) -> Encoded:
        """inputs: per-call values for the stages, by stage name (see WireContext)."""
        meta = check_meta(meta)
        coarseness = 1.0
        for _ in range(_MAX_COARSENING):
            entries, raw, stage_data, new_memory = self._encode_tensors(
                state, reference, memory, coarseness, inputs
            )
            body = raw
            for coder in self.coders:
                body = coder.forward(body)
            if self.max_bits_per_value is None:
                break
            values = sum(numel(e["shape"]) for e in entries if e["dtype"] != Int64.tag)
            stage_data[self.quantiser.name] = {"coarseness": coarseness}
            if 8 * (len(body) - _BUDGET_ALLOWANCE) <= self.max_bits_per_value * values:
                break
            coarseness *= 1.25
        else:
            raise CodecError(
                f"codec {self.name!r}: no step size fits {self.max_bits_per_value} bits per value"
            )
        header = {
            "format": 2,
            "codec": self.name,
            "chain": self.chain(),
            "stage_data": stage_data,
            "meta": meta,
            "tensors": entries,
            "raw_nbytes": len(raw),
        }
        return Encoded(pack(MAGIC_V2, header, body), new_memory, self.name)

    def encode_fmc1(self, state, level: int = 6) -> bytes:
        """The historic format, byte-for-byte: what `encode_state` has always written."""
        if not self.fmc1:
            raise CodecError(f"codec {self.name!r} has no FMC1 form")
        entries, raw, _, _ = self._encode_tensors(state, None, None)
        return pack(MAGIC_V1, {"codec": self.name, "tensors": entries}, Zlib(level).forward(raw))

    # ---------------------------------------------------------------- decoder
    def decode(
        self, header: dict, body: bytes, *, reference, template, cap: int, inputs: dict | None = None
    ) -> Decoded:
        """A parsed FMC2 payload of this codec -> its state. Every size is checked before anything inflates.
        inputs: per-call values for the stages' inverses, by stage name (see WireContext)."""
        if self.needs_reference and reference is None:
            raise CodecError(
                f"this {self.name} payload is a difference to a reference module: decode it with reference= "
                "(the global module the sender received)"
            )
        entries, floats, ints, meta, stage_data = self.decode_stored(header, body, template=template, cap=cap)
        ctx = WireContext(reference=reference, stage_data=stage_data, inputs=dict(inputs or {}))
        return Decoded(_assemble(entries, self.invert(floats, ctx), ints), meta, self.name)

    def decode_stored(self, header: dict, body: bytes, *, template, cap: int):
        """(entries, float tensors as the quantiser stored them, integer tensors, meta, stage_data) of a
        parsed FMC2 payload of this codec: the first half of `decode`, before the transforms are undone.
        Secure aggregation sums several payloads at this point, then undoes the transforms once."""
        if header.get("chain") != self.chain():
            raise CodecError(
                f"payload's chain {header.get('chain')!r} differs from codec {self.name!r} here "
                f"({self.chain()!r}): sender and receiver run different versions or settings"
            )
        meta, stage_data = header.get("meta"), header.get("stage_data")
        if not isinstance(meta, dict) or not isinstance(stage_data, dict):
            raise CodecError("corrupt payload header: meta and stage_data must be objects")
        raw_nbytes = header.get("raw_nbytes")
        entries = read_entries(header)
        for name, _, stored, _ in entries:
            if stored not in (self.quantiser.tag, Int64.tag):
                raise CodecError(
                    f"tensor {name!r}: stored as {stored!r}, which codec {self.name!r} never writes"
                )
        total = _check_sizes(entries, template, cap, lambda tag: self.quantiser)
        if raw_nbytes != total:
            raise CodecError(
                f"corrupt payload header: raw_nbytes {raw_nbytes!r}, its tensors add up to {total}"
            )
        raw = body
        for i, coder in enumerate(reversed(self.coders)):
            last = i == len(self.coders) - 1
            raw = coder.inverse(raw, total if last else cap, exact=last)
        if len(raw) != total:
            raise CodecError(f"payload body holds {len(raw)} bytes, its header says {total}")
        floats, ints = _split_body(entries, raw, lambda tag: self.quantiser)
        return entries, floats, ints, meta, stage_data

    def invert(self, floats: Tensors, ctx: WireContext) -> Tensors:
        """Undo the transforms, last first: the second half of `decode`."""
        for stage in reversed(self.transforms):
            floats = stage.inverse(floats, ctx)
        return floats


def decode_fmc1(header: dict, body: bytes, *, template, cap: int, codec_names) -> Decoded:
    """A historic FMC1 payload (each tensor names its storage; zlib body)."""
    name = header.get("codec")
    if name not in codec_names:
        raise CodecError(
            f"FMC1 payload names codec {name!r}; FMC1 only ever carried {', '.join(codec_names)}"
        )
    entries = read_entries(header)

    def quantiser_for(tag):
        if tag not in LEGACY_QUANTISERS:
            raise CodecError(f"unknown stored dtype {tag!r} in the payload header")
        return LEGACY_QUANTISERS[tag]

    total = _check_sizes(entries, template, cap, quantiser_for)
    raw = bounded_inflate(body, total, exact=True)
    floats, ints = _split_body(entries, raw, quantiser_for)
    return Decoded(_assemble(entries, floats, ints), {}, name)


def _check_sizes(entries, template, cap: int, quantiser_for) -> int:
    """Template, per-tensor byte counts against shapes, and the total against the cap: before inflating."""
    if template is not None:
        check_template(entries, template)
    total = 0
    for name, shape, stored, e in entries:
        if stored == Int64.tag:
            want = Int64.expected_nbytes(shape)
        else:
            want = quantiser_for(stored).expected_nbytes(name, shape, e)
        if e["nbytes"] != want:
            raise CodecError(
                f"tensor {name!r}: the header says {e['nbytes']} stored bytes, shape {list(shape)} as "
                f"{stored} needs {want}"
            )
        total += want
        if total > cap:
            raise CodecError(
                f"payload claims more than {cap} bytes of tensors (at {name!r}): over the size cap, refused "
                "before inflating"
            )
    return total


def _split_body(entries, raw: bytes, quantiser_for) -> tuple[Tensors, Tensors]:
    floats, ints, offset = {}, {}, 0
    for name, shape, stored, e in entries:
        chunk = raw[offset : offset + e["nbytes"]]
        offset += e["nbytes"]
        if stored == Int64.tag:
            ints[name] = Int64.decode_tensor(shape, chunk)
        else:
            floats[name] = quantiser_for(stored).decode_tensor(name, shape, e, chunk)
    return floats, ints


def _assemble(entries, floats: Tensors, ints: Tensors) -> Tensors:
    out = {}
    for name, *_ in entries:
        t = ints[name] if name in ints else floats[name]
        _check_finite(name, t, "the decoded payload")
        out[name] = t
    return out

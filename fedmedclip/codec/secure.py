"""Secure aggregation as a filter on a codec's chain: what a site's update becomes before it is masked, and
how the server turns the sum of the masked payloads back into one module.

The secure form of a codec (`secure_codec`) keeps the codec's bit depth b (the 4-bit codec: b = 4; int8: 8;
fp16 and fp32: 16) and replaces its quantiser and byte coders, because masks cancel only in exact integer
arithmetic and masked bytes do not compress:

    delta > error-feedback > norm-clip(B) > fixed-point(L) > secagg-mask(k) > packed-uint(k)

- `delta`, `error-feedback`: as in the plain codecs (the difference to the global module the site received;
  what the lossy stages leave out is kept at the site and sent in later rounds).
- `norm-clip`: the site bounds its own update (the L2 norm over every float tensor) by B, the run's bound,
  before anything is masked: the server cannot check a single update any more.
- `fixed-point`: x -> clamp(round(w * x / s), -L, L). w is the site's aggregation weight over the whole
  manifest (its sample count share, or 1/n for equal weighting), applied before masking so that the plain sum
  of the sites' integers is the weighted sum; s is the round's public step per tensor (the same at every
  site: `initial_steps`, `next_steps`). L = floor((2^(k-1) - 1) / n), so the sum of n sites' integers never
  leaves [-(2^(k-1) - 1), 2^(k-1) - 1] and wraps nowhere.
- `secagg-mask`: (x + m) mod 2^k, m the site's mask of the round (fedmedclip/secagg: its self-mask plus its
  pairwise masks). The mask is a per-call input, never written to the header.
- `packed-uint`: k bits per value.

k = b + ceil(log2 n) - 1 by default: a 4-bit codec over 3, 10, 30 sites gives k = 5, 7, 8 and L = 5, 6, 4.
The body of a masked payload is d * k / 8 bytes for d values (FedMedCLIP's FAM at ViT-B/32 width, 10 sites:
460 kB), and uniformly distributed.

The server never decodes one masked payload: `MaskedSum` checks each one as it arrives (chain, template,
sizes, the public grid, the site's weight, the reference), adds their stored integers modulo 2^k, and once
the round is unmasked removes the unmasking total and undoes the transforms once, dividing by the weights of
the sites present (the method's weights renormalised over them)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .chain import Codec, Decoded, _assemble
from .quantisers import BlockQuant, Float16, Float32, Int8Rows
from .stages import CodecError, Quantiser, Tensors, TensorTransform, WireContext, numel
from .transforms import Delta, ErrorFeedback, reference_digest
from .wire import unpack

SUFFIX = "+secagg"
MAX_MODULUS_BITS = 24  # masked integers travel through float32 tensors: exact below 2^24
# The grid's step puts GRID_SPREAD standard deviations of a typical site's weighted update at L.
GRID_SPREAD = 3.0
# When a round's aggregate of a tensor is all zeros, its step was too coarse: the next one is this much finer;
# when the sites' values clamped at +-L (the sum of their integers has an rms above GRID_SATURATED * n * L),
# it was too fine: the next one is at least this much coarser.
GRID_SHRINK = 16.0
GRID_SATURATED = 0.5
# The first round's grid fits sites' updates of this share of the bound B. Honest rounds measured on the
# synthetic set move the module by 0.0025 B (FedMedCLIP) to 0.34 B (FACMIC's first round) under the default
# bound (2x the initial module's norm, fedmedclip/federation/robust.py): the grid starts near the low end,
# because a grid too fine still sends something (each site's values clamp at +-L steps: their signs, the rest
# kept in error feedback) and the next grid grows from what was published, while one too coarse sends zeros.
FIRST_ROUND_SHARE = 1 / 4096
_STEP_RANGE = (1e-30, 1e30)


def grid_bits(quantiser: Quantiser) -> int:
    """The per-site bit depth of a codec's quantiser, kept by its secure form (floats: 16 bits)."""
    if isinstance(quantiser, BlockQuant):
        return quantiser.bits
    if isinstance(quantiser, Int8Rows):
        return 8
    if isinstance(quantiser, Float16 | Float32):
        return 16
    raise CodecError(f"quantiser {quantiser.name!r} has no secure-aggregation form")


def modulus_bits(bits: int, sites: int) -> int:
    """k = b + ceil(log2 n) - 1: the smallest ring that holds n sites' sums with a little less than b bits
    of resolution each (see `grid_levels`)."""
    if sites < 1:
        raise CodecError(f"secure aggregation needs at least one site, not {sites}")
    return bits + max(0, math.ceil(math.log2(sites))) - 1 if sites > 1 else bits


def grid_levels(k: int, sites: int) -> int:
    """L: each site's integers lie in [-L, L] so that n of them sum inside Z_(2^k) without wrapping."""
    return (2 ** (k - 1) - 1) // sites


def ring_bits(bits: int) -> int:
    """k, checked: the ring Z_(2^k) that the masks and the packed integers share."""
    if not 2 <= bits <= MAX_MODULUS_BITS:
        raise CodecError(f"the secure-aggregation ring needs 2..{MAX_MODULUS_BITS} bits, got {bits}")
    return int(bits)


class NormClip(TensorTransform):
    """Scales the update down to L2 norm `bound` (over every float tensor) when it is longer. Whether it was
    clipped is not recorded: that would tell the server something about one site's update."""

    name = "norm-clip"

    def __init__(self, bound: float):
        if not (math.isfinite(bound) and bound > 0):
            raise CodecError(f"the update bound must be positive and finite, got {bound!r}")
        self.bound = float(bound)

    def params(self):
        return {"bound": self.bound}

    def forward(self, tensors, ctx):
        norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors.values()))
        if norm <= self.bound:
            return dict(tensors)
        scale = self.bound / norm
        return {n: (t.double() * scale).to(torch.float32) for n, t in tensors.items()}

    def inverse(self, tensors, ctx):
        return tensors


class FixedPoint(TensorTransform):
    """clamp(round(w * x / s), -L, L) per value, with the public step s of each tensor and the sender's weight
    w given as `inputs["fixed-point"] = {"weight": w, "steps": {name: s}}`; both are recorded in the header so
    the receiver checks them. The inverse multiplies by s / w, where the receiver of a sum gives w = the sum
    of the weights of the sites present."""

    name = "fixed-point"

    def __init__(self, levels: int):
        if levels < 1:
            raise CodecError(
                f"secure aggregation leaves each site {levels} levels: too many sites for the ring; "
                "give more modulus bits"
            )
        self.levels = int(levels)

    def params(self):
        return {"levels": self.levels}

    @staticmethod
    def _grid(info, names, where: str) -> tuple[float, dict[str, float]]:
        if not isinstance(info, dict):
            raise CodecError(f"{where}: no fixed-point grid (weight and steps)")
        weight, steps = info.get("weight"), info.get("steps")
        if not isinstance(weight, int | float) or not (math.isfinite(weight) and weight > 0):
            raise CodecError(f"{where}: the aggregation weight {weight!r} is not a positive finite number")
        if not isinstance(steps, dict) or sorted(steps) != sorted(names):
            raise CodecError(f"{where}: the grid's steps must name exactly the tensors {sorted(names)}")
        for name, s in steps.items():
            if not isinstance(s, int | float) or not (_STEP_RANGE[0] <= s <= _STEP_RANGE[1]):
                raise CodecError(f"{where}: tensor {name!r} has step {s!r}, outside {_STEP_RANGE}")
        return float(weight), {n: float(s) for n, s in steps.items()}

    def forward(self, tensors, ctx):
        weight, steps = self._grid(ctx.inputs.get(self.name), list(tensors), "the sender's grid")
        ctx.stage_data[self.name] = {"weight": weight, "steps": steps}
        out = {}
        for n, t in tensors.items():
            scaled = t.double() * (weight / steps[n])
            out[n] = torch.round(scaled).clamp(-self.levels, self.levels).to(torch.float32)
        return out

    def inverse(self, tensors, ctx):
        weight, steps = self._grid(ctx.stage_data.get(self.name), list(tensors), "the payload's grid")
        return {n: (t.double() * (steps[n] / weight)).to(torch.float32) for n, t in tensors.items()}


def _ring_masks(inputs: dict, name: str, tensors: Tensors) -> dict[str, torch.Tensor]:
    masks = inputs.get(name)
    if not isinstance(masks, dict) or sorted(masks) != sorted(tensors):
        raise CodecError("secure aggregation: no mask for every tensor of the update")
    out = {}
    for n, t in tensors.items():
        m = masks[n]
        if not isinstance(m, torch.Tensor) or m.dtype != torch.int64 or tuple(m.shape) != tuple(t.shape):
            raise CodecError(f"secure aggregation: the mask of {n!r} is not an int64 tensor of its shape")
        out[n] = m
    return out


class Mask(TensorTransform):
    """(x + m) mod 2^k on integer-valued tensors; the inverse subtracts m and maps [2^(k-1), 2^k) back to
    negatives. m comes as `inputs["secagg-mask"] = {name: int64 tensor}`: at the site its own mask, at the
    server the unmasking total of the sum."""

    name = "secagg-mask"

    def __init__(self, bits: int):
        self.bits = ring_bits(bits)

    def params(self):
        return {"modulus_bits": self.bits}

    def forward(self, tensors, ctx):
        masks = _ring_masks(ctx.inputs, self.name, tensors)
        ring = 1 << self.bits
        return {
            n: torch.remainder(t.to(torch.int64) + masks[n], ring).to(torch.float32)
            for n, t in tensors.items()
        }

    def inverse(self, tensors, ctx):
        masks = _ring_masks(ctx.inputs, self.name, tensors)
        return {n: centred(t.to(torch.int64) - masks[n], self.bits) for n, t in tensors.items()}


def centred(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers modulo 2^k as the representatives in [-2^(k-1), 2^(k-1)), as float32."""
    ring = 1 << bits
    v = torch.remainder(values, ring)
    return torch.where(v >= ring // 2, v - ring, v).to(torch.float32)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Non-negative integers below 2^bits, `bits` bits each, least significant first."""
    v = values.astype("<u4", copy=False).reshape(-1)
    planes = np.unpackbits(v.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(raw: bytes, n: int, bits: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    if flat[n * bits :].any():
        raise CodecError("packed integers: the padding bits after the last value are not zero")
    planes = flat[: n * bits].reshape(n, bits).astype(np.uint32)
    return planes @ (np.uint32(1) << np.arange(bits, dtype=np.uint32))


class PackedUInt(Quantiser):
    """Integer-valued float tensors in [0, 2^bits), stored with `bits` bits each."""

    name = "packed-uint"
    tag = "packed-uint"

    def __init__(self, bits: int):
        self.bits = ring_bits(bits)

    def params(self):
        return {"bits": self.bits}

    def encode_tensor(self, name, t, coarseness=1.0):
        v = t.reshape(-1).to(torch.float64)
        if v.numel() and (
            bool((v != torch.round(v)).any()) or float(v.min()) < 0 or float(v.max()) >= 2**self.bits
        ):
            raise CodecError(f"tensor {name!r}: packed-uint stores integers in [0, 2^{self.bits}) only")
        return {}, pack_bits(v.to(torch.int64).numpy(), self.bits)

    def expected_nbytes(self, name, shape, entry):
        return -(-numel(shape) * self.bits // 8)

    def decode_tensor(self, name, shape, entry, raw):
        values = unpack_bits(raw, numel(shape), self.bits)
        return torch.from_numpy(values.astype(np.float32)).reshape(shape)


def secure_codec(base: Codec, *, sites: int, bound: float, modulus: int | None = None) -> Codec:
    """The secure form of `base` for a federation of `sites` (see the module's docstring). `modulus`: k,
    by default `modulus_bits(b, sites)`."""
    if base.name.endswith(SUFFIX):
        raise CodecError(f"codec {base.name!r} is already a secure form")
    k = modulus if modulus is not None else modulus_bits(grid_bits(base.quantiser), sites)
    return Codec(
        base.name + SUFFIX,
        PackedUInt(k),
        transforms=(Delta(), ErrorFeedback(), NormClip(bound), FixedPoint(grid_levels(k, sites)), Mask(k)),
        summary=f"{base.summary}, masked for secure aggregation in Z_(2^{k})",
    )


def _secure_stages(codec: Codec) -> tuple[FixedPoint, Mask, NormClip]:
    stages = {type(s): s for s in codec.transforms}
    if not {FixedPoint, Mask, NormClip} <= set(stages):
        raise CodecError(f"codec {codec.name!r} is not a secure-aggregation codec")
    return stages[FixedPoint], stages[Mask], stages[NormClip]


# ------------------------------------------------------------------ the public grid
def float_entries(template: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the float tensors of a template ({name: (shape, dtype)}), in its order: what the
    grid and the masks cover."""
    return [
        (n, tuple(shape))
        for n, (shape, dtype) in template.items()
        if str(dtype).removeprefix("torch.") == "float32"
    ]


def initial_steps(template: dict, bound: float, sites: int, levels: int) -> dict[str, float]:
    """The first round's steps, from the bound B alone (nothing else is public yet): what `next_steps` gives
    after an aggregate of updates of norm FIRST_ROUND_SHARE * B spread over the d values,
    GRID_SPREAD * FIRST_ROUND_SHARE * B / (L * sqrt(d) * sqrt(n)). Where that is too coarse, the first
    aggregate is zero and `next_steps` makes the grid GRID_SHRINK times finer; where it is too fine, values
    clamp and `next_steps` grows it from the published update. Error feedback keeps what was not sent."""
    names = [n for n, _ in float_entries(template)]
    d = sum(numel(tuple(template[n][0])) for n in names)
    if not names or d == 0:
        return {}
    step = GRID_SPREAD * FIRST_ROUND_SHARE * bound / (levels * math.sqrt(d) * math.sqrt(sites))
    return {n: float(min(max(step, _STEP_RANGE[0]), _STEP_RANGE[1])) for n in names}


def next_steps(
    steps: dict[str, float],
    published_update: dict[str, torch.Tensor],
    weight_sum: float,
    present: int,
    levels: int,
) -> dict[str, float]:
    """The next round's public steps from the update the last round published (the new global module as the
    sites received it minus the previous one, per tensor): the sum of the weighted updates it came from is
    weight_sum times it, and each of the `present` sites' weighted updates is taken to span GRID_SPREAD / L
    of that over sqrt(n): s' = GRID_SPREAD * rms(update) * weight_sum / (L * sqrt(n)); s / GRID_SHRINK where
    the update is all zeros (the grid was too coarse for anything to get through), and at least s * GRID_SHRINK
    where the update's sum of integers (weight_sum * update / s) has an rms above GRID_SATURATED * n * L (the
    sites' values clamped, in the same direction: the grid was too fine). Only published modules go in, so the
    grid tells nobody anything beyond them (with DP noise on the aggregate, nothing beyond the noised
    module)."""
    out = {}
    n = max(present, 1)
    for name, s in steps.items():
        u = published_update[name].double()
        rms = float(torch.sqrt((u**2).mean())) if u.numel() else 0.0
        if rms > 0:
            new = GRID_SPREAD * rms * weight_sum / (levels * math.sqrt(n))
            if rms * weight_sum / s > GRID_SATURATED * n * levels:
                new = max(new, s * GRID_SHRINK)
        else:
            new = s / GRID_SHRINK
        out[name] = float(min(max(new, _STEP_RANGE[0]), _STEP_RANGE[1]))
    return out


# ------------------------------------------------------------------ the server's side
class MaskedSum:
    """The server's running sum of one round's masked payloads: each is checked as it arrives (`add`: the
    chain, template and sizes, the round's public grid, the site's weight, the reference it was coded against)
    and its stored integers added modulo 2^k; `unmasked` removes the unmasking total and undoes the chain once,
    dividing by the weights of the sites added. No single payload is ever decoded.

    weights: each site's weight as the manifest gives it; steps: the round's public grid; reference: the
    global module the sites received."""

    def __init__(self, codec: Codec, *, weights, steps, reference: Tensors, template, cap: int):
        self.fixed, self.mask, _ = _secure_stages(codec)
        self.codec, self.weights, self.steps = codec, dict(weights), dict(steps)
        self.reference, self.template, self.cap = reference, template, cap
        self.ring = 1 << self.mask.bits
        self.digest = reference_digest(reference, list(steps)) if steps else None
        self.total: dict[str, torch.Tensor] = {}
        self.entries = None
        self.sites: list[str] = []

    def check(self, site: str, payload: bytes) -> tuple[dict, dict[str, torch.Tensor], list]:
        """(meta, stored integers per float tensor, entries) of `site`'s masked payload, or CodecError."""
        magic, header, body = unpack(payload)
        if header.get("codec") != self.codec.name:
            raise CodecError(f"payload is coded with {header.get('codec')!r}, expected {self.codec.name!r}")
        entries, floats, _, meta, stage_data = self.codec.decode_stored(
            header, body, template=self.template, cap=self.cap
        )
        grid = stage_data.get(self.fixed.name)
        if grid != {"weight": self.weights[site], "steps": self.steps}:
            raise CodecError(
                f"coded on grid {grid!r}, the round's is weight {self.weights[site]!r} and steps {self.steps!r}"
            )
        delta = stage_data.get(Delta.name)
        if not isinstance(delta, dict) or delta.get("reference") != self.digest:
            raise CodecError("coded against another reference module than the global module of the round")
        return meta, {n: t.to(torch.int64) for n, t in floats.items()}, entries

    def add(self, site: str, payload: bytes, check_meta=None) -> dict:
        """Check `site`'s masked payload and add it; its header's meta. CodecError (nothing added) when it
        is not a payload of this round's grid, weight, reference and chain; `check_meta(meta)` may refuse it
        too (raising), before anything is added."""
        if site in self.sites:
            raise CodecError(f"{site}'s masked update is already in the sum")
        meta, ints, entries = self.check(site, payload)
        if check_meta is not None:
            check_meta(meta)
        for name, v in ints.items():
            self.total[name] = torch.remainder(self.total[name] + v, self.ring) if name in self.total else v
        self.entries = entries
        self.sites.append(site)
        return meta

    def unmasked(self, unmask: dict[str, torch.Tensor]) -> tuple[Decoded, dict[str, torch.Tensor]]:
        """The weighted mean of the added sites' updates, and the integer sums per tensor; unmask: the total
        to subtract ({tensor: int64}, the sites' self-masks and the pairwise masks of the sites that dropped).
        CodecError when the unmasked aggregate is beyond what honest sites can produce."""
        if not self.sites:
            raise CodecError("nothing to aggregate: no masked update")
        weights = [self.weights[s] for s in self.sites]
        ctx = WireContext(
            reference=self.reference,
            stage_data={
                Delta.name: {"reference": self.digest},
                self.fixed.name: {"weight": float(sum(weights)), "steps": self.steps},
            },
            inputs={self.mask.name: unmask},
        )
        sums = {n: centred(t - unmask[n], self.mask.bits) for n, t in self.total.items()}
        # Honest sites' integers lie in [-L, L], so their sum in [-m L, m L]: a value outside can only come from
        # a site that sent integers outside its range or masked with something else (exact, not statistical).
        reach = len(self.sites) * self.fixed.levels
        outside = {n: int((t.abs() > reach).sum()) for n, t in sums.items()}
        if any(outside.values()):
            raise CodecError(
                f"the unmasked sum has {sum(outside.values())} values beyond the +-{reach} that {len(self.sites)} "
                "sites' integers can sum to: some site sent integers outside its range or masked them with "
                "something else; the round is refused"
            )
        floats = self.codec.invert({n: t.to(torch.float32) for n, t in self.total.items()}, ctx)
        _check_mean_update(self.codec, floats, self.reference, self.steps, self.template, weights)
        ints = {
            n: self.reference[n].clone()
            for n, *_ in self.entries
            if n not in floats and not self.reference[n].is_floating_point()
        }
        return Decoded(_assemble(self.entries, floats, ints), {}, self.codec.name), sums


def decode_masked_sum(
    codec: Codec,
    payloads: dict[str, bytes],
    *,
    unmask: dict[str, torch.Tensor],
    weights: dict[str, float],
    steps: dict[str, float],
    reference: Tensors,
    template,
    cap: int,
) -> tuple[Decoded, dict[str, torch.Tensor]]:
    """`MaskedSum` of `payloads` ({site: payload}) at once: a payload on another grid, weight, reference or
    chain is a CodecError naming its site."""
    total = MaskedSum(codec, weights=weights, steps=steps, reference=reference, template=template, cap=cap)
    for site, payload in payloads.items():
        try:
            total.add(site, payload)
        except CodecError as exc:
            raise CodecError(f"the masked update of {site}: {exc}") from None
    return total.unmasked(unmask)


def _check_mean_update(codec, floats, reference, steps, template, weights) -> None:
    """The unmasked aggregate is finite and within what honest sites can produce (`mean_update_limit`)."""
    norm = math.sqrt(sum(float(((t.double() - reference[n].double()) ** 2).sum()) for n, t in floats.items()))
    limit = mean_update_limit(codec, steps, template, weights)
    if not norm <= limit:
        raise CodecError(
            f"the unmasked aggregate moves the module by {norm:.6g}, beyond the {limit:.6g} that updates within "
            "the run's bound can: some site sent integers outside its range or masked them with something "
            "else; the round is refused"
        )


def mean_update_limit(codec: Codec, steps: dict[str, float], template, weights: list[float]) -> float:
    """The largest L2 norm the weighted mean of honest sites' updates can have: each site's update is clipped
    to B before masking, and rounding adds at most half a step per value and site (clamping only shrinks).
    So ||sum_k s * S_k|| <= W * B + sqrt(sum_t d_t * (n * s_t / 2)^2), and the mean is that over W, the sum of
    the present sites' weights. An aggregate beyond it, or not finite, is refused: some site sent integers
    outside its range (the sum wrapped) or masked with something else."""
    _, _, clip = _secure_stages(codec)
    n, total = len(weights), float(sum(weights))
    rounding = math.sqrt(sum(numel(tuple(template[t][0])) * (n * s / 2) ** 2 for t, s in steps.items()))
    return clip.bound + rounding / total

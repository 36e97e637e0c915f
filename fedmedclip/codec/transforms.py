"""Tensor transforms: stages that map float tensors to float tensors before quantisation.

`delta` sends the difference to a reference both ends hold, so the quantiser only has to resolve what
changed in one round (an update is ~1/50 of the weights' size for FedMedCLIP's FAM). `error-feedback`
adds the sender's residual from the previous call before quantising; the codec keeps what quantisation
left out as the next residual, so nothing is lost, only delayed. Masking for secure aggregation or DP noise
would be one more class here."""

from __future__ import annotations

import hashlib

import torch

from .stages import CodecError, Tensors, TensorTransform, WireContext


def _check_finite(name: str, t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise CodecError(f"tensor {name!r}: {what} holds NaN or Inf")


def reference_digest(reference: Tensors, names: list[str]) -> str:
    """A fingerprint of the reference tensors a payload was coded against: names, shapes, float32 bytes."""
    h = hashlib.sha256()
    for name in sorted(names):
        t = reference[name].detach().cpu().to(torch.float32).contiguous()
        h.update(f"{name}:{list(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


def _matching(tensors: Tensors, other: Tensors | None, what: str) -> Tensors:
    """`other`'s float32 copies of `tensors`' entries, or a CodecError naming the first that differs."""
    if other is None:
        raise CodecError(f"this codec needs the {what}, and none was given")
    out = {}
    for name, t in tensors.items():
        if name not in other:
            raise CodecError(f"tensor {name!r} is not in the {what}")
        o = other[name]
        if not isinstance(o, torch.Tensor) or tuple(o.shape) != tuple(t.shape):
            got = list(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
            raise CodecError(f"tensor {name!r}: the {what} has shape {got}, the state {list(t.shape)}")
        o = o.detach().cpu().to(torch.float32)
        _check_finite(name, o, f"the {what}")
        out[name] = o
    return out


class Delta(TensorTransform):
    """x - reference on the way out, reference + x on the way in. The payload records the reference's
    digest, so a receiver holding another module (a wrong round, a missed broadcast) refuses the payload
    instead of adding the difference to the wrong weights."""

    name = "delta"
    needs_reference = True

    def forward(self, tensors: Tensors, ctx: WireContext) -> Tensors:
        ref = _matching(tensors, ctx.reference, "reference (the global module both ends hold)")
        ctx.stage_data[self.name] = {"reference": reference_digest(ref, list(ref))}
        out = {}
        for name, t in tensors.items():
            out[name] = t - ref[name]
            _check_finite(name, out[name], "the difference to the reference")
        return out

    def inverse(self, tensors: Tensors, ctx: WireContext) -> Tensors:
        if ctx.reference is None:
            raise CodecError(
                "this payload is a difference to a reference module: decode it with reference= "
                "(the global module the sender received)"
            )
        ref = _matching(tensors, ctx.reference, "reference")
        info = ctx.stage_data.get(self.name)
        recorded = info.get("reference") if isinstance(info, dict) else None
        mine = reference_digest(ref, list(ref))
        if recorded != mine:
            raise CodecError(
                f"this payload was coded against another reference module (digest {recorded!r}, the "
                f"receiver holds {mine!r}): sender and receiver disagree on the global module"
            )
        return {name: ref[name] + t for name, t in tensors.items()}


class ErrorFeedback(TensorTransform):
    """Adds the sender's residual before the lossy stages that follow; the codec computes the new residual
    (what those stages left out) and returns it as `Encoded.memory`. The receiver does nothing."""

    name = "error-feedback"
    keeps_memory = True

    def forward(self, tensors: Tensors, ctx: WireContext) -> Tensors:
        if ctx.memory is None:
            return dict(tensors)
        extra = sorted(set(ctx.memory) - set(tensors))
        if extra:
            raise CodecError(f"error-feedback memory holds tensors the state does not: {extra}")
        memory = _matching(tensors, ctx.memory, "error-feedback memory")
        return {name: t + memory[name] for name, t in tensors.items()}

    def inverse(self, tensors: Tensors, ctx: WireContext) -> Tensors:
        return tensors

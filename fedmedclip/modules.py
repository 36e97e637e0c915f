"""Trainable modules on top of frozen CLIP features (see docs/algorithms.md §2.1, §3.1-3.3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MASK_RULES = ("code", "dst")
MASK_MARGIN = 0.01  # a row (or weight) is kept when mean|W| - t exceeds this


class _MaskStep(torch.autograd.Function):
    """A mask's step 1[s > margin] forward, each rule's surrogate gradient its `backward`. Written with
    `setup_context` and a generated vmap rule so that torch.func (DP-SGD's per-example gradients,
    fedmedclip.privacy) can transform it; plain autograd computes exactly the same."""

    generate_vmap_rule = True
    margin = 0.0

    @classmethod
    def forward(cls, s):
        return (s > cls.margin).to(s.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @classmethod
    def mask(cls, s):
        """The step, through autograd only where gradients are recorded."""
        return cls.apply(s) if torch.is_grad_enabled() else cls.forward(s)


class _CodeStep(_MaskStep):
    """The reference code's step: forward 1[s > 0.01]; backward passes the gradient only where
    |s| > 1. Since |s| is ~0.02 in practice, thresholds and the mask path get zero gradient."""

    margin = MASK_MARGIN

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        return grad * (s.abs() > 1).to(grad.dtype)


class _DSTStep(_MaskStep):
    """Dynamic Sparse Training's estimator: forward 1[s > 0]; derivative 2-4|x| for |x|<=0.4, 0.4 for
    |x|<=1, else 0."""

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        a = s.abs()
        d = torch.where(
            a <= 0.4, 2 - 4 * a, torch.where(a <= 1, torch.full_like(a, 0.4), torch.zeros_like(a))
        )
        return grad * d


class MaskedLinear(nn.Module):
    """Linear layer with a learnable-threshold magnitude mask.

    `code` (default, what the released code effectively does): a row i is kept iff
    mean_j |W_ij| - t_i > 0.01; t gets no gradient, so this is a fixed magnitude rule.
    `dst`: the intended element-wise Dynamic-Sparse-Training mask |W_ij| - t_i > 0 with its
    straight-through estimator, so thresholds actually learn."""

    def __init__(self, in_features: int, out_features: int, mask_rule: str = "code"):
        super().__init__()
        if mask_rule not in MASK_RULES:
            raise ValueError(f"unknown mask rule {mask_rule!r}; choose one of {MASK_RULES}")
        self.mask_rule = mask_rule
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.threshold = nn.Parameter(torch.zeros(out_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.bias, -bound, bound)

    def mask(self) -> torch.Tensor:
        """The effective mask, broadcastable to the weight: [out, 1] (code) or [out, in] (dst)."""
        if self.mask_rule == "code":
            return _CodeStep.mask(self.weight.abs().mean(dim=1) - self.threshold).unsqueeze(1)
        return _DSTStep.mask(self.weight.abs() - self.threshold.unsqueeze(1))

    def reset_if_collapsed(self) -> bool:
        """The reference code resets thresholds when almost everything is masked; True when it did."""
        with torch.no_grad():
            if self.mask().mean() > 0.01:
                return False
            self.threshold.zero_()
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask()
        if self.training and m.mean() <= 0.01:
            self.reset_if_collapsed()
            m = self.mask()
        return F.linear(x, self.weight * m, self.bias)


def per_sample_standardise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """What InstanceNorm1d does to a 2-D (B, D) input in the reference code: it is treated as
    unbatched, so each sample is standardised across its D features (no affine, no running stats)."""
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


class FeatureAdaptationModule(nn.Module):
    """FedMedCLIP's FAM, the only module that travels: a softmax attention over feature dims."""

    def __init__(self, dim: int, mask_rule: str = "code"):
        super().__init__()
        self.fc1 = MaskedLinear(dim, dim, mask_rule)
        self.fc2 = MaskedLinear(dim, dim, mask_rule)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc2(F.relu(per_sample_standardise(self.fc1(f)))), dim=1)


class PrivateMLP(nn.Module):
    """FedMedCLIP's per-site classifier; it never leaves its site. `depth` hidden layers of width `dim` (3 by
    default; 0 is a linear head); `input_norm` standardises the input first (BatchNorm without affine), which
    a linear head needs: the FAM's output is unit-norm, its coordinates about dim^-1/2 and of unequal spread.
    `logit_scale` (a buffer, only when not 1) multiplies the logits of `forward`, the prediction; DP-SGD
    trains through `net` itself (fedmedclip.privacy.dpsgd.reference_normalised), so it never sees the scale."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        mask_rule: str = "code",
        depth: int = 3,
        input_norm: bool = False,
        logit_scale: float = 1.0,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(dim, affine=False)] if input_norm else []
        for _ in range(depth):
            layers += [MaskedLinear(dim, dim, mask_rule), nn.BatchNorm1d(dim), nn.ReLU()]
        layers.append(MaskedLinear(dim, num_classes, mask_rule))
        self.net = nn.Sequential(*layers)
        # None (no entry in the state dict) at 1, so the default MLP's tensors are what they always were.
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)) if logit_scale != 1.0 else None)

    @classmethod
    def for_state(cls, dim: int, num_classes: int, mask_rule: str, state: dict) -> PrivateMLP:
        """An MLP of the shape that `state` (its state_dict) was saved from."""
        return cls(
            dim,
            num_classes,
            mask_rule,
            depth=sum(1 for k in state if k.endswith(".threshold")) - 1,
            input_norm="net.0.running_mean" in state,
            logit_scale=float(state["logit_scale"]) if "logit_scale" in state else 1.0,
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.net(h)
        return z if self.logit_scale is None else z * self.logit_scale


class FacmicAttention(nn.Module):
    """FACMIC's feature attention module (communicated, BN running stats included)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim),
            nn.BatchNorm1d(dim),
            nn.LeakyReLU(0.01),
            nn.Linear(dim, dim),
            nn.Softmax(dim=1),
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


def adapt(attention: nn.Module, f: torch.Tensor) -> torch.Tensor:
    """ĥ = n(a(f) ⊙ f): the attended, L2-normalised feature every method classifies."""
    return F.normalize(attention(f) * f, dim=1)

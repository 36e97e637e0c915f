"""Losses and the ensemble rule, written as in docs/algorithms.md (§2.2, §3.4, §3.7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbone import LOGIT_SCALE


def contrastive_loss(h: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, scale: float = LOGIT_SCALE):
    """CLIP loss as coded: S_ij = scale * ĥ_i · n(t_{y_j}); ½[CE(S, i) + CE(Sᵀ, i)].
    Same-class samples share a text column but still count as negatives."""
    s = scale * h @ F.normalize(text, dim=1)[labels].t()
    target = torch.arange(len(h), device=h.device)
    return 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.t(), target))


def _batchwise_kl(u: torch.Tensor, v: torch.Tensor, temperature: float) -> torch.Tensor:
    """D(u→v) = (1/C) Σ_c KL(softmax_b(v_c/T) ‖ softmax_b(u_c/T)), KL summed over the batch."""
    log_u = F.log_softmax(u / temperature, dim=0)
    log_v = F.log_softmax(v / temperature, dim=0)
    return (log_v.exp() * (log_v - log_u)).sum(dim=0).mean()


def classwise_kl(z: torch.Tensor, sim: torch.Tensor, temperature: float = 2.0, alpha=None) -> torch.Tensor:
    """FedMedCLIP's class-wise mutual distillation between MLP logits z and FAM cosines sim.
    Default (code): ½[D(sim→z) + D(z→sim)]. With alpha (the commented-out intent):
    ½[α·D(sim→z) + (1−α)·D(z→sim)], more pull of the FAM toward the MLP when the MLP is surer."""
    to_mlp = _batchwise_kl(sim, z, temperature)  # KL(P‖Q): target is the MLP's distribution
    to_fam = _batchwise_kl(z, sim, temperature)
    if alpha is None:
        return 0.5 * (to_mlp + to_fam)
    return 0.5 * (alpha * to_mlp + (1 - alpha) * to_fam)


def pseudo_entropy(p: torch.Tensor) -> torch.Tensor:
    """The code's uncertainty H̃(p) = -Σ p·log_softmax(p): log-softmax of *probabilities*, a
    bounded proxy, not Shannon entropy."""
    return -(p * F.log_softmax(p, dim=1)).sum(dim=1)


def shannon_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)


ENTROPIES = {"code": pseudo_entropy, "shannon": shannon_entropy}


def ensemble_weight(p_fam: torch.Tensor, p_mlp: torch.Tensor, entropy: str = "code") -> torch.Tensor:
    """α_b = H(p_fam) / (H(p_fam) + H(p_mlp)): the MLP's share, larger when the FAM is less sure."""
    h = ENTROPIES[entropy]
    hf, hm = h(p_fam), h(p_mlp)
    return hf / (hf + hm).clamp_min(1e-12)


def ensemble(p_fam: torch.Tensor, p_mlp: torch.Tensor, entropy: str = "code") -> torch.Tensor:
    a = ensemble_weight(p_fam, p_mlp, entropy).unsqueeze(1)
    return (1 - a) * p_fam + a * p_mlp


def gaussian_kernel_sum(
    x: torch.Tensor, bandwidth: str = "mean", kernel_mul: float = 2.0, kernel_num: int = 5
):
    """K = Σ_i exp(-D/σ_i) over σ ∈ bw·mul^{-2..2} with D the squared distances and bw their mean
    (code) or median (paper) over off-diagonal pairs, detached."""
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    n = len(x)
    off = d[~torch.eye(n, dtype=torch.bool, device=x.device)].detach()
    bw = off.sum() / (n * n - n) if bandwidth == "mean" else off.median()
    bw = bw / kernel_mul ** (kernel_num // 2)
    return sum(torch.exp(-d / (bw * kernel_mul**i)) for i in range(kernel_num))


def lmmd_loss(
    source: torch.Tensor,
    target: torch.Tensor,
    source_labels: torch.Tensor,
    target_probs: torch.Tensor,
    num_classes: int,
    bandwidth: str = "mean",
) -> torch.Tensor:
    """Local MMD (DSAN) between labelled source and pseudo-labelled target features."""
    b = len(source)
    s_onehot = F.one_hot(source_labels, num_classes).to(source.dtype)
    s_count = s_onehot.sum(0)
    s_w = s_onehot / torch.where(s_count > 0, s_count, torch.full_like(s_count, 100.0))
    t_mass = target_probs.sum(0)
    t_w = target_probs / torch.where(t_mass > 0, t_mass, torch.full_like(t_mass, 100.0))
    shared = (s_count > 0) & torch.isin(
        torch.arange(num_classes, device=source.device), target_probs.argmax(1)
    )
    if not shared.any():
        return source.sum() * 0
    s_w, t_w = s_w[:, shared], t_w[:, shared]
    k = int(shared.sum())
    w_ss, w_tt, w_st = s_w @ s_w.t() / k, t_w @ t_w.t() / k, s_w @ t_w.t() / k
    kern = gaussian_kernel_sum(torch.cat([source, target]), bandwidth)
    loss = (w_ss * kern[:b, :b]).sum() + (w_tt * kern[b:, b:]).sum() - 2 * (w_st * kern[:b, b:]).sum()
    # The reference returns 0 when the kernel degenerates (NaN) rather than poisoning the step.
    return source.sum() * 0 if torch.isnan(loss) else loss

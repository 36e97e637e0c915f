"""Every loss against an independent, loop-by-loop implementation of its formula (algorithms.md §2.2,
§3.4, §3.7). The references use plain Python floats and `math`, never the torch functions under test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedmedclip import losses
from fedmedclip.losses import (
    classwise_kl,
    contrastive_loss,
    ensemble,
    ensemble_weight,
    lmmd_loss,
    pseudo_entropy,
    shannon_entropy,
)

# ----------------------------------------------------------------------------- plain-Python references


def _l(t) -> list:
    return t.detach().double().tolist()


def _norm(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _softmax(xs: list[float]) -> list[float]:
    lse = _logsumexp(xs)
    return [math.exp(x - lse) for x in xs]


def ref_contrastive(h, text, labels, scale=100.0) -> float:
    h, text, labels = _l(h), _l(text), [int(y) for y in labels]
    tn = [_norm(t) for t in text]
    b = len(h)
    s = [[scale * _dot(h[i], tn[labels[j]]) for j in range(b)] for i in range(b)]
    st = [[s[j][i] for j in range(b)] for i in range(b)]

    def ce(m):  # mean over rows of -log softmax(row)[i]
        return sum(_logsumexp(m[i]) - m[i][i] for i in range(b)) / b

    return 0.5 * (ce(s) + ce(st))


def ref_batch_kl(u, v, temperature) -> float:
    """D(u→v) = (1/C) Σ_c KL(softmax_b(v_c/T) ‖ softmax_b(u_c/T)), KL summed over the batch."""
    u, v = _l(u), _l(v)
    b, c = len(u), len(u[0])
    total = 0.0
    for k in range(c):
        p = _softmax([v[i][k] / temperature for i in range(b)])
        q = _softmax([u[i][k] / temperature for i in range(b)])
        total += sum(p[i] * math.log(p[i] / q[i]) for i in range(b))
    return total / c


def ref_pseudo_entropy(row: list[float]) -> float:
    lse = _logsumexp(row)
    return -sum(p * (p - lse) for p in row)


def ref_shannon(row: list[float]) -> float:
    return -sum(p * math.log(p) for p in row if p > 0)


def ref_lmmd(x, z, y, q, num_classes, bandwidth="mean", bw_fixed=None) -> float:
    """DSAN's LMMD written out: class weights, C* = source classes ∩ target argmax, 5 Gaussian kernels."""
    x, z, q, y = _l(x), _l(z), _l(q), [int(v) for v in y]
    b = len(x)
    pts = x + z
    n = len(pts)
    d = [[sum((a - c) ** 2 for a, c in zip(pts[i], pts[j], strict=True)) for j in range(n)] for i in range(n)]
    off = sorted(d[i][j] for i in range(n) for j in range(n) if i != j)
    if bw_fixed is not None:
        bw = bw_fixed
    elif bandwidth == "mean":
        bw = sum(off) / (n * n - n)
    else:
        bw = off[(len(off) - 1) // 2]
    sigmas = [bw / 4, bw / 2, bw, bw * 2, bw * 4]
    kern = [[sum(math.exp(-d[i][j] / s) for s in sigmas) for j in range(n)] for i in range(n)]

    n_c = [sum(1 for v in y if v == c) for c in range(num_classes)]
    s_w = [[(1.0 / n_c[c] if y[i] == c else 0.0) for c in range(num_classes)] for i in range(b)]
    mass = [sum(q[j][c] for j in range(b)) for c in range(num_classes)]
    r_w = [[q[j][c] / mass[c] for c in range(num_classes)] for j in range(b)]
    t_arg = {max(range(num_classes), key=lambda c, j=j: q[j][c]) for j in range(b)}
    shared = sorted(set(y) & t_arg)
    if not shared:
        return 0.0
    k = len(shared)
    loss = 0.0
    for i in range(b):
        for j in range(b):
            w_ss = sum(s_w[i][c] * s_w[j][c] for c in shared) / k
            w_tt = sum(r_w[i][c] * r_w[j][c] for c in shared) / k
            w_st = sum(s_w[i][c] * r_w[j][c] for c in shared) / k
            loss += w_ss * kern[i][j] + w_tt * kern[b + i][b + j] - 2 * w_st * kern[i][b + j]
    return loss


# ----------------------------------------------------------------------------- contrastive


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrastive_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    b, c, d = 6, 3, 5
    h = F.normalize(torch.randn(b, d, generator=g), dim=1)
    text = torch.randn(c, d, generator=g) * 3  # raw, unnormalised prompt features
    labels = torch.tensor([0, 2, 1, 0, 2, 2])  # repeated classes: identical columns, still negatives
    got = contrastive_loss(h, text, labels).item()
    assert got == pytest.approx(ref_contrastive(h, text, labels), rel=1e-5, abs=1e-6)
    # a different scale is honoured
    got10 = contrastive_loss(h, text, labels, scale=10.0).item()
    assert got10 == pytest.approx(ref_contrastive(h, text, labels, 10.0), rel=1e-5, abs=1e-6)
    assert got10 != pytest.approx(got, rel=1e-3)


def test_contrastive_same_class_counts_as_negative():
    # All samples share one class: every column of S is the same text, so each row of S is constant
    # and CE(S, i) is exactly log B (no sample is singled out as "its own" text).
    h = F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(3)), dim=1)
    text = torch.randn(2, 3)
    loss = contrastive_loss(h, text, torch.zeros(4, dtype=torch.long)).item()
    assert loss == pytest.approx(ref_contrastive(h, text, [0, 0, 0, 0]), rel=1e-6)
    s_t = 100 * h @ F.normalize(text, dim=1)[0]  # row i of Sᵀ is this vector for every i
    ce_t = sum(_logsumexp(s_t.tolist()) - s_t[i].item() for i in range(4)) / 4
    assert loss == pytest.approx(0.5 * (math.log(4) + ce_t), rel=1e-5)


# ----------------------------------------------------------------------------- class-wise KL


def _kl_inputs(seed=0, b=5, c=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * 2, torch.rand(b, c, generator=g) * 2 - 1


@pytest.mark.parametrize("seed", [0, 1])
def test_classwise_kl_symmetric_default(seed):
    z, sim = _kl_inputs(seed)
    want = 0.5 * (ref_batch_kl(sim, z, 2.0) + ref_batch_kl(z, sim, 2.0))
    assert classwise_kl(z, sim).item() == pytest.approx(want, rel=1e-5)
    # symmetric in its arguments, zero for identical inputs, other temperatures honoured
    assert classwise_kl(sim, z).item() == pytest.approx(want, rel=1e-5)
    assert classwise_kl(z, z).item() == pytest.approx(0.0, abs=1e-7)
    want_t1 = 0.5 * (ref_batch_kl(sim, z, 1.0) + ref_batch_kl(z, sim, 1.0))
    assert classwise_kl(z, sim, temperature=1.0).item() == pytest.approx(want_t1, rel=1e-5)


def test_classwise_kl_is_over_the_batch_not_the_classes():
    # Adding a per-sample constant to every class leaves a class softmax unchanged but changes a
    # softmax over the batch: the loss must change (a per-class-column softmax over b).
    z, sim = _kl_inputs(4)
    shifted = z + torch.arange(5.0).unsqueeze(1)
    assert classwise_kl(shifted, sim).item() != pytest.approx(classwise_kl(z, sim).item(), rel=1e-3)
    # ...while a per-class constant (over the batch) leaves it unchanged.
    col = z + torch.tensor([[3.0, -1.0, 7.0]])
    assert classwise_kl(col, sim).item() == pytest.approx(classwise_kl(z, sim).item(), rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_classwise_kl_alpha_weighted(alpha):
    z, sim = _kl_inputs(2)
    d_sim_to_z = ref_batch_kl(sim, z, 2.0)  # KL(P‖Q): P from the MLP logits z, Q from the FAM cosines
    d_z_to_sim = ref_batch_kl(z, sim, 2.0)
    assert d_sim_to_z != pytest.approx(d_z_to_sim, rel=1e-3)  # the two directions really differ
    want = 0.5 * (alpha * d_sim_to_z + (1 - alpha) * d_z_to_sim)
    got = classwise_kl(z, sim, 2.0, alpha=torch.tensor(alpha)).item()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_classwise_kl_gradients_reach_both_sides():
    z, sim = _kl_inputs(5)
    z.requires_grad_(True)
    sim.requires_grad_(True)
    classwise_kl(z, sim).backward()
    assert z.grad.abs().sum() > 0 and sim.grad.abs().sum() > 0  # neither side detached


# ----------------------------------------------------------------------------- entropies and ensemble


def test_pseudo_entropy_and_shannon_match_reference():
    p = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 3, dim=1)
    p = torch.cat([p, torch.tensor([[1.0, 0.0, 0.0, 0.0]])])  # a one-hot row: 0·log 0 = 0
    for row, ht, hs in zip(_l(p), pseudo_entropy(p).tolist(), shannon_entropy(p).tolist(), strict=True):
        assert ht == pytest.approx(ref_pseudo_entropy(row), rel=1e-5)
        assert hs == pytest.approx(ref_shannon(row), rel=1e-5, abs=1e-7)


def test_pseudo_entropy_bounds_for_two_classes():
    # The doc's numbers: for C = 2, H̃ lies in [log(1+e) - 1, log 2] = [0.313, 0.693].
    lo = pseudo_entropy(torch.tensor([[1.0, 0.0]])).item()
    hi = pseudo_entropy(torch.tensor([[0.5, 0.5]])).item()
    assert lo == pytest.approx(math.log(1 + math.e) - 1, rel=1e-6)
    assert hi == pytest.approx(math.log(2), rel=1e-6)
    mid = pseudo_entropy(torch.tensor([[0.8, 0.2]])).item()
    assert lo < mid < hi


@pytest.mark.parametrize("entropy", ["code", "shannon"])
def test_ensemble_weights_and_probabilities(entropy):
    g = torch.Generator().manual_seed(7)
    p_fam = torch.softmax(torch.randn(5, 3, generator=g) * 4, dim=1)
    p_mlp = torch.softmax(torch.randn(5, 3, generator=g), dim=1)
    h = ref_pseudo_entropy if entropy == "code" else ref_shannon
    a = ensemble_weight(p_fam, p_mlp, entropy)
    ens = ensemble(p_fam, p_mlp, entropy)
    for b, (pf, pm) in enumerate(zip(_l(p_fam), _l(p_mlp), strict=True)):
        alpha = h(pf) / (h(pf) + h(pm))  # the MLP's share: larger when the FAM is less sure
        assert a[b].item() == pytest.approx(alpha, rel=1e-5)
        for c in range(3):
            assert ens[b, c].item() == pytest.approx((1 - alpha) * pf[c] + alpha * pm[c], rel=1e-5)
    assert torch.allclose(ens.sum(1), torch.ones(5))


def test_ensemble_leans_on_the_confident_member_and_entropies_differ():
    sure = torch.tensor([[0.98, 0.01, 0.01]])
    unsure = torch.tensor([[0.34, 0.33, 0.33]])
    assert ensemble_weight(sure, unsure).item() < 0.5 < ensemble_weight(unsure, sure).item()
    # The true entropy gives more extreme weights than the bounded proxy (§3.7).
    code, shannon = (
        ensemble_weight(sure, unsure, "code").item(),
        ensemble_weight(sure, unsure, "shannon").item(),
    )
    assert shannon < code


# ----------------------------------------------------------------------------- LMMD


def _lmmd_inputs(seed, b, c, d=4):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g), dim=1)
    z = F.normalize(torch.randn(b, d, generator=g) + 0.5, dim=1)
    q = torch.softmax(torch.randn(b, c, generator=g) * 3, dim=1)
    return x, z, q


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lmmd_mean_bandwidth_matches_dsan(seed):
    b, c = 6, 4
    x, z, q = _lmmd_inputs(seed, b, c)
    y = torch.tensor([0, 1, 1, 2, 0, 3])
    got = lmmd_loss(x, z, y, q, c).item()
    want = ref_lmmd(x, z, y, q, c)
    assert want != 0.0
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_lmmd_weights_only_shared_classes():
    # Source has classes {0, 1}; target argmax is {1, 2}: only class 1 is in C*.
    b, c = 4, 3
    x, z, _ = _lmmd_inputs(9, b, c)
    y = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([[0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.1, 0.7, 0.2], [0.05, 0.15, 0.8]])
    got = lmmd_loss(x, z, y, q, c).item()
    assert got == pytest.approx(ref_lmmd(x, z, y, q, c), rel=1e-4, abs=1e-6)
    # Changing the mass of a class outside C* (class 0 in q) must not matter once re-normalised...
    q2 = q.clone()
    q2[:, 0] *= 0.5
    q2 = q2 / q2.sum(1, keepdim=True)
    assert lmmd_loss(x, z, y, q2, c).item() == pytest.approx(ref_lmmd(x, z, y, q2, c), rel=1e-4, abs=1e-6)


def test_lmmd_median_bandwidth():
    # B = 3 -> 6 points, 30 off-diagonal distances (15 distinct pairs): the median is unambiguous.
    b, c = 3, 2
    x, z, q = _lmmd_inputs(4, b, c)
    y = torch.tensor([0, 1, 1])
    q = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    got = lmmd_loss(x, z, y, q, c, bandwidth="median").item()
    assert got == pytest.approx(ref_lmmd(x, z, y, q, c, "median"), rel=1e-4, abs=1e-6)
    assert got != pytest.approx(lmmd_loss(x, z, y, q, c).item(), rel=1e-3)


def test_gaussian_kernel_sum_bandwidths():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    k = losses.gaussian_kernel_sum(pts)
    # squared distances 1, 4, 5 (each twice): mean bw = 10/3; sigmas bw/4 .. 4bw
    bw = (1 + 4 + 5) * 2 / 6
    for (i, j), dist in {(0, 1): 1.0, (0, 2): 4.0, (1, 2): 5.0, (1, 1): 0.0}.items():
        want = sum(math.exp(-dist / (bw * m)) for m in (0.25, 0.5, 1, 2, 4))
        assert k[i, j].item() == pytest.approx(want, rel=1e-5)


def test_lmmd_is_zero_without_shared_classes_and_on_degenerate_kernel():
    b, c = 4, 3
    x, z, _ = _lmmd_inputs(5, b, c)
    x.requires_grad_(True)
    y = torch.tensor([0, 0, 0, 0])
    q = torch.tensor([[0.1, 0.8, 0.1]] * 2 + [[0.1, 0.1, 0.8]] * 2)  # target argmax {1, 2}
    loss = lmmd_loss(x, z, y, q, c)
    assert loss.item() == 0.0 and ref_lmmd(x, z, y, q, c) == 0.0
    loss.backward()  # still a graph: the training step can call backward unconditionally
    assert torch.count_nonzero(x.grad) == 0
    # All points identical: bandwidth 0 -> NaN kernel -> the reference returns 0.
    same = torch.ones(b, 3) / math.sqrt(3)
    q1 = torch.tensor([[0.9, 0.05, 0.05]] * b)
    assert lmmd_loss(same.clone(), same.clone(), y, q1, c).item() == 0.0


def test_lmmd_gradient_treats_bandwidth_as_constant():
    # Autograd's gradient w.r.t. the source must equal finite differences of the reference with the
    # bandwidth frozen at its unperturbed value (the bandwidth is detached in DSAN).
    b, c = 4, 2
    x, z, _ = _lmmd_inputs(6, b, c, d=3)
    x = x.double()
    z = z.double()
    y = torch.tensor([0, 1, 1, 0])
    q = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.4, 0.6], [0.9, 0.1]], dtype=torch.float64)
    xs = x.clone().requires_grad_(True)
    lmmd_loss(xs, z, y, q, c).backward()
    pts = torch.cat([x, z])
    d2 = ((pts[:, None] - pts[None]) ** 2).sum(-1)
    bw = (d2.sum() / (len(pts) ** 2 - len(pts))).item()
    eps = 1e-6
    for i in range(b):
        for k in range(3):
            xp, xm = x.clone(), x.clone()
            xp[i, k] += eps
            xm[i, k] -= eps
            fd = (ref_lmmd(xp, z, y, q, c, bw_fixed=bw) - ref_lmmd(xm, z, y, q, c, bw_fixed=bw)) / (2 * eps)
            assert xs.grad[i, k].item() == pytest.approx(fd, rel=1e-4, abs=1e-7)


def test_facmic_step_sends_lmmd_gradient_only_through_the_source(monkeypatch):
    """In FACMIC's training step (code default) the target features are raw and the pseudo-labels
    are computed without gradient, so the model is reached only through the source features."""
    from fedmedclip.methods import MethodContext, SiteData, facmic

    seen = []

    def spy(source, target, source_labels, target_probs, *args, **kw):
        seen.append((source.requires_grad, target.requires_grad, target_probs.requires_grad))
        return losses.lmmd_loss(source, target, source_labels, target_probs, *args, **kw)

    monkeypatch.setattr(facmic, "lmmd_loss", spy)
    g = torch.Generator().manual_seed(0)
    d, c = 8, 3
    text = torch.randn(c, d, generator=g)
    x, y = torch.randn(12, d, generator=g), torch.arange(12) % c
    data = SiteData("s", x, y, x[:3], y[:3], x[:3], y[:3], reference_x=torch.randn(10, d, generator=g))
    for masked in (False, True):
        seen.clear()
        opts = {"local_steps": 2, "masked_target": masked}
        m = facmic.Facmic(MethodContext(d, c, text, batch_size=4, options=opts))
        m.new_site(data, 0).train_round(1)
        assert len(seen) == 2
        for src, tgt, probs in seen:
            assert src and not probs
            # Default: raw target, no path to the model; the paper variant masks the target with it.
            assert tgt == masked

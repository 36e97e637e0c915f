"""How FedMedCLIP and FACMIC put their parts together where test_method_composition.py does not look: the
uncertainty share of `kd_adaptive`, the batch order (a function of the run's seed, the site and the round),
each site's own initialisation, `local_epochs`, a site taking the global FAM it receives, and FACMIC
predicting through its attention. Each test was written against a single-line change that used to pass the
whole suite (issue 20); all run on small tensors, without ../shared."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_method_composition import (
    B,
    C,
    D,
    _assert_grads,
    _fedmedclip_site,
    _grads,
    _leaves,
    _randn,
    _record_grads,
    _site_data,
    hand_contrastive,
    hand_fam,
    hand_mlp,
)

from fedmedclip.methods import MethodContext
from fedmedclip.methods.facmic import Facmic
from fedmedclip.methods.fedmedclip_method import FedMedClip

# ----------------------------------------------------------------------------- kd_adaptive


def hand_batch_kl(target, other, temperature):
    """(1/C)·Σ_c KL(softmax_b(target_c/T) ‖ softmax_b(other_c/T)), KL summed over the batch (§3.4)."""
    p = torch.softmax(target / temperature, dim=0)
    q = torch.softmax(other / temperature, dim=0)
    return (p * (p.log() - q.log())).sum(0).mean()


def _kd_adaptive_expected(site, text, kd_weight, temperature):
    """One FedMedCLIP step with kd_adaptive and Shannon entropy, by hand: the KL term is
    ½[α·KL(P_mlp‖P_fam) + (1−α)·KL(P_fam‖P_mlp)] (the pull of the FAM toward the MLP weighted by the MLP's
    share), α = mean_b H(p_fam)/(H(p_fam) + H(p_mlp)) without gradient, p_fam = softmax(100·ĥ·T̂ᵀ) and
    p_mlp = softmax(MLP(ĥ)). Returns the loss and gradients, and the loss the swapped share 1−α would give."""
    p = {
        **{"fam." + k: v for k, v in _leaves(site.fam).items()},
        **{"mlp." + k: v for k, v in _leaves(site.mlp).items()},
    }
    f, y, t = site.data.train_x.double(), site.data.train_y, text.double()
    h = F.normalize(hand_fam(p, f) * f, dim=1)
    z = hand_mlp(p, h)
    sim = h @ F.normalize(t, dim=1).t()
    entropy = lambda q: -(q * q.log()).sum(1)  # noqa: E731
    h_fam, h_mlp = entropy(torch.softmax(100 * sim, dim=1)), entropy(torch.softmax(z, dim=1))
    alpha = (h_fam / (h_fam + h_mlp)).mean().detach()
    toward_mlp, toward_fam = hand_batch_kl(z, sim, temperature), hand_batch_kl(sim, z, temperature)
    base = hand_contrastive(h, t, y) + (torch.logsumexp(z, dim=1) - z[torch.arange(len(y)), y]).mean()

    def loss_with(a):
        return base + kd_weight * 0.5 * (a * toward_mlp + (1 - a) * toward_fam)

    loss = loss_with(alpha)
    swapped = float(loss_with(1 - alpha).detach())
    return float(loss.detach()), _grads(loss, p), swapped, float(alpha)


def test_kd_adaptive_weighs_the_pull_toward_the_mlp_by_the_mlps_uncertainty_share():
    """The share α compares the FAM's uncertainty with the MLP's, each computed from its own prediction:
    computed with the two swapped, the step takes 1−α."""
    # A sharp temperature makes the two KL directions differ, so that their weighting shows in the step.
    kd_weight, temperature = 5.0, 0.05
    m, site, text = _fedmedclip_site(
        kd_adaptive=True, entropy="shannon", kd_weight=kd_weight, kd_temperature=temperature
    )
    want_loss, want_grads, swapped_loss, alpha = _kd_adaptive_expected(site, text, kd_weight, temperature)
    assert abs(alpha - 0.5) > 0.2  # the FAM and the MLP really differ in confidence
    assert abs(swapped_loss - want_loss) > 1e-3 * abs(want_loss)  # the swap would show 100x over tolerance
    got: dict[str, torch.Tensor] = {}
    _record_grads(site.fam, got, "fam.")
    _record_grads(site.mlp, got, "mlp.")
    assert site.train_round(1)["loss"] == pytest.approx(want_loss, rel=1e-5)
    _assert_grads(got, want_grads)


# ----------------------------------------------------------------------------- batch order and epochs


def _fedmedclip(seed=0, **options) -> FedMedClip:
    return FedMedClip(MethodContext(D, C, _randn(0, C, D), seed=seed, batch_size=B, options=options))


def batches_seen(site, round_index: int) -> list[list[int]]:
    """The batches (as row indices of the site's training split) that one round of training fed the FAM."""
    seen: list[torch.Tensor] = []
    hook = site.fam.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        site.train_round(round_index)
    finally:
        hook.remove()
    rows = site.data.train_x
    return [[int((rows == x).all(1).nonzero()) for x in batch] for batch in seen]


N_TRAIN = 12  # three batches of B = 4 per epoch


def _order(seed: int, site_index: int, round_index: int, **options) -> list[list[int]]:
    m = _fedmedclip(seed, **options)
    return batches_seen(m.new_site(_site_data(N_TRAIN), site_index), round_index)


def test_fedmedclip_draws_a_new_batch_order_every_round_and_every_seed():
    """Every draw is a function of (seed, site, round): each round is one pass over the site's images in an
    order of its own; another seed gives other orders; the same (seed, site, round) gives the same one (what
    an exact resume relies on)."""
    orders = {r: _order(0, 0, r) for r in (1, 2, 3)}
    for batches in orders.values():
        assert len(batches) == N_TRAIN // B
        assert sorted(i for b in batches for i in b) == list(range(N_TRAIN))  # one epoch
    assert len({str(o) for o in orders.values()}) == 3  # no two rounds alike
    for r in (1, 2):
        assert _order(1, 0, r) != orders[r]  # the run's seed matters
        assert _order(0, 1, r) != orders[r]  # and the site
        assert _order(0, 0, r) == orders[r]  # nothing else does


def test_fedmedclip_local_epochs_takes_effect():
    """local_epochs=2: two passes over the site's images in a round, each image seen twice."""
    batches = _order(0, 0, 1, local_epochs=2)
    assert len(batches) == 2 * N_TRAIN // B
    assert sorted(i for b in batches for i in b) == sorted(2 * list(range(N_TRAIN)))
    m = _fedmedclip(local_epochs=2)
    assert m.new_site(_site_data(N_TRAIN), 0).train_round(1)["steps"] == 2 * N_TRAIN // B


# ----------------------------------------------------------------------------- each site's own modules


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_each_site_initialises_its_own_private_mlp_and_fam():
    """Site k's MLP and FAM start from a draw of its own (seeded by the run and the site): two sites never
    start alike, the same site always does."""
    m, data = _fedmedclip(), _site_data()
    first, second, again = m.new_site(data, 0), m.new_site(data, 1), m.new_site(data, 0)
    for part in ("mlp", "fam"):
        differs = _differs(_state(getattr(first, part)), _state(getattr(second, part)))
        assert differs, f"sites 0 and 1 start with the same {part}"
        differs = _differs(_state(getattr(first, part)), _state(getattr(again, part)))
        assert not differs, f"site 0 starts with another {part} each time"


def test_a_fedmedclip_site_takes_the_global_fam_it_receives():
    """After receiving a global module the site's FAM is that module: what it would send back untrained is
    exactly what it received, and it adapts features as the received module does."""
    m = _fedmedclip()
    site = m.new_site(_site_data(), 0)
    g = torch.Generator().manual_seed(3)
    received = {
        k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in m.shared_state(m.new_global()).items()
    }
    site.load_shared(received)
    sent = site.shared_update()
    assert set(sent) == set(received)
    assert all(torch.equal(sent[k], received[k]) for k in received)
    module = m.new_global()
    module.load_state_dict(received, strict=False)
    x = _randn(4, 5, D)
    site.fam.eval()
    module.eval()
    with torch.no_grad():
        assert torch.equal(site.fam(x), module(x))


# ----------------------------------------------------------------------------- FACMIC's prediction


def hand_attention_eval(s, f):
    """FACMIC's attention at prediction (§2.1), BatchNorm with its running statistics:
    softmax(W2·LeakyReLU_0.01(BN_eval(W1 f + b1)) + b2)."""
    a = f @ s["net.0.weight"].t() + s["net.0.bias"]
    a = (a - s["net.1.running_mean"]) / torch.sqrt(s["net.1.running_var"] + 1e-5) * s["net.1.weight"]
    a = F.leaky_relu(a + s["net.1.bias"], 0.01)
    return torch.softmax(a @ s["net.3.weight"].t() + s["net.3.bias"], dim=1)


def test_facmic_predicts_through_its_attention():
    """A FACMIC site's prediction, and the global one, is softmax(100·cos(n(a(f)⊙f), t_c)) with the attention
    a in evaluation mode, not zero-shot on the raw features (here the two disagree on most images)."""
    text = _randn(0, C, D)
    m = Facmic(MethodContext(D, C, text, batch_size=B, options={"local_steps": 1}))
    g = torch.Generator().manual_seed(5)
    state = {}
    for k, v in m.shared_state(m.new_global()).items():
        if k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif v.is_floating_point():
            state[k] = v + torch.randn(v.shape, generator=g)
        else:
            state[k] = v.clone()
    tn = F.normalize(text, dim=1)
    # Images between two classes' prompts, where the attention decides.
    x = torch.stack([tn[a] + tn[b] for a in range(C) for b in range(C) if a != b] * 2) * 2
    x = x + 0.3 * torch.randn(x.shape, generator=g)
    s64 = {k: v.double() for k, v in state.items()}
    h = F.normalize(hand_attention_eval(s64, x.double()) * x.double(), dim=1)
    want = torch.softmax(100 * h @ tn.double().t(), dim=1).float()
    raw = torch.softmax(100 * F.normalize(x, dim=1) @ tn.t(), dim=1)
    assert int((want.argmax(1) != raw.argmax(1)).sum()) >= len(x) // 3

    site = m.new_site(_site_data(text=text), 0)
    site.load_shared(state)
    torch.testing.assert_close(site.probs(x), want, rtol=1e-4, atol=1e-5)
    module = m.new_global()
    module.load_state_dict(state)
    torch.testing.assert_close(m.global_probs(module, x), want, rtol=1e-4, atol=1e-5)

"""How each method puts its losses, schedules and state together, re-derived by hand from
docs/algorithms.md on small tensors: one real training step of the method, observed through
gradient hooks, its reported loss and its parameters, against the same step written out here with plain
torch autograd (never the fedmedclip losses or modules under test). The loss functions themselves are
tested in test_losses.py; these tests catch a method that composes correct parts wrongly (a detached input,
a missing factor, a wrong weight or schedule), which no loss test can see.

Also here: the fidelity fixes that live in the methods (local_epochs taking effect, FAM thresholds reset on
receipt with mask_rule=dst, FACMIC's BatchNorm statistics moved once per target batch)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fedmedclip.config import TrainConfig
from fedmedclip.errors import ConfigError
from fedmedclip.methods import METHODS, MethodContext, SiteData, resolved_options
from fedmedclip.methods.facmic import Facmic
from fedmedclip.methods.fedfocal import focal_smoothed
from fedmedclip.methods.fedmedclip_method import FedMedClip

D, C, B = 6, 3, 4  # feature dim, classes, batch: one batch is the whole training split


def _randn(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _site_data(n_train: int = B, text: torch.Tensor | None = None) -> SiteData:
    """A site's features; with `text`, also an unlabelled reference set of B images each close to the
    boundary between two classes' prompts, so that the attention mask changes their pseudo-labels."""
    x, y = _randn(1, n_train, D), torch.arange(n_train) % C
    ref = None
    if text is not None:
        tn = F.normalize(text, dim=1)
        ref = torch.stack([tn[a] + tn[b] for a, b in ((0, 1), (1, 2), (2, 0), (0, 1))]) * 2
        ref = ref + 0.05 * _randn(2, B, D)
    return SiteData("s", x, y, x[:2], y[:2], x[:2], y[:2], reference_x=ref)


def _leaves(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters as float64 leaves: the hand-written step differentiates these."""
    return {k: p.detach().double().clone().requires_grad_(True) for k, p in module.named_parameters()}


def _record_grads(module: torch.nn.Module, into: dict[str, torch.Tensor], prefix: str) -> None:
    for k, p in module.named_parameters():
        p.register_hook(lambda g, k=prefix + k: into.__setitem__(k, g.detach().clone()))


def _assert_grads(got: dict, want: dict) -> None:
    """Every parameter's gradient, to 1e-3 relative, or 1e-4 of the largest gradient of the step (some are
    exactly 0 by construction, e.g. a bias in front of a BatchNorm, and come out as float32 noise)."""
    assert set(got) == set(want)
    scale = max(float(w.abs().max()) for w in want.values())
    for k in want:
        w = want[k].detach().float()
        torch.testing.assert_close(got[k], w, rtol=1e-3, atol=1e-4 * scale, msg=lambda m, k=k: f"{k}: {m}")


def _grads(loss, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d loss / d every parameter; one the loss does not use (an inert threshold) gets zeros."""
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {
        k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads, strict=True)
    }


# ----------------------------------------------------------------------------- the losses, by hand


def hand_contrastive(h, text, labels):
    """L_con (§2.2): S_ij = 100·ĥ_i·n(t_{y_j}); ½[CE(S, i) + CE(Sᵀ, i)]."""
    s = 100.0 * h @ F.normalize(text, dim=1)[labels].t()
    rows = torch.logsumexp(s, dim=1) - s.diagonal()
    cols = torch.logsumexp(s, dim=0) - s.diagonal()
    return 0.5 * (rows.mean() + cols.mean())


def hand_classwise_kl(z, sim, temperature=2.0):
    """L_kd (§3.4): (1/2C)·Σ_c [KL(P_c‖Q_c) + KL(Q_c‖P_c)], P_c = softmax over the batch of z[:, c]/T,
    Q_c of sim[:, c]/T; KL summed over the batch, no T² factor."""
    total = 0.0
    for c in range(z.shape[1]):
        p = torch.softmax(z[:, c] / temperature, dim=0)
        q = torch.softmax(sim[:, c] / temperature, dim=0)
        total = total + (p * (p.log() - q.log())).sum() + (q * (q.log() - p.log())).sum()
    return total / (2 * z.shape[1])


def hand_lmmd(source, target, labels, q, num_classes):
    """LMMD (§2.2): Gaussian kernels at mean-bandwidth·{1/4..4} (bandwidth detached), class weights
    s_ic = 1[y_i=c]/n_c and r_jc = q_jc/Σ_j q_jc over C* = source classes ∩ target argmax classes."""
    u = torch.cat([source, target])
    n, b = len(u), len(source)
    d = ((u[:, None, :] - u[None, :, :]) ** 2).sum(-1)
    bw = (d.sum() / (n * n - n)).detach()
    k = sum(torch.exp(-d / (bw * m)) for m in (0.25, 0.5, 1.0, 2.0, 4.0))
    shared = [c for c in range(num_classes) if (labels == c).any() and (q.argmax(1) == c).any()]
    loss = 0.0
    for c in shared:
        s = (labels == c).double() / (labels == c).sum()
        r = q[:, c] / q[:, c].sum()
        loss = loss + s @ k[:b, :b] @ s + r @ k[b:, b:] @ r - 2 * s @ k[:b, b:] @ r
    return loss / len(shared)


def hand_fam(p, f, prefix="fam."):
    """FedMedCLIP's FAM (§3.2) with every row kept: softmax(W2·relu(standardise_per_sample(W1 f + b1)) + b2)."""
    s = f @ p[prefix + "fc1.weight"].t() + p[prefix + "fc1.bias"]
    s = (s - s.mean(1, keepdim=True)) / torch.sqrt(s.var(1, unbiased=False, keepdim=True) + 1e-5)
    return torch.softmax(F.relu(s) @ p[prefix + "fc2.weight"].t() + p[prefix + "fc2.bias"], dim=1)


def hand_batchnorm(x, gamma, beta):
    """BatchNorm1d in training mode: batch mean and biased variance, eps 1e-5."""
    return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5) * gamma + beta


def hand_mlp(p, h):
    """The private MLP (§3.3): [Linear → BatchNorm → ReLU] × 3 → Linear, every row kept."""
    x = h
    for i in (0, 3, 6):
        x = x @ p[f"mlp.net.{i}.weight"].t() + p[f"mlp.net.{i}.bias"]
        x = F.relu(hand_batchnorm(x, p[f"mlp.net.{i + 1}.weight"], p[f"mlp.net.{i + 1}.bias"]))
    return x @ p["mlp.net.9.weight"].t() + p["mlp.net.9.bias"]


def hand_attention(p, f):
    """FACMIC's attention (§2.1): softmax(W2·LeakyReLU_0.01(BN(W1 f + b1)) + b2), BN in training mode."""
    s = f @ p["net.0.weight"].t() + p["net.0.bias"]
    s = F.leaky_relu(hand_batchnorm(s, p["net.1.weight"], p["net.1.bias"]), 0.01)
    return torch.softmax(s @ p["net.3.weight"].t() + p["net.3.bias"], dim=1)


# ----------------------------------------------------------------------------- FedMedCLIP


def _fedmedclip_site(**options):
    text = _randn(0, C, D)
    m = FedMedClip(MethodContext(D, C, text, seed=0, batch_size=B, options=options))
    site = m.new_site(_site_data(), 0)
    site.load_shared(m.shared_state(m.new_global()))  # what a round starts with
    for layer in [site.fam.fc1, site.fam.fc2, *(site.mlp.net[i] for i in (0, 3, 6, 9))]:
        assert bool((layer.mask() == 1).all())  # every row kept, as the hand-written forward assumes
    return m, site, text


def _fedmedclip_expected(site, text):
    """One FedMedCLIP step by hand (§3.4): L = L_con + CE(MLP(ĥ), y) + 0.04·L_kd(MLP(ĥ), ĥ·T̂ᵀ) with ĥ fed
    to the MLP undetached; returns the loss and d loss / d parameter for every FAM and MLP parameter."""
    p = {
        **{"fam." + k: v for k, v in _leaves(site.fam).items()},
        **{"mlp." + k: v for k, v in _leaves(site.mlp).items()},
    }
    f, y, t = site.data.train_x.double(), site.data.train_y, text.double()
    h = F.normalize(hand_fam(p, f) * f, dim=1)
    z = hand_mlp(p, h)
    sim = h @ F.normalize(t, dim=1).t()  # plain cosines: no ×100 in the distillation
    ce = (torch.logsumexp(z, dim=1) - z[torch.arange(len(y)), y]).mean()
    loss = hand_contrastive(h, t, y) + ce + 0.04 * hand_classwise_kl(z, sim, 2.0)
    return float(loss.detach()), _grads(loss, p)


def test_fedmedclip_step_loss_and_gradients_match_the_formula():
    """Catches: the KL logits scaled by 100, the MLP input detached, kd_weight 0.4 instead of 0.04."""
    m, site, text = _fedmedclip_site()
    want_loss, want_grads = _fedmedclip_expected(site, text)
    got: dict[str, torch.Tensor] = {}
    _record_grads(site.fam, got, "fam.")
    _record_grads(site.mlp, got, "mlp.")
    stats = site.train_round(1)
    assert stats["steps"] == 1
    assert stats["loss"] == pytest.approx(want_loss, rel=1e-5)
    _assert_grads(got, want_grads)
    # the FAM is reached through the MLP too: without the CE and KL paths its gradient would differ
    assert any(float(want_grads[k].abs().max()) > 0 for k in want_grads if k.startswith("fam.fc"))


@pytest.mark.parametrize("round_index", [1, 3])
def test_fedmedclip_step_is_adamw_with_the_learning_rates_decayed_per_round(round_index):
    """Catches: no per-round learning-rate decay. AdamW re-created each round with lr·0.97^(r-1) (§3.5): its
    first step is p ← p·(1 − lr·wd) − lr·g/(|g| + eps)."""
    m, site, text = _fedmedclip_site()
    before = {**{"fam." + k: v.detach().clone() for k, v in site.fam.named_parameters()}}
    before.update({"mlp." + k: v.detach().clone() for k, v in site.mlp.named_parameters()})
    _, grads = _fedmedclip_expected(site, text)
    site.train_round(round_index)
    after = {**{"fam." + k: v.detach() for k, v in site.fam.named_parameters()}}
    after.update({"mlp." + k: v.detach() for k, v in site.mlp.named_parameters()})
    decay = 0.97 ** (round_index - 1)
    # A gradient that is 0 by construction (a bias in front of a BatchNorm, an inert threshold) comes out of
    # float32 as noise, which Adam's normalisation g/(|g| + eps) amplifies: only the others are compared.
    floor = 1e-5 * max(float(g.abs().max()) for g in grads.values())
    compared = {"fam.": 0, "mlp.": 0}
    for k, p0 in before.items():
        lr = (5e-5 if k.startswith("fam.") else 1e-3) * decay
        g = grads[k].float()
        want = p0 * (1 - lr * 0.02) - lr * g / (g.abs() + 1e-6)
        real = g.abs() > floor
        compared[k[:4]] += int(real.sum())
        torch.testing.assert_close(
            after[k][real], want[real], rtol=0, atol=2e-8 + 1e-3 * lr, msg=lambda m, k=k: f"{k}: {m}"
        )
    assert compared["fam."] > 60 and compared["mlp."] > 100


# ----------------------------------------------------------------------------- FACMIC


def _facmic_site(**options):
    text = _randn(0, C, D)
    m = Facmic(MethodContext(D, C, text, seed=0, batch_size=B, options={"local_steps": 1, **options}))
    return m, m.new_site(_site_data(text=text), 0), text


def _facmic_expected(site, text, masked_target=False):
    """One FACMIC step by hand (§2.2): L = L_con(ĥ) + λ·L_lmmd(ĥ, target, y, q) with λ = 1/10 for a batch of
    4 (≤ 8), pseudo-labels q = softmax(100·cos(n(a(f')⊙f'), t)) from the *masked* target without gradient,
    and the target itself raw n(f') (or masked, with masked_target)."""
    p = _leaves(site.attention)
    f, y, ft, t = site.data.train_x.double(), site.data.train_y, site.data.reference_x.double(), text.double()
    h = F.normalize(hand_attention(p, f) * f, dim=1)
    masked = F.normalize(hand_attention(p, ft) * ft, dim=1)
    q = torch.softmax(100.0 * masked.detach() @ F.normalize(t, dim=1).t(), dim=1)
    target = masked if masked_target else F.normalize(ft, dim=1)
    lmmd = hand_lmmd(h, target, y, q, C)
    loss = hand_contrastive(h, t, y) + 0.1 * lmmd
    return float(loss.detach()), _grads(loss, p), float(lmmd.detach())


@pytest.mark.parametrize("masked_target", [False, True])
def test_facmic_step_loss_and_gradients_match_the_formula(masked_target):
    """Catches: no λ/10 for batches of 8 or fewer, pseudo-labels taken without the attention mask."""
    m, site, text = _facmic_site(masked_target=masked_target)
    want_loss, want_grads, lmmd = _facmic_expected(site, text, masked_target)
    assert lmmd > 1e-3  # the adaptation term is really there (0.1·lmmd moves the loss well past tolerance)
    got: dict[str, torch.Tensor] = {}
    _record_grads(site.attention, got, "")
    stats = site.train_round(1)
    assert stats["steps"] == 1
    assert stats["loss"] == pytest.approx(want_loss, rel=1e-5)
    _assert_grads(got, want_grads)


def test_facmic_pseudo_labels_differ_with_and_without_the_mask():
    """The pseudo-label check above is only meaningful if the attention changes which classes the target
    batch is assigned to: it does on these tensors."""
    m, site, text = _facmic_site()
    p = _leaves(site.attention)
    ft, tn = site.data.reference_x.double(), F.normalize(text.double(), dim=1)
    masked = torch.softmax(100 * F.normalize(hand_attention(p, ft) * ft, dim=1) @ tn.t(), dim=1)
    raw = torch.softmax(100 * F.normalize(ft, dim=1) @ tn.t(), dim=1)
    assert masked.argmax(1).tolist() != raw.argmax(1).tolist()


@pytest.mark.parametrize("masked_target", [False, True])
def test_facmic_batchnorm_statistics_move_once_per_batch(masked_target):
    """Per step the source batch and the target batch each move BatchNorm's running statistics once
    (momentum 0.1, unbiased batch variance), as in the reference code; the masked target must not move
    them a second time."""
    m, site, _ = _facmic_site(masked_target=masked_target)
    p = _leaves(site.attention)
    bn = site.attention.net[1]
    mean, var = bn.running_mean.clone().double(), bn.running_var.clone().double()
    for batch in (site.data.train_x, site.data.reference_x):  # source first, then the target batch
        s = (batch.double() @ p["net.0.weight"].t() + p["net.0.bias"]).detach()
        mean = 0.9 * mean + 0.1 * s.mean(0)
        var = 0.9 * var + 0.1 * s.var(0, unbiased=True)
    site.train_round(1)
    assert int(bn.num_batches_tracked) == 2
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- options that are set take effect


def test_facmic_local_epochs_alone_takes_effect_and_both_set_is_refused():
    text = _randn(0, C, D)
    data = _site_data(n_train=12, text=text)
    m = Facmic(MethodContext(D, C, text, batch_size=B, options={"local_epochs": 1}))
    assert m.new_site(data, 0).train_round(1)["steps"] == 12 // B  # one pass, not the default 199 steps
    # ... and the options MLflow logs live (resolved_options) are those it ran with (results.json's)
    assert resolved_options(TrainConfig(method="facmic", method_options={"local_epochs": 1})) == m.opt
    m = Facmic(MethodContext(D, C, text, batch_size=B, options={"local_epochs": 2, "local_steps": 0}))
    assert m.new_site(data, 0).train_round(1)["steps"] == 2 * 12 // B
    m = Facmic(MethodContext(D, C, text, batch_size=B, options={"local_steps": 5}))
    assert m.new_site(data, 0).train_round(1)["steps"] == 5
    with pytest.raises(ConfigError, match="local_steps=5 and local_epochs=1"):
        Facmic(MethodContext(D, C, text, batch_size=B, options={"local_epochs": 1, "local_steps": 5}))


# ----------------------------------------------------------------------------- mask_rule=dst


def test_dst_thresholds_are_reset_when_a_site_receives_the_global_module():
    """§3.6: thresholds do not travel; a site loading the global module gets them back at 0, so its FAM
    equals the global module again (with learnt thresholds they would drift apart round after round)."""
    text = _randn(0, C, D)
    m = FedMedClip(MethodContext(D, C, text, batch_size=B, options={"mask_rule": "dst", "lr_fam": 0.05}))
    site = m.new_site(_site_data(n_train=12), 0)
    global_module = m.new_global()
    state = m.shared_state(global_module)
    site.load_shared(state)
    site.train_round(1)
    learnt = torch.cat([site.fam.fc1.threshold, site.fam.fc2.threshold]).detach()
    assert float(learnt.abs().max()) > 0  # they did learn
    site.load_shared(state)
    assert not site.fam.fc1.threshold.detach().any() and not site.fam.fc2.threshold.detach().any()
    x = _randn(5, 7, D)
    site.fam.eval()
    global_module.eval()
    with torch.no_grad():
        assert torch.equal(site.fam(x), global_module(x))


# ----------------------------------------------------------------------------- the fine-tuning baselines


@pytest.fixture(scope="module")
def tiny_clip():
    from fedmedclip.backbone import load_backbone, make_preprocessing

    backbone = load_backbone("tiny")
    return backbone, make_preprocessing("clip", backbone)


def _pixels(prep, n=B):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, prep.size, prep.size, 3), generator=g, dtype=torch.uint8)


def _finetune_site(tiny_clip, method, n=B, **options):
    backbone, prep = tiny_clip
    ctx = MethodContext(
        feature_dim=backbone.feature_dim,
        num_classes=2,
        text_features=torch.zeros(2, backbone.feature_dim),
        batch_size=B,
        # one step unless the test says how long a round is
        options=options if {"local_steps", "local_epochs"} & set(options) else {"local_steps": 1, **options},
        backbone=backbone,
        preprocessing=prep,
        prompts=["a picture of a cat", "a picture of a dog"],
    )
    m = METHODS[method](ctx)
    pixels, labels = _pixels(prep, n), torch.arange(n) % 2
    return m, m.new_site(SiteData("s", pixels, labels, pixels[:0], labels[:0], pixels[:0], labels[:0]), 0)


def _image_embeddings(model, prep, pixels):
    out = model.get_image_features(pixel_values=prep.normalise(pixels))
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(out.float(), dim=1)


def _params(site):
    return {k: p.detach().clone() for k, p in site.model.named_parameters() if p.requires_grad}


def _params_after_first_step(site) -> list[dict[str, torch.Tensor]]:
    """Filled with the site's trainable parameters right after its optimiser's first step."""
    seen: list[dict[str, torch.Tensor]] = []
    site.optimiser.register_step_post_hook(lambda *_: seen.append(_params(site)) if not seen else None)
    return seen


def test_fedprox_is_fedavg_in_round_one_and_adds_its_proximal_term_from_round_two(tiny_clip):
    """Catches: FedProx active in round 1. In round 1 FedProx is exactly FedAvg, even with a huge mu; from
    round 2 its second step pays (mu/2)·||w1 − w_g||², w1 being where the first step left the model (that
    step is FedAvg's: the term and its gradient are 0 at w = w_g)."""
    mu = 100.0
    for r in (1, 2):
        ma, avg = _finetune_site(tiny_clip, "fedavg", local_steps=2)
        _, prox = _finetune_site(tiny_clip, "fedprox", local_steps=2, mu=mu)
        state = ma.shared_state(ma.new_global())
        avg.load_shared(state)
        prox.load_shared(state)
        after_first_step = _params_after_first_step(avg)
        loss_avg, loss_prox = avg.train_round(r)["loss"], prox.train_round(r)["loss"]
        if r == 1:
            assert loss_prox == loss_avg
            assert all(
                torch.equal(a, b) for a, b in zip(_params(avg).values(), _params(prox).values(), strict=True)
            )
        else:
            w1 = after_first_step[0]
            sq = sum(float(((w1[k] - state[k]) ** 2).sum()) for k in w1)
            assert sq > 0
            # mean over the two steps: 0 at the first, (mu/2)·||w1 − w_g||² at the second
            assert loss_prox - loss_avg == pytest.approx(0.5 * (0.5 * mu * sq), rel=1e-3)


def test_moon_pulls_toward_the_global_model_target_index_zero(tiny_clip):
    """Catches: MOON's target index 1 instead of 0. With the global model different from the site's
    previous one, the step's loss is L_con + mu·mean_i CE([cos(z_i, z_glob,i), cos(z_i, z_prev,i)]/tau, 0);
    L_con is FedAvg's loss in the same state, z = z_glob (the model is the global one at the first step)."""
    backbone, prep = tiny_clip
    _, moon = _finetune_site(tiny_clip, "moon")
    ma, avg = _finetune_site(tiny_clip, "fedavg")
    previous = copy.deepcopy(moon.model)  # in round 1 the previous local model is the initial one
    g = torch.Generator().manual_seed(7)
    state = {
        k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in ma.shared_state(ma.new_global()).items()
    }
    moon.load_shared(state)
    avg.load_shared(state)
    current = copy.deepcopy(moon.model)
    with torch.no_grad():
        z = _image_embeddings(current, prep, moon.data.train_x)
        z_prev = _image_embeddings(previous, prep, moon.data.train_x)
    cos_glob, cos_prev = (z * z).sum(1), (z * z_prev).sum(1)
    assert float((cos_glob - cos_prev).min()) > 0.01  # the two anchors really differ
    logits = torch.stack([cos_glob, cos_prev], dim=1).double() / 0.5
    moon_term = float((torch.logsumexp(logits, dim=1) - logits[:, 0]).mean())  # mu = 1, target 0
    loss_moon, loss_avg = moon.train_round(1)["loss"], avg.train_round(1)["loss"]
    assert loss_moon - loss_avg == pytest.approx(moon_term, rel=1e-4)


def _hand_focal(logits, gamma=1.0, smoothing=0.1):
    """FedFocal (§4): per row, q = (1−ε)·onehot + ε/n and loss = −Σ_j w_j·q_j·log p_j with
    w = (1 − p_target)^γ on the target entry only (not detached), 1 elsewhere; mean over rows."""
    n = logits.shape[1]
    total = 0.0
    for i in range(len(logits)):
        logp = torch.log_softmax(logits[i], dim=0)
        for j in range(n):
            q = (1 - smoothing) * (i == j) + smoothing / n
            w = (1 - logp[i].exp()) ** gamma if i == j else 1.0
            total = total - w * q * logp[j]
    return total / len(logits)


def test_focal_weight_only_on_the_target_entry():
    """Catches: the focal weight applied to every entry."""
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.3, 1.2, 0.1], [-0.5, 0.0, 0.8]], dtype=torch.float64)
    assert float(focal_smoothed(logits, 1.0, 0.1)) == pytest.approx(float(_hand_focal(logits)), rel=1e-12)
    assert float(focal_smoothed(logits, 2.0, 0.0)) == pytest.approx(
        float(_hand_focal(logits, 2.0, 0.0)), rel=1e-12
    )
    # not detached: the weight's own gradient is part of the step
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    focal_smoothed(a, 1.0, 0.1).backward()
    _hand_focal(b).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_fedfocal_symmetrises_the_focal_loss_over_the_contrastive_logits(tiny_clip):
    """L = ½[focal(S) + focal(Sᵀ)] with S = 100·ĥ·n(t_y)ᵀ, the B×B contrastive logits."""
    _, site = _finetune_site(tiny_clip, "fedfocal")
    h = F.normalize(_randn(3, B, 8).double(), dim=1)
    text = _randn(4, 2, 8).double()
    labels = torch.tensor([0, 1, 1, 0])
    s = 100 * h @ F.normalize(text, dim=1)[labels].t()
    want = 0.5 * (_hand_focal(s) + _hand_focal(s.t()))
    assert float(site.base_loss(h, text, labels)) == pytest.approx(float(want), rel=1e-10)


def test_finetuning_local_epochs_alone_takes_effect_and_both_set_is_refused(tiny_clip):
    _, site = _finetune_site(tiny_clip, "fedavg", n=2 * B, local_epochs=1)
    assert site.train_round(1)["steps"] == 2  # one pass over 8 images in batches of 4, not 199 steps
    with pytest.raises(ConfigError, match="local_steps=3 and local_epochs=1"):
        _finetune_site(tiny_clip, "fedprox", local_epochs=1, local_steps=3)

"""The baselines and references: each learns on tiny synthetic data, FedProx(mu=0) is FedAvg, MOON's
previous model is a real copy, fine-tuning moves far more bytes than FedMedCLIP, and the local /
centralized references run through the same engine."""

from __future__ import annotations

import pytest
import torch
from conftest import SYNTH

from fedmedclip.backbone import load_backbone, make_preprocessing
from fedmedclip.config import TrainConfig
from fedmedclip.engine import train
from fedmedclip.errors import ConfigError
from fedmedclip.methods import METHODS, MethodContext, SiteData

# Small on purpose (2-core CI): 12 images per class and site, 6 per class in the global test.
SMALL = SYNTH
FAST_FINETUNE = {"local_steps": 2}


@pytest.fixture
def cache(synthetic_cache):
    return synthetic_cache


def run(cache, tmp_path, method, federation="federated", rounds=2, synthetic=SYNTH, **opts):
    cfg = TrainConfig(
        method=method,
        federation=federation,
        rounds=rounds,
        synthetic=synthetic,
        out=str(tmp_path / f"{method}-{federation}"),
        cache_dir=str(cache),
        method_options=opts,
        batch_size=8,
    )
    return train(cfg, progress=False)


# ------------------------------------------------------------------ methods on cached features
def test_zeroshot_trains_nothing_and_reports_everything(cache, tmp_path):
    r = run(cache, tmp_path, "zeroshot")
    losses = [h["train_loss"] for h in r["history"]]
    assert losses[0] == losses[1]  # nothing learns
    assert r["metrics"]["global"]["n"] > 0 and r["metrics"]["site_mean"]["acc"] >= 0
    assert (
        r["comm"]["bytes_up_per_site_per_round"] < 400
    )  # an empty payload: the header (codec, run, round, site) only


def test_fedclip_improves_its_training_loss(cache, tmp_path):
    r = run(cache, tmp_path, "fedclip", rounds=3, lr=1e-3)
    losses = [h["train_loss"] for h in r["history"]]
    assert losses[-1] < losses[0]
    assert r["method_options"]["weight_decay"] == 0.2


@pytest.mark.parametrize("method", ["fedmedclip", "facmic"])
def test_local_reference_shares_nothing(cache, tmp_path, method):
    opts = {"local_steps": 5} if method == "facmic" else {}
    r = run(cache, tmp_path, method, federation="local", **opts)
    assert r["federation"] == "local"
    assert r["comm"]["total_bytes"] == 0
    assert r["history"][-1]["train_loss"] < r["history"][0]["train_loss"]
    # Every site's own model predicts every global test image.
    assert r["metrics"]["global"]["n"] == 3 * 4 * 6


def test_centralized_reference_pools_and_reports_every_site(cache, tmp_path):
    r = run(cache, tmp_path, "facmic", federation="centralized", local_steps=5)
    assert r["comm"]["total_bytes"] == 0
    assert [s["site"] for s in r["metrics"]["sites"]] == r["site_names"]
    assert all(s["n"] > 0 for s in r["metrics"]["sites"])
    assert r["history"][-1]["train_loss"] < r["history"][0]["train_loss"]


def test_fedprox_and_moon_refuse_a_reference_without_global_model(cache, tmp_path):
    with pytest.raises(ConfigError, match="global model"):
        run(cache, tmp_path, "fedprox", federation="local", rounds=1, synthetic=SMALL)


# ------------------------------------------------------------------ fine-tuning baselines, trainer level
@pytest.fixture(scope="module")
def tiny_clip():
    backbone = load_backbone("tiny")
    return backbone, make_preprocessing("clip", backbone)


def make_site(tiny_clip, method: str, n: int = 8, **opts):
    backbone, prep = tiny_clip
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, prep.size, prep.size, 3), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 2
    ctx = MethodContext(
        feature_dim=backbone.feature_dim,
        num_classes=2,
        text_features=torch.zeros(2, backbone.feature_dim),
        batch_size=4,
        options={"local_steps": 2, **opts},
        backbone=backbone,
        preprocessing=prep,
        prompts=["a picture of a cat", "a picture of a dog"],
    )
    m = METHODS[method](ctx)
    data = SiteData("s", pixels, labels, pixels[:0], labels[:0], pixels[:0], labels[:0])
    site = m.new_site(data, 0)
    return m, site


def federated_rounds(m, site, rounds):
    """Rounds of a one-site federation: receive the global state, train, return it as the new global."""
    state, losses = m.shared_state(m.new_global()), []
    for r in range(1, rounds + 1):
        site.load_shared(state)
        losses.append(site.train_round(r)["loss"])
        state = site.shared_update()
    return state, losses


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "moon", "fedfocal"])
def test_finetuning_baselines_improve_their_training_loss(tiny_clip, method):
    m, site = make_site(tiny_clip, method, lr=1e-3, local_steps=3)
    _, losses = federated_rounds(m, site, 3)
    assert losses[-1] < losses[0], losses


def test_finetuning_trains_both_encoders_but_not_the_temperature(tiny_clip):
    m, site = make_site(tiny_clip, "fedavg", lr=1e-3)
    before = {k: v.clone() for k, v in site.model.state_dict().items()}
    federated_rounds(m, site, 1)
    after = site.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("vision_model.") for k in changed)
    assert any(k.startswith("text_model.") for k in changed)
    assert "logit_scale" not in changed and "logit_scale" not in site.shared_update()
    # The frozen backbone the sites copied from is untouched.
    assert not any(p.requires_grad for p in tiny_clip[0].model.parameters())


def test_fedprox_with_mu_zero_is_fedavg(tiny_clip):
    # Round 2 is the first with the proximal term, so three rounds cover it.
    avg, _ = federated_rounds(*make_site(tiny_clip, "fedavg", lr=1e-3), 3)
    prox, _ = federated_rounds(*make_site(tiny_clip, "fedprox", lr=1e-3, mu=0.0), 3)
    assert avg.keys() == prox.keys()
    assert all(torch.equal(avg[k], prox[k]) for k in avg)
    pulled, _ = federated_rounds(*make_site(tiny_clip, "fedprox", lr=1e-3, mu=10.0), 3)
    assert not all(torch.equal(avg[k], pulled[k]) for k in avg)


def test_fedprox_unsquared_norm_is_finite_at_the_global_model(tiny_clip):
    m, site = make_site(tiny_clip, "fedprox", lr=1e-3, prox_norm="unsquared")
    _, losses = federated_rounds(m, site, 2)
    state = site.shared_update()
    assert all(torch.isfinite(v).all() for v in state.values()) and all(map(lambda x: x == x, losses))


def test_moon_keeps_a_true_copy_of_the_previous_local_model(tiny_clip):
    m, site = make_site(tiny_clip, "moon", lr=1e-3)
    state = m.shared_state(m.new_global())
    site.load_shared(state)
    site.train_round(1)
    trained = site.shared_update()
    prev = dict(site.previous_model.named_parameters())
    local = dict(site.model.named_parameters())
    for k, v in trained.items():
        assert torch.equal(prev[k], v)  # the previous model is the end-of-round model ...
        assert prev[k].data_ptr() != local[k].data_ptr()  # ... in its own storage, not an alias
    # Receiving the global model must not touch the stored previous model (the reference's alias bug).
    site.load_shared(state)
    assert not all(torch.equal(local[k], trained[k]) for k in trained)
    assert all(torch.equal(prev[k], trained[k]) for k in trained)
    # After the next round it holds that round's end state, still in its own storage.
    site.train_round(2)
    assert all(torch.equal(prev[k], local[k]) for k in trained)
    assert not all(torch.equal(prev[k], trained[k]) for k in trained)


# ------------------------------------------------------------------ end to end through the engine
def test_finetuning_ledger_carries_the_whole_model(cache, tmp_path):
    ft = run(cache, tmp_path, "fedavg", rounds=1, synthetic=SMALL, **FAST_FINETUNE)
    fm = run(cache, tmp_path, "fedmedclip", rounds=1, synthetic=SMALL)
    backbone = load_backbone("tiny")
    n_trainable = sum(p.numel() for n, p in backbone.model.named_parameters() if n != "logit_scale")
    up = ft["comm"]["bytes_up_per_site_per_round"]
    assert up > 1.5 * n_trainable * 0.9  # fp16 payload of every trainable parameter (zlib barely helps)
    assert up > 5 * fm["comm"]["bytes_up_per_site_per_round"]
    assert ft["metrics"]["global"]["n"] > 0

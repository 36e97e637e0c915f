"""Differential privacy (fedmedclip.privacy, docs/privacy.md): each site's epsilon is dp-accounting's own figure
(and Opacus's), a run with --dp-target-epsilon ends at or below it at every site, a site stops at its budget,
per-example clipping bounds every example's contribution, client-level DP clips and noises the aggregate, a
resumed DP run continues exactly, and what cannot be done with DP is refused with a clear error."""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SYNTH, train_interrupted

from fedmedclip import engine
from fedmedclip.config import TrainConfig
from fedmedclip.errors import ConfigError
from fedmedclip.flags import add_config_arguments, config_from_args
from fedmedclip.privacy import PrivacySettings
from fedmedclip.privacy import dpsgd as dpsgd_module
from fedmedclip.privacy.accounting import dpsgd_epsilon, gaussian_rounds_epsilon, plan_site
from fedmedclip.privacy.client import ClientPrivacy
from fedmedclip.privacy.dpsgd import DPSGD, clip_per_example, per_example_gradients

BATCH = 8  # SYNTH gives 34-35 training images per site: 4 steps per round at sampling rate ~0.23
# FedMedCLIP's DP-SGD batch and epochs are its own options (256, 4 per round: all of these tiny sites at once):
# pinned to BATCH and 1 so that these runs take small steps at sampling rate BATCH / n.
DEFAULT_OPTIONS = {"facmic": {"local_steps": 3}, "fedmedclip": {"dp_batch_size": BATCH, "dp_epochs": 1.0}}


def config(cache: Path, out: Path, method: str = "fedmedclip", **kw) -> TrainConfig:
    return TrainConfig(
        data="synthetic",
        method=method,
        rounds=kw.pop("rounds", 2),
        synthetic=SYNTH,
        cache_dir=str(cache),
        out=str(out),
        batch_size=BATCH,
        method_options=kw.pop("method_options", DEFAULT_OPTIONS.get(method, {})),
        **kw,
    )


def library_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """dp-accounting's RDP accountant used directly, as its documentation shows."""
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


def test_each_sites_epsilon_is_the_accountant_librarys_own_figure(synthetic_cache, tmp_path):
    sigma, rounds = 1.1, 2
    results = engine.train(
        config(synthetic_cache, tmp_path / "run", rounds=rounds, privacy={"noise_multiplier": sigma}),
        progress=False,
    )
    partition = results["partition"]
    assert partition
    sites = results["privacy"]["record_level"]["sites"]
    assert sorted(sites) == results["site_names"]
    for name, s in sites.items():
        n = s["n_train"]
        steps_per_round = max(1, n // BATCH)
        assert s["sample_rate"] == BATCH / n and s["noise_multiplier"] == sigma
        assert s["steps"] == rounds * steps_per_round
        want = library_epsilon(BATCH / n, sigma, s["steps"], 1e-5)
        assert s["epsilon"] == pytest.approx(want, rel=1e-12)
        # Every round record carries the epsilon after that round's steps.
        for rec in results["history"]:
            row = next(r for r in rec["sites"] if r["site"] == name)
            assert row["epsilon"] == pytest.approx(
                library_epsilon(BATCH / n, sigma, rec["round"] * steps_per_round, 1e-5), rel=1e-12
            )
    assert results["privacy"]["epsilon"] == max(s["epsilon"] for s in sites.values())
    assert results["history"][-1]["epsilon_max"] == results["privacy"]["epsilon"]


def test_the_accounting_agrees_with_opacus():
    opacus = pytest.importorskip("opacus.accountants")
    q, sigma, steps = 0.05, 1.0, 400
    accountant = opacus.RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    ours = dpsgd_epsilon(q, sigma, steps, 1e-5)
    assert ours == pytest.approx(accountant.get_epsilon(1e-5), rel=0.02)


def test_client_level_dp_at_the_server_clips_and_publishes_no_update_norm(synthetic_cache, tmp_path):
    """With the noise added at the server its clip bounds each update: the norm bound and the outlier rule
    rejected updates by norms without noise (the outlier rule by the others' too) and published those norms in
    the round records and the server's status, which every site reads. Updates far over the default bound are
    now clipped and counted, and no norm is written."""
    out = tmp_path / "run"
    results = engine.train(
        config(
            synthetic_cache,
            out,
            rounds=1,
            method_options={"lr_fam": 0.3},  # updates of norm ~170 against the default bound of ~19
            privacy={"client_noise": 0.5},
        ),
        progress=False,
    )
    record = results["history"][0]
    assert "failed" not in record and record["rejected"] == {} and len(record["sites_present"]) == 3
    written = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", "")]
    assert not [p for p in written if b"update norm" in p.read_bytes()]


def test_client_level_dp_with_the_noise_at_the_sites_trains(synthetic_cache, tmp_path):
    """Each site's update carries its share of the noise (norm about z S / sqrt(quorum) * sqrt(entries)): the
    server's default bound, twice the initial module's norm, rejected every one and the round failed. The
    bound of such a run is the clip plus the noise's expected norm, with a margin."""
    results = engine.train(
        config(
            synthetic_cache,
            tmp_path / "run",
            rounds=1,
            privacy={"client_noise": 0.5, "client_noise_at": "sites"},
        ),
        progress=False,
    )
    record = results["history"][0]
    assert "failed" not in record and record["rejected"] == {} and len(record["sites_present"]) == 3
    assert results["privacy"]["client_level"]["noise_at"] == "sites"


@pytest.mark.parametrize("federation", ["local", "centralized"])
def test_a_dp_run_without_federation_publishes_no_training_loss(synthetic_cache, tmp_path, federation):
    """A mean over the patients' examples without noise: a federated site keeps it under DP; local and
    centralized runs published it in every round record (results.json, MLflow)."""
    results = engine.train(
        config(
            synthetic_cache, tmp_path / "run", federation=federation, rounds=1, privacy={"target_epsilon": 4}
        ),
        progress=False,
    )
    assert [rec["train_loss"] for rec in results["history"]] == [None]


def test_a_target_epsilon_run_ends_at_or_below_it_at_every_site(synthetic_cache, tmp_path):
    target = 3.0
    results = engine.train(
        config(synthetic_cache, tmp_path / "run", method="facmic", privacy={"target_epsilon": target}),
        progress=False,
    )
    sites = results["privacy"]["record_level"]["sites"]
    assert len(sites) == 3
    for s in sites.values():
        assert s["epsilon"] <= target
        assert s["epsilon"] > 0.95 * target  # calibrated to it, not over-noised
        assert s["steps"] == s["planned_steps"] and s["stopped_at_round"] is None
    for rec in results["history"]:
        assert rec["epsilon_max"] <= target


def test_a_site_stops_before_the_step_that_would_exceed_its_budget(synthetic_cache, tmp_path, caplog):
    """With a fixed noise multiplier the target is a budget: the sites stop short of it and say so."""
    sigma, budget = 0.8, 4.0
    plan = plan_site(PrivacySettings(noise_multiplier=sigma, target_epsilon=budget), 35, BATCH, 4, 3)
    assert plan.budget_steps < plan.planned_steps  # the budget does not last the planned rounds
    caplog.set_level(logging.WARNING, logger="fedmedclip.privacy")
    results = engine.train(
        config(
            synthetic_cache,
            tmp_path / "run",
            rounds=3,
            privacy={"noise_multiplier": sigma, "target_epsilon": budget},
        ),
        progress=False,
    )
    for name, s in results["privacy"]["record_level"]["sites"].items():
        assert s["epsilon"] <= budget
        assert s["steps"] < s["planned_steps"] and s["stopped_at_round"] is not None
        # One more step would have exceeded the budget.
        assert dpsgd_epsilon(s["sample_rate"], sigma, s["steps"] + 1, 1e-5) > budget
        assert any(name in r.message and "privacy budget reached" in r.message for r in caplog.records)
    assert "global" in results["metrics"]  # the run went on to the end


def _fam_mlp(dim: int = 16, classes: int = 4):
    from fedmedclip.modules import FeatureAdaptationModule, PrivateMLP

    torch.manual_seed(0)
    return {"fam": FeatureAdaptationModule(dim).eval(), "mlp": PrivateMLP(dim, classes).eval()}


def _loss(mods, f, y, text_n):
    from fedmedclip.modules import adapt

    h = adapt(mods["fam"], f)
    return F.cross_entropy(100 * h @ text_n.t(), y) + F.cross_entropy(mods["mlp"](h), y)


def test_per_example_clipping_bounds_every_examples_contribution():
    """A batch with one extreme example: unclipped it dominates, clipped no example contributes more than C,
    and removing the extreme one moves the sum by at most C (the sensitivity DP-SGD's noise is sized for)."""
    mods = _fam_mlp()
    text_n = F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    x[3] *= 1e4  # the extreme example: huge features ...
    y[3] = int(torch.argmin(F.normalize(x[3:4], dim=1) @ text_n.t()))  # ... labelled its least likely class
    grads, losses = per_example_gradients(mods, _loss, (x, y), (text_n,))
    # Each row is that example's own gradient (checked against plain autograd on the example alone).
    params = {f"{m}.{k}": p for m, mod in mods.items() for k, p in mod.named_parameters()}
    for p in params.values():
        p.grad = None
    _loss(mods, x[5:6], y[5:6], text_n).backward()
    for k, p in params.items():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(grads[k][5], expected, rtol=1e-4, atol=1e-7), k
    assert losses.shape == (8,)
    clip = 0.5
    clipped, norms = clip_per_example(grads, clip)
    assert norms[3] > 100 * clip  # far outside the bound
    clipped_norms = torch.sqrt(sum((g.reshape(8, -1) ** 2).sum(1) for g in clipped.values()))
    assert torch.all(clipped_norms <= clip * (1 + 1e-5))
    small = norms <= clip
    assert torch.allclose(clipped_norms[small], norms[small])  # within the bound: left as it was
    without = {k: torch.cat([g[:3], g[4:]]).sum(0) for k, g in clipped.items()}
    with_it = {k: g.sum(0) for k, g in clipped.items()}
    shift = math.sqrt(sum(float(((with_it[k] - without[k]) ** 2).sum()) for k in with_it))
    assert shift <= clip * (1 + 1e-5)


def test_the_noisy_gradient_is_the_clipped_sum_plus_noise_of_std_sigma_c():
    mods = _fam_mlp()
    text_n = F.normalize(torch.randn(4, 16), dim=1)
    x, y = torch.randn(6, 16), torch.randint(0, 4, (6,))
    plan = plan_site(PrivacySettings(noise_multiplier=2.0, clip=0.1), 24, 6, 1, 1)
    dp = DPSGD(plan, "site_0")
    noisy, _ = dp.noisy_gradient(mods, _loss, (x, y), (text_n,), 1, 0)
    grads, _ = per_example_gradients(mods, _loss, (x, y), (text_n,))
    clipped, _ = clip_per_example(grads, 0.1)
    noise = torch.cat([(noisy[k] * 6 - clipped[k].sum(0)).flatten() for k in noisy])
    # About 1,400 coordinates: bounds of 5 standard errors (the draws come from a fresh key every run).
    n = noise.numel()
    assert noise.std().item() == pytest.approx(2.0 * 0.1, rel=5 / math.sqrt(2 * n))
    assert abs(noise.mean().item()) < 5 * 0.2 / math.sqrt(n)
    # Another site's key draws other noise: the randomness is the site's own.
    other, _ = DPSGD(plan, "site_1").noisy_gradient(mods, _loss, (x, y), (text_n,), 1, 0)
    assert not torch.equal(other["fam.fc1.weight"], noisy["fam.fc1.weight"])


def test_a_resumed_dp_run_continues_exactly(synthetic_cache, tmp_path, monkeypatch):
    """The sites' secret keys are part of their checkpoints: interrupted mid-round 2 of 2 and resumed, a DP run
    ends exactly as the same run uninterrupted (the keys are made deterministic for the comparison only; the
    resumed process draws new ones, so a key not restored from the checkpoint would show)."""
    calls = {"n": 0}

    def numbered_key():
        calls["n"] += 1
        digest = hashlib.sha256(str(calls["n"]).encode()).digest()
        return torch.frombuffer(bytearray(digest), dtype=torch.uint8).clone()

    monkeypatch.setattr(dpsgd_module, "new_key", numbered_key)
    privacy = {"target_epsilon": 5.0}
    straight = engine.train(config(synthetic_cache, tmp_path / "straight", privacy=privacy), progress=False)
    calls["n"] = 0
    out = tmp_path / "interrupted"
    train_interrupted(config(synthetic_cache, out, privacy=privacy), 2, KeyboardInterrupt)
    resumed = engine.train(config(synthetic_cache, out, privacy=privacy), resume=True, progress=False)
    assert calls["n"] == 6  # the resumed sites drew new keys ... and used their checkpointed ones
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["privacy"] == straight["privacy"]
    assert [rec["epsilon_max"] for rec in resumed["history"]] == [
        rec["epsilon_max"] for rec in straight["history"]
    ]
    assert (out / "model" / "global.safetensors").read_bytes() == (
        tmp_path / "straight" / "model" / "global.safetensors"
    ).read_bytes()


def test_client_level_dp_clips_each_update_and_noises_the_sum():
    # Unchecked: a noise multiplier below the flags' floor, so that the mean is the clipped one to 1e-4.
    settings = PrivacySettings(client_noise=1e-6, client_clip=0.5)
    dp = ClientPrivacy(settings, sites=3, quorum=3, key=b"k" * 32)
    previous = {"w": torch.zeros(100), "count": torch.tensor(7)}
    states = [
        {"w": torch.full((100,), 0.01), "count": torch.tensor(9)},
        {"w": torch.full((100,), -0.01), "count": torch.tensor(9)},
        {"w": torch.full((100,), 1e3), "count": torch.tensor(9)},  # a huge update: clipped to 0.5
    ]
    new, info = dp.aggregate(previous, states, 1)
    assert int(new["count"]) == 7  # counters are not averaged
    want = torch.full((100,), 0.5 / 10 / 3)  # (0.1 - 0.1 + 0.5 spread over 100 coordinates) / 3 sites
    assert torch.allclose(new["w"], want, atol=1e-4)
    assert info["epsilon"] == pytest.approx(gaussian_rounds_epsilon(1e-6, 1, 1e-5))


def test_client_level_dp_runs_with_adaptive_clipping(synthetic_cache, tmp_path):
    # The count noise (0.3) keeps the adaptation's direction certain: with every update above the clip the
    # noisy unclipped fraction is N(0, 0.3^2) / 3 sites, below the 0.5 quantile but for a 5-sigma draw.
    privacy = {"client_noise": 0.2, "client_clip": 1e-4, "client_quantile": 0.5, "client_count_noise": 0.3}
    results = engine.train(config(synthetic_cache, tmp_path / "run", privacy=privacy), progress=False)
    client = results["privacy"]["client_level"]
    assert client["epsilon"] == pytest.approx(gaussian_rounds_epsilon(0.2, 2, 1e-5))
    clips = [rec["client_dp"]["clip"] for rec in results["history"]]
    assert clips[0] == 1e-4 and clips[1] > clips[0]  # every update was above the clip: it grows
    assert client["final_clip"] == clips[-1]
    # What the records publish is the mechanism's output: no training loss (an average over a site's data
    # without noise) and no statistic of the single updates' norms (with three sites, the median is one's).
    assert all(
        rec["train_loss"] is None and set(rec["client_dp"]) == CLIENT_RECORD for rec in results["history"]
    )


CLIENT_RECORD = {"clip", "next_clip", "noise_multiplier", "sites", "epsilon"}


def test_adaptive_clippings_two_mechanisms_compose_to_the_epsilon_reported():
    """Under adaptive clipping a round runs two Gaussian mechanisms: the update sum (sensitivity S, noise
    z_update S) and the unclipped count (noise sigma_b). One site's update replaced by no change moves the count
    by up to 1 (a zero update is unclipped), and each round's sites are public; dp-accounting's figure for the
    two must be the one reported for multiplier z. The paper's split (2 sigma_b, a sensitivity of 1/2) gave
    z_update 0.537 for z 0.4 and sigma_b 0.3: a true multiplier of 0.26."""
    import dp_accounting
    from dp_accounting import rdp

    from fedmedclip.privacy.accounting import client_noise_split

    z, sigma_b = 0.2, 0.3
    settings = PrivacySettings(client_noise=z, client_quantile=0.5, client_count_noise=sigma_b)
    z_update, count_noise = client_noise_split(settings, 3)
    both = rdp.RdpAccountant()
    both.compose(dp_accounting.GaussianDpEvent(z_update), 2)
    both.compose(dp_accounting.GaussianDpEvent(count_noise), 2)
    assert both.get_epsilon(1e-5) == pytest.approx(gaussian_rounds_epsilon(z, 2, 1e-5), rel=1e-9)
    with pytest.raises(ConfigError, match="--dp-client-noise 0.4 must be below the count noise 0.3"):
        client_noise_split(PrivacySettings(client_noise=0.4, client_quantile=0.5, client_count_noise=0.3), 3)


def test_dp_flags_parse_into_the_configuration():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--dp-target-epsilon", "8", "--dp-delta", "1e-6", "--dp-clip", "0.5"])
    cfg = config_from_args(args)
    assert cfg.privacy == {"target_epsilon": 8.0, "delta": 1e-6, "clip": 0.5}
    assert "privacy" in cfg.resume_key()
    assert "privacy" not in config_from_args(parser.parse_args([])).resume_key()  # no DP: the key as before


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "fedavg", "privacy": {"target_epsilon": 8}}, "fedavg does not support record-level"),
        (
            {"method": "fedclip", "privacy": {"noise_multiplier": 1.0}},
            "fedclip does not support record-level",
        ),
        ({"privacy": {"clip": 2.0}}, "needs record-level DP"),
        ({"privacy": {"target_epsilon": -1}}, "must be a positive number"),
        ({"privacy": {"target_epsilon": 8, "delta": 2}}, "below 1"),
        ({"privacy": {"target_epsilon": 8, "bogus": 1}}, "unknown privacy setting"),
        # 1e300 passed, then overflowed the accountant (a traceback) or failed the first report after training
        ({"privacy": {"noise_multiplier": 1e300}}, "--dp-noise-multiplier must be at most 1e"),
        ({"privacy": {"target_epsilon": 1e300}}, "--dp-target-epsilon must be at most 1e"),
        # dp-accounting reported epsilon 0.0 for a Poisson-sampled DP-SGD at a noise multiplier of 1e-155
        ({"privacy": {"noise_multiplier": 1e-155}}, "--dp-noise-multiplier must be at least 0.001"),
        ({"privacy": {"client_noise": 1e-170}}, "--dp-client-noise must be at least 0.001"),
        # adaptive clipping's settings with a fixed clip were accepted and ignored
        ({"privacy": {"client_noise": 1.0, "client_count_noise": 1.0}}, "count-noise is adaptive clipping's"),
        ({"privacy": {"client_noise": 1.0, "client_clip_lr": 0.5}}, "clip-lr is adaptive clipping's"),
        ({"federation": "local", "privacy": {"client_noise": 1.0}}, "sends nothing"),
        # client-level DP aggregated with its own mean: the robust rule was recorded, never run
        (
            {"aggregator": "median", "privacy": {"client_noise": 1.0}},
            "--aggregator median with --dp-client-noise",
        ),
        (
            {"aggregator": "krum", "privacy": {"client_noise": 0.5, "client_noise_at": "sites"}},
            "client-level DP aggregates with its own mean",
        ),
        # ran and reported a client-level epsilon for updates that were never sent
        ({"method": "zeroshot", "privacy": {"client_noise": 1.0}}, "zeroshot sends nothing"),
        (
            {"privacy": {"client_noise": 1.0, "client_quantile": 0.5, "client_noise_at": "sites"}},
            "adaptive clipping",
        ),
    ],
)
def test_what_dp_cannot_do_is_refused_before_any_work(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(out=str(tmp_path / "x"), **overrides).validate()


def test_facmic_masked_target_and_a_delta_above_one_over_n_are_refused(synthetic_cache, tmp_path):
    with pytest.raises(ConfigError, match="masked_target"):
        engine.train(
            config(
                synthetic_cache,
                tmp_path / "a",
                method="facmic",
                method_options={"local_steps": 3, "masked_target": True},
                privacy={"target_epsilon": 8},
            ),
            progress=False,
        )
    with pytest.raises(ConfigError, match=r"1/n .* site_\d \(3\d training examples\)"):
        engine.train(
            config(synthetic_cache, tmp_path / "b", privacy={"target_epsilon": 8, "delta": 0.05}),
            progress=False,
        )


def test_the_privacy_settings_travel_in_the_pipeline_settings():
    from components.kfp_components import pipeline_settings, settings_from_parameters

    cfg = TrainConfig(out="", privacy={"target_epsilon": 8, "delta": 1e-6, "client_noise": 0.5}).validate()
    settings = pipeline_settings(cfg)
    assert settings["privacy"] == {"client_noise": 0.5, "delta": 1e-06, "target_epsilon": 8}
    assert settings_from_parameters(settings)[0].privacy == cfg.privacy


def test_fedmedclips_dp_batch_and_epochs_set_the_plan_and_the_accounting(synthetic_cache, tmp_path):
    """dp_batch_size and dp_epochs change the sampling rate and the steps: both go through the site's plan, and
    the epsilon reported is the accountant library's for the steps actually taken."""
    sigma, batch, epochs = 1.1, 16, 3.0
    results = engine.train(
        config(
            synthetic_cache,
            tmp_path / "run",
            rounds=1,
            privacy={"noise_multiplier": sigma},
            method_options={"dp_batch_size": batch, "dp_epochs": epochs},
        ),
        progress=False,
    )
    sites = results["privacy"]["record_level"]["sites"]
    assert len(sites) == 3
    for s in sites.values():
        n = s["n_train"]
        assert s["sample_rate"] == batch / n
        assert s["steps"] == s["planned_steps"] == round(epochs * n / batch)
        assert s["epsilon"] == pytest.approx(library_epsilon(batch / n, sigma, s["steps"], 1e-5), rel=1e-12)


def test_under_dp_fedmedclips_private_head_is_linear_and_exports_with_its_logit_scale(
    synthetic_cache, tmp_path
):
    """With the default DP options each site's private MLP is a linear head on reference-standardised features
    whose logits are scaled at prediction; the exported classifier rebuilds that head from the site's tensors and
    gives the site's own results.json metrics."""
    from fedmedclip.engine import site_setups
    from fedmedclip.inference import load_classifier
    from fedmedclip.metrics import classification_report
    from fedmedclip.preparation import prepare

    cfg = config(
        synthetic_cache, tmp_path / "run", rounds=1, privacy={"target_epsilon": 8.0}, method_options={}
    ).validate()
    results = engine.train(cfg, progress=False)
    for k, setup in enumerate(site_setups(cfg, prepare(cfg, progress=False), None)):
        clf, _ = load_classifier(cfg.out, k)
        layers = list(clf.mlp.net)
        assert [type(m).__name__ for m in layers] == ["BatchNorm1d", "MaskedLinear"]
        assert not layers[0].affine and float(clf.mlp.logit_scale) == 10.0
        with torch.no_grad():
            got = classification_report(clf.head(setup.data.test_x).numpy(), setup.data.test_y.numpy())
        assert got == {k2: v for k2, v in results["metrics"]["sites"][k].items() if k2 != "site"}


@pytest.mark.parametrize(
    "option",
    [{"dp_batch_size": 0}, {"dp_epochs": float("nan")}, {"dp_logit_scale": -1.0}, {"dp_mlp_depth": True}],
)
def test_fedmedclips_dp_options_out_of_range_are_refused_naming_the_option(option):
    from fedmedclip.methods import METHODS, MethodContext

    ctx = MethodContext(feature_dim=8, num_classes=4, text_features=torch.zeros(4, 8), options=option)
    with pytest.raises(ConfigError, match=f"option {next(iter(option))}="):
        METHODS["fedmedclip"](ctx)


def _ledger(n: int, sigma: float, steps: int, planned: int, budget: float | None = None) -> dict:
    q = BATCH / n
    return {
        "epsilon": dpsgd_epsilon(q, sigma, steps, 1e-5),
        "delta": 1e-5,
        "noise_multiplier": sigma,
        "clip": 1.0,
        "sample_rate": q,
        "steps": steps,
        "planned_steps": planned,
        "n_train": n,
        "accountant": "rdp",
        "budget": budget,
        "stopped_at_round": None,
    }


def test_an_update_that_went_out_after_a_sites_last_report_is_accounted_at_its_plan():
    """The server aggregated site_1's update of round 2, but site_1 was gone before its report of round 2: its
    newest ledger is round 1's, which leaves out the steps behind that update. Its epsilon is then the most its
    plan allows (its own figure kept as `reported_epsilon`), never round 1's; site_2 sent updates and no usable
    report: the target bounds it, and without a target the largest epsilon is unknown rather than understated."""
    from fedmedclip.privacy.report import privacy_results

    sigma, n, per_round = 1.1, 35, 4
    sites = ["site_0", "site_1", "site_2"]
    history = [{"round": r, "sites_present": sites, "rejected": {}} for r in (1, 2)]
    reports = {
        r: {"sites": {s: {"privacy": _ledger(n, sigma, r * per_round, 2 * per_round)} for s in sites[:2]}}
        for r in (1, 2)
    }
    reports[2]["sites"]["site_1"] = None  # gone after uploading round 2
    section = privacy_results({"noise_multiplier": sigma}, sites, reports, history)["record_level"]
    planned = dpsgd_epsilon(BATCH / n, sigma, 2 * per_round, 1e-5)
    assert section["sites"]["site_1"]["epsilon"] == pytest.approx(planned)
    assert (
        section["sites"]["site_1"]["reported_epsilon"] == reports[1]["sites"]["site_1"]["privacy"]["epsilon"]
    )
    assert "reported_epsilon" not in section["sites"]["site_0"]
    assert section["unaccounted_rounds"] == {"site_1": [2], "site_2": [1, 2]}
    assert section["epsilon_max"] is None  # site_2: nothing bounds it without a target
    with_target = {"noise_multiplier": sigma, "target_epsilon": 50.0}
    for r in (1, 2):
        for s in sites[:2]:
            if reports[r]["sites"][s]:
                reports[r]["sites"][s]["privacy"]["budget"] = 50.0
    section = privacy_results(with_target, sites, reports, history)["record_level"]
    assert section["epsilon_max"] == 50.0  # site_2's bound: the most any site of the run may spend


def _close_round(r: int, sites: list[str], present: list[str], reports: dict, history: list[dict]) -> dict:
    """Round r's record as the server closes it (`_close_round`), from the run's reports and earlier records."""
    from fedmedclip.federation.records import round_record
    from fedmedclip.privacy.report import attach_epsilon

    zeros = dict.fromkeys(present, 0)
    record = round_record(
        r,
        {"report": {"acc": 0.5, "bacc": 0.5}},
        sites,
        reports[r]["sites"],
        present,
        {},
        zeros,
        zeros,
        1.0,
        finished_at=float(r),
    )
    return attach_epsilon(record, {"noise_multiplier": 1.1}, sites, reports, history)


def test_each_rounds_epsilon_max_counts_a_site_whose_report_is_missing_at_its_bound():
    """Round 2: site_1's update was aggregated but its report never came; round 3: site_1 was gone. Its newest
    ledger (round 1's) leaves out round 2's steps, so both rounds' epsilon_max count site_1 at its plan bound, as
    results.json's final figure does, never the other sites' lower maximum (what the live MLflow chart showed).
    Each round's figure is the final figure of the run ended there, and a resumed server, which reads its
    records and reports again from its checkpoint, closes the round with the same figure."""
    import json

    from fedmedclip.privacy.report import plan_bound, privacy_results

    sigma, per_round, planned = 1.1, 4, 12
    sites, n = ["site_0", "site_1", "site_2"], {"site_0": 35, "site_1": 20, "site_2": 35}
    present = {1: sites, 2: sites, 3: ["site_0", "site_2"]}
    reports = {
        r: {"sites": {s: {"privacy": _ledger(n[s], sigma, r * per_round, planned)} for s in present[r]}}
        for r in (1, 2, 3)
    }
    reports[2]["sites"]["site_1"] = None  # its update went out, its report did not
    history: list[dict] = []
    for r in (1, 2, 3):
        history.append(_close_round(r, sites, present[r], reports, history))

    site_1_bound = plan_bound(reports[1]["sites"]["site_1"]["privacy"], "rdp")
    others = [max(reports[r]["sites"][s]["privacy"]["epsilon"] for s in ("site_0", "site_2")) for r in (2, 3)]
    assert site_1_bound > max(others)  # what the record said without site_1 would be lower
    assert history[0]["epsilon_max"] == reports[1]["sites"]["site_1"]["privacy"]["epsilon"]
    for rec in history[1:]:
        assert rec["epsilon_max"] == pytest.approx(site_1_bound)
        assert next(row for row in rec["sites"] if row["site"] == "site_1")["epsilon"] is None
    for r in (1, 2, 3):
        ended_here = privacy_results(
            {"noise_multiplier": sigma}, sites, {k: v for k, v in reports.items() if k <= r}, history[:r]
        )
        assert history[r - 1]["epsilon_max"] == ended_here["record_level"]["epsilon_max"]

    # Resumed: the checkpoint's records and reports (JSON, round keys as text) read again give every round's
    # record, closed again, as it was.
    body = json.loads(json.dumps({"history": history, "reports": {str(r): v for r, v in reports.items()}}))
    resumed_reports = {int(r): v for r, v in body["reports"].items()}
    for r in (1, 2, 3):
        assert _close_round(r, sites, present[r], resumed_reports, body["history"][: r - 1]) == history[r - 1]

    # No ledger at all for site_1 and no target: unknown, never the other sites' maximum.
    reports[1]["sites"]["site_1"] = None
    assert _close_round(1, sites, present[1], reports, [])["epsilon_max"] is None


def test_a_restart_may_not_lower_the_quorum_the_sites_noise_is_sized_for(synthetic_cache, tmp_path):
    """With client-level noise at the sites each site adds N(0, (z S)^2 / quorum), the quorum of the manifest:
    a server restarted with a lower --quorum (an operational setting otherwise) would publish sums of fewer
    sites with less noise than the reported epsilon assumes. It is refused; the same or a higher one resumes."""
    from test_composition_audit import start_server

    from fedmedclip.federation.server import FederationError
    from fedmedclip.preparation import prepare

    cfg = TrainConfig(
        rounds=1,
        synthetic=SYNTH,
        cache_dir=str(synthetic_cache),
        out="unused",
        privacy={"client_noise": 1.0, "client_noise_at": "sites"},
    ).validate()
    p = prepare(cfg, progress=False)
    start_server(cfg, p, tmp_path, quorum=2)
    with pytest.raises(
        FederationError, match=r"noise at the sites, each share sized for its quorum 2: --quorum 1"
    ):
        start_server(cfg, p, tmp_path, quorum=1)
    assert start_server(cfg, p, tmp_path, quorum=3).manifest["quorum"] == 3


def test_a_damaged_noise_key_is_replaced_saying_so(tmp_path, caplog):
    """A party's noise key cut short (a crash mid-write) was replaced without a word: the operator learns it
    from one warning naming the file, and the new key is whole and kept."""
    from fedmedclip.federation.storage import LocalDirStore
    from fedmedclip.privacy.client import KEY_NAME, party_key

    store = LocalDirStore(tmp_path)
    store.put(KEY_NAME, b"short")
    key = party_key(store)
    assert len(key) == 32 and store.get(KEY_NAME) == key and party_key(store) == key
    assert f"{store.where(KEY_NAME)} holds 5 bytes, not a key: a new one is made" in caplog.text

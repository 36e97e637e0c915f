"""How the server, the sites and the data preparation are put together, checked by what they do: whose sample
count weighs which update (after a dropout, and when a site lies about its count), the defaults a run gets
(every site per round, the norm-outlier factor 10), the outlier rule measuring distance to the global module,
a resumed site keeping its error-feedback memory, and FACMIC's adaptation target. Each test was written
against a single-line change that used to pass the whole suite (issue 20); none needs ../shared."""

from __future__ import annotations

import pytest
import torch
from aggregation_oracle import weighted_mean
from conftest import SYNTH, train_interrupted
from test_engine import Killed, config

from fedmedclip import engine
from fedmedclip.codec import decode, encode
from fedmedclip.config import TrainConfig
from fedmedclip.federation.mailbox import Mailbox
from fedmedclip.federation.runner import method_for, server_setup
from fedmedclip.federation.server import FederationError, FederationServer, ServerOptions
from fedmedclip.federation.storage import LocalDirStore
from fedmedclip.preparation import SERVER, prepare

RUN = "audit"
SITES = ["site_0", "site_1", "site_2"]


@pytest.fixture(scope="module")
def skewed(synthetic_cache):
    """FACMIC (weights by sample size) on three sites of different sizes (Dirichlet 0.5 over the synthetic
    set), in batches of 4 so that FACMIC's count b·⌊n/b⌋ of each site is its training-set size itself; fp32
    both ways, so the published global module is the exact aggregate."""
    cfg = TrainConfig(
        method="facmic",
        partition="dirichlet",
        alpha=0.5,
        batch_size=4,
        rounds=3,
        synthetic=SYNTH,
        cache_dir=str(synthetic_cache),
        out="unused",
        method_options={"local_steps": 1},
        codec_up="fp32-zlib",
        codec_down="fp32-zlib",
    ).validate()
    p = prepare(cfg, progress=False)
    sizes = train_sizes(p)
    # What the weighting tests rely on: three different sizes, each a whole number of batches, and splits
    # whose val+test share differs between sites (so counting them changes the weights).
    assert len(set(sizes.values())) == 3 and all(n % 4 == 0 for n in sizes.values()), sizes
    totals = {s: sum(len(v) for v in p.partition.sites[s].values()) for s in SITES}
    assert len({totals[s] / sizes[s] for s in SITES}) > 1, (sizes, totals)
    return cfg, p


def train_sizes(p) -> dict[str, int]:
    """Each site's training-split size, read from the partition (the truth the server must weigh by)."""
    return {s: len(p.partition.sites[s]["train"]) for s in p.partition.site_names}


def start_server(cfg, p, tmp_path, **options) -> FederationServer:
    store = LocalDirStore(tmp_path / "mailbox")
    server = FederationServer(
        Mailbox(store, RUN),
        server_setup(cfg, p, method_for(cfg, p)),
        store.sub("server-state"),
        tmp_path / "out",
        ServerOptions(**options),
        verbose=False,
    )
    server.start()
    return server


def moved(server, seed: int, distance: float) -> dict[str, torch.Tensor]:
    """The round's global module with every float entry moved: a random direction, `distance` long in all."""
    g = torch.Generator().manual_seed(seed)
    floats = {k: v for k, v in server.received.items() if v.is_floating_point()}
    direction = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in floats.items()}
    norm = sum(float((d**2).sum()) for d in direction.values()) ** 0.5
    return {
        k: (v.double() + distance * direction[k] / norm).float() if k in floats else v.clone()
        for k, v in server.received.items()
    }


def send(server, site: str, state: dict, n_train: int) -> None:
    meta = {"run_id": RUN, "round": server.round, "site": site, "n_train": n_train, "loss": 1.0}
    server.mb.store.put(
        server.mb.update_key(server.round, site), encode(state, "fp32-zlib", meta=meta).payload
    )


def aggregate_round(server) -> dict[str, torch.Tensor]:
    """Poll the server through the round's aggregation (every update is in the mailbox already); the global
    module it published."""
    r = server.round
    for _ in range(100):
        if server.phase != "updates":
            break
        server.poll()
    assert server.phase == "reports" and server.round == r
    return decode(server.mb.store.get(server.mb.global_key(r))).state


def assert_module(got: dict, want: dict) -> None:
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------- aggregation weights


def test_after_a_dropout_each_present_site_weighs_by_its_own_training_split(skewed, tmp_path):
    """The middle site of three is absent: site_0 and site_2 are weighted 68 : 24 by their own training
    splits, not by the counts of the first two sites in the list."""
    cfg, p = skewed
    server = start_server(cfg, p, tmp_path, quorum=2, round_timeout=0)
    sizes = train_sizes(p)
    updates = {s: moved(server, seed, 0.5) for seed, s in ((0, "site_0"), (2, "site_2"))}
    for s, u in updates.items():
        send(server, s, u, sizes[s])
    got = aggregate_round(server)
    assert server.info["present"] == ["site_0", "site_2"]
    assert_module(got, weighted_mean(updates, sizes))


def test_a_site_that_reports_a_smaller_count_keeps_the_weight_of_its_training_split(skewed, tmp_path):
    """site_1 claims 1 training image instead of its 12 (a count the server cannot refuse: it is possible);
    the weights stay those of the partition the server holds, never what a site says."""
    cfg, p = skewed
    server = start_server(cfg, p, tmp_path)
    sizes = train_sizes(p)
    updates = {s: moved(server, k, 0.5) for k, s in enumerate(SITES)}
    for s, u in updates.items():
        send(server, s, u, 1 if s == "site_1" else sizes[s])
    got = aggregate_round(server)
    assert server.info["present"] == SITES and server.info["rejected"] == {}
    assert_module(got, weighted_mean(updates, sizes))


def test_the_count_the_server_holds_for_a_site_is_what_that_site_trains_on(skewed, tmp_path):
    """The manifest's count of a site (what aggregation weighs by, and what a site's claim is checked
    against) is the number of training images that site trains on: its validation and test images are not
    training samples."""
    cfg, p = skewed
    server = start_server(cfg, p, tmp_path)
    trained_on = {s.name: s.data.n_train for s in engine.site_setups(cfg, p, method_for(cfg, p))}
    assert {s["name"]: s["n_train"] for s in server.manifest["sites"]} == trained_on
    # ...and a site claiming its training plus validation images is refused, naming the bound.
    site = "site_0"
    split = p.partition.sites[site]
    send(server, site, moved(server, 0, 0.5), len(split["train"]) + len(split["val"]))
    server.poll()
    assert f"(1..{trained_on[site]})" in server._rejected[site]


# ----------------------------------------------------------------------------- defaults of a run


def test_by_default_a_round_needs_every_site(skewed, tmp_path):
    """With the default options a round does not close on two of three sites: when the round's time is up
    the run stops, naming the quorum of all three (a lower quorum is an explicit --quorum)."""
    cfg, p = skewed
    server = start_server(cfg, p, tmp_path, round_timeout=0, join_timeout=0)
    assert server.manifest["quorum"] == len(SITES)
    sizes = train_sizes(p)
    for k, s in enumerate(("site_0", "site_2")):
        send(server, s, moved(server, k, 0.5), sizes[s])
    with pytest.raises(FederationError, match=r"only 2 of 3 sites .* \(quorum 3\)"):
        for _ in range(100):
            server.poll()
    assert server.history == []


@pytest.mark.parametrize(("times", "kept"), [(5.0, True), (20.0, False)])
def test_by_default_an_update_20x_farther_from_the_global_module_is_rejected(skewed, tmp_path, times, kept):
    """Default options (only the quorum lowered, so that the round can close without the outlier): site_2's
    update lies `times` x the others' median distance from the global module. 20x is rejected, 5x kept:
    the default factor is 10, and it measures the distance to the global module, not the parameters' size
    (every update here has about the global module's norm)."""
    cfg, p = skewed
    server = start_server(cfg, p, tmp_path, quorum=2)
    sizes = train_sizes(p)
    distances = {"site_0": 0.01, "site_1": 0.012, "site_2": times * 0.011}
    for k, s in enumerate(SITES):
        send(server, s, moved(server, k, distances[s]), sizes[s])
    aggregate_round(server)
    if kept:
        assert server.info["present"] == SITES and server.info["rejected"] == {}
    else:
        assert server.info["present"] == ["site_0", "site_1"]
        assert "over 10x the median" in server.info["rejected"]["site_2"]


def test_train_uses_the_default_server_options(synthetic_cache, tmp_path, monkeypatch):
    """`fedmedclip train` (and so `compare`) runs the server with the defaults the tests above pin down."""
    seen = []
    start = FederationServer.start

    def record(self):
        seen.append({k: self.manifest[k] for k in ("quorum", "norm_factor")})
        return start(self)

    monkeypatch.setattr(FederationServer, "start", record)
    cfg = TrainConfig(rounds=1, synthetic=SYNTH, cache_dir=str(synthetic_cache), out=str(tmp_path / "run"))
    engine.train(cfg, progress=False)
    assert seen == [{"quorum": 3, "norm_factor": 10.0}]


# ----------------------------------------------------------------------------- resume


def test_a_resumed_site_keeps_its_error_feedback(synthetic_cache, tmp_path):
    """`delta-ef-q4-zlib` keeps each site's rounding error and sends it later. A run interrupted while round 3
    is half done (site_0 has trained it, site_1 has not) and resumed publishes exactly the global modules of
    the uninterrupted run in every round: each site resumed with the memory it had."""

    def cfg(out):
        return config("fedmedclip", synthetic_cache, out, rounds=5, codec_up="delta-ef-q4-zlib")

    straight = engine.train(cfg(tmp_path / "straight"), progress=False)
    out = tmp_path / "resumed"
    train_interrupted(cfg(out), 3, Killed)
    resumed = engine.train(cfg(out), resume=True, progress=False)
    for r in range(1, 6):
        name = f"rounds/global_round_{r:03d}.bin"
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert [h["bytes_up"] for h in resumed["history"]] == [h["bytes_up"] for h in straight["history"]]
    assert resumed["metrics"] == straight["metrics"]


# ----------------------------------------------------------------------------- FACMIC's adaptation target


def _server_rows(p, ids: list[str]) -> torch.Tensor:
    store = p.stores[SERVER]
    where = {iid: i for i, iid in enumerate(store.image_ids)}
    return store.features[[where[i] for i in ids]]


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> str:
    """'' when a and b hold the same rows in the same order, else what differs (a short message, not tensors)."""
    if a.shape != b.shape:
        return f"{a.shape[0]} rows instead of {b.shape[0]}"
    return "" if torch.equal(a, b) else "other rows"


def test_without_transductive_the_adaptation_target_is_the_held_out_reference_set(skewed, tmp_path):
    """FACMIC adapts toward the unlabelled images held out of the training pool, never toward the global test
    set, unless --transductive says so; both in-process sites and the sites of a mailbox run (which read the
    target from the run's shared tensors) get it."""
    cfg, p = skewed
    assert not cfg.transductive and p.partition.reference
    reference, global_test = _server_rows(p, p.partition.reference), _server_rows(p, p.partition.global_test)
    for s in engine.site_setups(cfg, p, method_for(cfg, p)):
        assert not (problem := _same_rows(s.data.reference_x, reference)), f"{s.name}: {problem}"
    server = start_server(cfg, p, tmp_path)
    from safetensors.torch import load

    shared = load(server.mb.store.get(server.mb.shared_key))
    assert not (problem := _same_rows(shared["reference_x"], reference)), f"shared reference_x: {problem}"
    # Not one image of the global test set is in the target.
    assert not (shared["reference_x"][:, None, :] == global_test[None, :, :]).all(-1).any()


def test_with_transductive_the_adaptation_target_is_the_global_test_set(synthetic_cache):
    cfg = TrainConfig(
        method="facmic",
        rounds=1,
        synthetic=SYNTH,
        cache_dir=str(synthetic_cache),
        out="unused",
        transductive=True,
    ).validate()
    p = prepare(cfg, progress=False)
    global_test = _server_rows(p, p.partition.global_test)
    for s in engine.site_setups(cfg, p, method_for(cfg, p)):
        assert not (problem := _same_rows(s.data.reference_x, global_test)), f"{s.name}: {problem}"

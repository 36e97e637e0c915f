"""Damaged private state recovers exactly or stops with a clear error; a crashed server says so; sites notice
a server whose heartbeat stopped. In-process parties over a local-directory mailbox (the processes' case is
tests/test_federation_runtime.py)."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import without_timing
from test_federation_validation import _parties, prepared, restarted, worker  # noqa: F401 (prepared is a fixture)

from fedmedclip.config import TrainConfig
from fedmedclip.federation.checkpoint import CheckpointStore
from fedmedclip.federation.site import DEFAULT_SILENCE_TIMEOUT, SiteFailure
from fedmedclip.federation.storage import LocalDirStore

ROUNDS = 4


def _cfg(prepared_cfg):
    return TrainConfig.from_json({**prepared_cfg.to_json(), "rounds": ROUNDS})


def _finish(server, sites) -> dict:
    while not (server.finished and all(s.finished for s in sites)):
        for s in sites:
            s.poll()
        server.poll()
    return json.loads((server.out / "results.json").read_text())


def _newest_slot(store_root):
    slots = [store_root / "ckpt" / s for s in ("a", "b")]
    return max(slots, key=lambda s: json.loads((s / "state.json").read_text())["seq"])


def _until(parties, done, limit: int = 10_000) -> None:
    for _ in range(limit):
        if done():
            return
        for party in parties:
            party.poll()
    raise AssertionError("the parties did not get there")


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):  # noqa: F811
    cfg, p = prepared
    tmp = tmp_path_factory.mktemp("uninterrupted")
    server, sites, *_ = _parties(_cfg(cfg), p, tmp, quorum=3)
    return _finish(server, sites), tmp


def test_a_server_killed_mid_write_leaves_no_partial_file_once_restarted(prepared, uninterrupted, tmp_path):  # noqa: F811
    """A server killed while writing a round's global module leaves that write's temporary file in its run
    directory (os.replace never ran); started again, it removes it, and the run directory ends as an
    uninterrupted run's: the finished files only."""
    cfg, p = prepared
    expected, expected_dir = uninterrupted
    first = tmp_path / "out" / ".config.json.a1b2c3.part"  # killed before its first checkpoint
    first.parent.mkdir()
    first.write_bytes(b"{")
    server, sites, mailbox, store, _ = _parties(_cfg(cfg), p, tmp_path, quorum=3)
    assert not first.exists()
    _until([*sites, server], lambda: server.round == 2)
    partial = server.out / "rounds" / ".global_round_002.bin.k3x9q1.part"  # as tempfile.mkstemp names it
    partial.write_bytes(b"half a module")
    server = restarted(server, store, server.out, quorum=3)
    assert not partial.exists()
    got = _finish(server, sites)
    assert without_timing(got) == without_timing(expected)
    names = sorted(f.name for f in (server.out / "rounds").iterdir())
    assert names == sorted(f.name for f in (expected_dir / "out" / "rounds").iterdir())


@pytest.mark.parametrize("damage", ["truncated", "removed"])
def test_a_site_whose_newest_checkpoint_is_lost_redoes_the_round_and_the_run_is_unchanged(
    damage,
    prepared,  # noqa: F811
    uninterrupted,
    tmp_path,
):
    """site_0 is killed right after sending its round-2 update; its newest checkpoint is then truncated (or
    removed). Started again, it resumes from its state after round 1, finds its own round-2 update in the
    mailbox, redoes round 2 from the round-1 global module (its update comes out byte-identical) and goes on:
    the run ends exactly as an uninterrupted one, and results.json records that site_0 resumed from older
    state."""
    cfg, p = prepared
    expected, expected_dir = uninterrupted
    server, sites, mailbox, store, setups = _parties(_cfg(cfg), p, tmp_path, quorum=3)
    _until([*sites, server], lambda: sites[0].trained == 2)
    sent = mailbox.store.get(mailbox.update_key(2, "site_0"))
    slot = _newest_slot(store.root / "state-site_0")
    if damage == "truncated":
        (slot / "tensors.pt").write_bytes((slot / "tensors.pt").read_bytes()[:1000])
    else:
        for f in slot.iterdir():
            f.unlink()
    sites[0] = worker(server, mailbox, store, setups[0])  # the site started again on its damaged state
    assert sites[0].trained == 1
    got = _finish(server, sites)
    assert mailbox.store.get(mailbox.update_key(2, "site_0")) == sent
    recovery = got.pop("recovery")
    assert [(e["party"], e["round"]) for e in recovery] == [("site_0", 1)]
    # A truncated slot is seen at once; a removed one (its files gone, as if never written) when the site
    # finds its own round-2 update in the mailbox.
    assert ("was in the mailbox" if damage == "removed" else "sha256") in recovery[0]["reason"]
    expected = {k: v for k, v in expected.items() if k != "recovery"}
    assert without_timing(got) == without_timing(expected)
    for r in range(1, ROUNDS + 1):
        assert (
            mailbox.store.get(mailbox.global_key(r))
            == (expected_dir / "mailbox" / mailbox.global_key(r)).read_bytes()
        )
    for s in ("site_0", "site_1", "site_2"):
        mine = store.root / f"state-{s}" / "model" / f"site_{s}.safetensors"
        assert (
            mine.read_bytes() == (expected_dir / "mailbox" / f"state-{s}" / "model" / mine.name).read_bytes()
        )


def test_a_site_that_cannot_redo_what_it_lost_stops_with_a_clear_error(prepared, tmp_path):  # noqa: F811
    """As above, but the global module it would redo round 2 from is gone from the mailbox: it stops, saying
    why and what to do, instead of skipping a round of its own training."""
    cfg, p = prepared
    server, sites, mailbox, store, setups = _parties(_cfg(cfg), p, tmp_path, quorum=3)
    _until([*sites, server], lambda: sites[0].trained == 2)
    (_newest_slot(store.root / "state-site_0") / "tensors.pt").write_bytes(b"")
    _until([*sites[1:], server], lambda: mailbox.store.exists(mailbox.global_key(2)))
    mailbox.store.delete(mailbox.global_key(1))
    again = worker(server, mailbox, store, setups[0])
    with pytest.raises(
        SiteFailure, match="global module of round 1 it would redo that round from is no longer"
    ):
        again.poll()


def test_a_server_that_crashes_says_failed_and_its_sites_end_with_a_clear_message(prepared, tmp_path):  # noqa: F811
    """An unexpected exception in the server (its run directory cannot be written): its status says `failed`
    with the reason, and the sites, which would otherwise wait for the next global module, end saying so."""
    cfg, p = prepared
    server, sites, mailbox, *_ = _parties(_cfg(cfg), p, tmp_path, quorum=3)
    (tmp_path / "out" / "rounds").write_text("a file where the server's rounds folder goes")
    with ThreadPoolExecutor(4) as pool:
        ran = pool.submit(server.run)
        ended = [pool.submit(s.run, 600, 0.05) for s in sites]
        with pytest.raises(OSError):
            ran.result(timeout=600)
        for e in ended:
            with pytest.raises(
                SiteFailure, match="the server ended run hostile: the server stopped: FileExistsError"
            ):
                e.result(timeout=600)
    status = mailbox.status("server")
    assert status.state == "failed" and "FileExistsError" in status.message


def test_a_site_notices_a_server_whose_heartbeat_stopped(prepared, tmp_path, caplog):  # noqa: F811
    """The server published round 0 and then went silent (its process frozen, its machine gone): the site
    trains round 1, waits, logs that the server's heartbeat stopped and gives up after its silence timeout
    with a message saying what it saw and what to do; the default timeout is not "never"."""
    cfg, p = prepared
    server, sites, *_ = _parties(_cfg(cfg), p, tmp_path, quorum=3, workers=1)
    caplog.set_level(logging.WARNING, logger="fedmedclip.site")
    with pytest.raises(SiteFailure) as err:
        sites[0].run(timeout=1.0, poll_cap=0.05)
    message = str(err.value)
    assert (
        "no heartbeat from the server for" in message
        and "its status still says waiting_updates round 1" in message
    )
    assert "--silence-timeout 1 s" in message and "Start it again with the same arguments" in message
    assert sites[0].trained == 1
    assert any("no heartbeat from the server" in r.getMessage() for r in caplog.records)
    from fedmedclip.cli import build_parser

    args = build_parser().parse_args(["site", "run", "--mailbox", "m", "--run-id", "r", "--site", "site_0"])
    assert args.silence_timeout == DEFAULT_SILENCE_TIMEOUT < float("inf")


def test_a_beating_server_keeps_a_waiting_site(prepared, tmp_path, monkeypatch):  # noqa: F811
    """The heartbeat, not progress, is what keeps a site waiting: while the server beats (here: just before
    each of the site's reads of its status), the site goes on waiting past its silence timeout; once the
    beats stop, it gives up."""
    import fedmedclip.federation.site as site_module

    cfg, p = prepared
    server, sites, *_ = _parties(_cfg(cfg), p, tmp_path, quorum=3, workers=1)
    site = sites[0]
    _until([site], lambda: site.trained == 1)
    monkeypatch.setattr(site_module, "SERVER_STATUS_EVERY", 0.05)
    reads, original = [], site._check_server
    started = time.monotonic()

    def beating_then_silent():
        if time.monotonic() - started < 2 * TIMEOUT:  # two timeouts of beats, then silence
            server._beat()
        reads.append(server.mb.status("server").time)
        return original()

    site._check_server = beating_then_silent
    with pytest.raises(SiteFailure, match="no heartbeat"):
        site.run(timeout=TIMEOUT, poll_cap=0.02)
    assert time.monotonic() - started > 2 * TIMEOUT and len(set(reads)) > 3


TIMEOUT = 1.0


class RoundTripDirStore(LocalDirStore):
    """A real local directory taken for a store of round trips (S3): a checkpoint's two files go at once."""

    cheap_polls = False


@pytest.mark.parametrize("landed", ["state.json", "tensors.pt"])
def test_a_checkpoint_torn_either_way_is_passed_over_for_the_other_slot(tmp_path, landed):
    """Over S3 a save writes its two files at the same time, so a crash may leave either one of them new in
    its slot: the digest finds the slot torn both ways, and the other slot, one save older, is loaded."""
    store = CheckpointStore(RoundTripDirStore(tmp_path / "ckpt"), "server")
    for r in (1, 2):  # slots a and b
        store.save({"round": r}, {"w": torch.full((2,), float(r))})
    scratch = CheckpointStore(RoundTripDirStore(tmp_path / "scratch"), "server")
    for r in (1, 2, 3):  # the same saves elsewhere: save 3 goes to slot a
        scratch.save({"round": r}, {"w": torch.full((2,), float(r))})
    (tmp_path / "ckpt" / "a" / landed).write_bytes((tmp_path / "scratch" / "a" / landed).read_bytes())
    seq, body, tensors = CheckpointStore(RoundTripDirStore(tmp_path / "ckpt"), "server").load()
    assert body == {"round": 2} and seq == 1 and torch.equal(tensors["w"], torch.full((2,), 2.0))


def test_a_first_save_torn_before_its_state_landed_is_named_torn(tmp_path):
    """A party killed during its second save ever, after tensors.pt landed in the fresh slot b and before its
    state.json did: the slot is passed over for slot a, and the recovery record says why in words."""
    store = CheckpointStore(RoundTripDirStore(tmp_path / "ckpt"), "site_1")
    store.save({"round": 1}, {"w": torch.ones(2)})
    scratch = CheckpointStore(RoundTripDirStore(tmp_path / "scratch"), "site_1")
    for r in (1, 2):
        scratch.save({"round": r}, {"w": torch.full((2,), float(r))})
    (tmp_path / "ckpt" / "b").mkdir()
    (tmp_path / "ckpt" / "b" / "tensors.pt").write_bytes(
        (tmp_path / "scratch" / "b" / "tensors.pt").read_bytes()
    )
    reloaded = CheckpointStore(RoundTripDirStore(tmp_path / "ckpt"), "site_1")
    seq, body, _ = reloaded.load()
    assert (seq, body) == (0, {"round": 1})
    [problem] = reloaded.problems
    assert "b: tensors.pt without its state.json (a save torn by a crash" in problem, problem


@pytest.mark.parametrize("damage", [b"null", b"[]", b'"state"', b"[" * 100_000])
def test_a_state_json_damaged_into_other_json_is_passed_over_and_saved_over(tmp_path, damage):
    """Slot a's state.json damaged into JSON that is no checkpoint (null, an array, a string, brackets nested
    past the parser's depth): `load` passes it over for slot b and names the damage, and the party's next
    saves go on (the first into the damaged slot). The next save stopped with an AttributeError instead, and
    the nesting stopped `load` with a RecursionError: at every restart, since the damaged slot stayed."""
    store = CheckpointStore(RoundTripDirStore(tmp_path / "ckpt"), "server")
    for r in (1, 2):  # slots a and b
        store.save({"round": r}, {"w": torch.full((2,), float(r))})
    (tmp_path / "ckpt" / "a" / "state.json").write_bytes(damage)
    restarted_store = CheckpointStore(RoundTripDirStore(tmp_path / "ckpt"), "server")
    seq, body, _ = restarted_store.load()
    assert (seq, body) == (1, {"round": 2})
    [problem] = restarted_store.problems
    assert "a: unreadable state.json" in problem, problem
    assert restarted_store.save({"round": 3}, {"w": torch.full((2,), 3.0)}) == 2
    assert restarted_store.save({"round": 4}, {"w": torch.full((2,), 4.0)}) == 3
    seq, body, _ = CheckpointStore(RoundTripDirStore(tmp_path / "ckpt"), "server").load()
    assert (seq, body) == (3, {"round": 4})


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ({"sites": "site_0"}, "sites: input should be a valid list"),
        ({"clip_updates": "yes"}, "clip_updates: input should be a valid boolean"),
        ({"backbone": {"name": "tiny"}}, "backbone.weights_sha256: field required"),
    ],
)
def test_a_site_refuses_a_manifest_that_breaks_its_declaration_in_one_line(
    prepared,  # noqa: F811
    tmp_path,
    capsys,
    damage,
    problem,
):
    """The manifest the server wrote, damaged into other JSON (by whoever can write the bucket): a site stops
    with one line naming the server and the field (it indexed the JSON and died with a TypeError's traceback)."""
    from fedmedclip.cli import main

    cfg, p = prepared
    server, *_ = _parties(_cfg(cfg), p, tmp_path, quorum=3)
    key = tmp_path / "mailbox" / "runs" / "hostile" / "manifest.json"
    key.write_text(json.dumps({**json.loads(key.read_text()), **damage}))
    code = main(
        ["site", "run", "--mailbox", str(tmp_path / "mailbox"), "--run-id", "hostile", "--site", "site_0",
         "--state", str(tmp_path / "state"), "--join-timeout", "5"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: run_manifest from server") and problem in err[-1], err
    assert "Traceback" not in "\n".join(err)

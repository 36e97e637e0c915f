"""Secure aggregation in the federation runtime: the server's sub-phases and the sites' steps over a
local-directory mailbox, with real keys, shares and masks. A site that drops after its masked upload, or after
sharing, leaves the round's aggregate exactly what the protocol promises; a forged key advertisement, an
unregistered key and a wrongly masked update are refused; and `server run` / `site run` processes killed
with SIGKILL mid-protocol end identical to an uninterrupted secure run of `fedmedclip train`."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SYNTH, run_workers_at_once, without_timing

from fedmedclip import engine
from fedmedclip.codec import decode
from fedmedclip.codec.wire import unpack
from fedmedclip.config import TrainConfig
from fedmedclip.errors import ConfigError
from fedmedclip.export import run_privacy
from fedmedclip.federation.mailbox import Mailbox
from fedmedclip.federation.messages import KeyAdvertisement, Roster, signed_bytes
from fedmedclip.federation.server import FederationError, FederationServer, ServerOptions
from fedmedclip.federation.site import SiteFailure, SiteWorker
from fedmedclip.federation.storage import LocalDirStore
from fedmedclip.model_card import build_card
from fedmedclip.preparation import prepare
from fedmedclip.privacy.report import privacy_summary
from fedmedclip.secagg.identity import IdentityKey
from fedmedclip.secagg.protocol import verified_roster

RUN = "secure"
SITES = ("site_0", "site_1", "site_2")
CODEC = "delta-ef-q4-zlib"
CEILING = 900  # only ends a broken run; every wait is for an event
TIMEOUT = 1.0  # the round timeout of the in-process federations: how long an absent site is waited for


@pytest.fixture(scope="module")
def prepared(synthetic_cache):
    cfg = TrainConfig(
        rounds=1,
        synthetic=SYNTH,
        cache_dir=str(synthetic_cache),
        out="unused",
        codec_up=CODEC,
        secure_aggregation=True,
    )
    return cfg, prepare(cfg, progress=False)


@pytest.fixture(scope="module")
def keys() -> dict[str, IdentityKey]:
    return {s: IdentityKey.generate() for s in SITES}


class Federation:
    """A server and site workers of secure rounds over a local-directory mailbox, polled in turn."""

    def __init__(self, prepared, keys, tmp: Path, workers=SITES, identity=None, timeout: float = TIMEOUT):
        cfg, p = prepared
        method = engine.method_for(cfg, p)
        self.store = LocalDirStore(tmp / "mailbox")
        self.mb = Mailbox(self.store, RUN)
        self.out, self.keys, self.timeout = tmp / "out", keys, timeout
        self.server_setup = engine.server_setup(cfg, p, method)
        self.server = self.new_server()
        self.setups = {s.name: s for s in engine.site_setups(cfg, p, method)}
        self.sites = {s: self.new_site(s, (identity or {}).get(s, keys[s])) for s in workers}

    def new_server(self) -> FederationServer:
        """The server (started again: a new process on the same state and mailbox)."""
        server = FederationServer(
            self.mb,
            self.server_setup,
            self.store.sub("server-state"),
            self.out,
            ServerOptions(quorum=2, round_timeout=self.timeout, join_timeout=self.timeout),
            verbose=False,
            identities={s: k.public for s, k in self.keys.items()},
        )
        server.start()
        return server

    def new_site(self, name: str, identity=None) -> SiteWorker:
        """Site `name`'s worker (started again: a new process on the same state)."""
        state = self.store.sub(f"state-{name}")
        return SiteWorker(
            self.mb,
            self.server.manifest,
            self.setups[name],
            state,
            verbose=False,
            identity=identity or self.keys[name],
        )

    def round_one(self, gone=lambda name, site: False) -> bytes:
        """Poll until the global module of round 1 is out (a site for which `gone` says so is no longer
        polled: it dropped out); its bytes."""
        deadline = time.monotonic() + CEILING
        key = self.mb.global_key(1)
        while not self.mb.store.exists(key):
            assert time.monotonic() < deadline, "the round never ended"
            progressed = any([s.poll() for n, s in self.sites.items() if not gone(n, s)])
            if not (self.server.poll() or progressed):
                time.sleep(0.02)  # waiting for a timeout: an absent site
        return self.mb.store.get(key)

    @property
    def record(self) -> dict:
        return self.server.info


def _state(payload: bytes) -> dict:
    return decode(payload).state


def test_dropouts_leave_the_round_exactly_what_the_protocol_promises(prepared, keys, tmp_path):
    """Every site honest; site_2 gone after uploading its masked update (its self-mask is rebuilt from the
    others' shares, its update stays in the sum); site_2 gone after sharing, before masking (its pairwise masks
    are rebuilt and removed); site_2 never there. Masks differ in every run, sums are exact: the first two
    publish the very same module, and so do the last two."""
    honest = Federation(prepared, keys, tmp_path / "honest")
    everyone = honest.round_one()
    assert honest.record["secure_aggregation"]["answered"] == list(SITES)
    # What the server stored is masked: the secure form of the 4-bit codec, never the plain one.
    stored = honest.mb.store.get(honest.mb.update_key(1, "site_1"))
    assert unpack(stored)[1]["codec"] == f"{CODEC}+secagg"

    after_upload = Federation(prepared, keys, tmp_path / "after-upload")
    got = after_upload.round_one(gone=lambda n, s: n == "site_2" and s.pending is not None)
    rec = after_upload.record
    assert rec["present"] == list(SITES) and rec["secure_aggregation"]["answered"] == ["site_0", "site_1"]
    assert got == everyone

    def shared(n, s):
        return n == "site_2" and s.mb.store.exists(s.mb.secagg_key(1, "shares", "site_2"))

    before_upload = Federation(prepared, keys, tmp_path / "before-upload")
    without = before_upload.round_one(gone=shared)
    rec = before_upload.record
    assert rec["present"] == ["site_0", "site_1"]
    assert rec["secure_aggregation"]["shared"] == list(SITES)
    never = Federation(prepared, keys, tmp_path / "never", workers=SITES[:2])
    assert never.round_one() == without
    assert never.record["secure_aggregation"]["advertised"] == ["site_0", "site_1"]
    # Both are real aggregates: round 1 moved the module, and site_2's update made a difference.
    zero, a, b = (_state(x) for x in (honest.mb.store.get(honest.mb.global_key(0)), without, everyone))
    assert any(not torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(zero[k], b[k]) for k in b)


_DIGESTS: dict = {}


def _written(root: Path) -> dict:
    """What the parties have written under `root` (mailbox and states), heartbeats left out, as digests of
    the files' bytes: an object written again with the same bytes is no new step."""
    out = {}
    for f in root.rglob("*"):
        if f.is_file() and "status" not in f.parts:
            st = f.stat()
            key = (str(f), st.st_mtime_ns, st.st_size)
            if key not in _DIGESTS:
                _DIGESTS[key] = hashlib.sha256(f.read_bytes()).hexdigest()
            out[str(f)] = _DIGESTS[key]
    return out


def test_every_party_restarted_after_every_step_ends_as_an_uninterrupted_run(prepared, keys, tmp_path):
    """Two secure rounds in which, after every step that writes something new (an advertisement, shares, a
    masked upload and checkpoint, an answer, a report; each of the server's sub-phases, its reports and its
    end), the party that took it is replaced by a new one on the same state and mailbox, as a restarted process
    would be: the run's results and global modules are an uninterrupted run's."""
    cfg, p = prepared
    two = (TrainConfig(**{**cfg.to_json(), "rounds": 2}), p)

    def run(tmp: Path, restart: bool) -> tuple[dict, list[bytes]]:
        fed = Federation(two, keys, tmp, timeout=CEILING)  # every site answers: nothing is waited out
        deadline, restarts = time.monotonic() + CEILING, 0
        while not (fed.server.finished and all(s.finished for s in fed.sites.values())):
            assert time.monotonic() < deadline, "the run never ended"
            for name in SITES:
                before = _written(tmp) if restart else None
                if fed.sites[name].poll() and restart and _written(tmp) != before:
                    fed.sites[name], restarts = fed.new_site(name), restarts + 1
            before = _written(tmp) if restart else None
            if fed.server.poll() and restart and _written(tmp) != before and not fed.server.finished:
                fed.server, restarts = fed.new_server(), restarts + 1
        assert restarts > 20 or not restart
        return without_timing(fed.server.results), [fed.mb.store.get(fed.mb.global_key(r)) for r in (1, 2)]

    assert run(tmp_path / "restarted", restart=True) == run(tmp_path / "straight", restart=False)


def test_forged_keys_unregistered_keys_and_wrong_masks_are_refused(prepared, keys, tmp_path, monkeypatch):
    # A site started with a key other than the one registered for it refuses to start.
    with pytest.raises(SiteFailure, match="identity key of site_1 .* is not the one registered"):
        Federation(prepared, keys, tmp_path / "stranger", identity={"site_1": IdentityKey.generate()})
    # Someone with write access to the bucket puts an advertisement for site_1 before site_1 does, with
    # keys of their own: its signature is not site_1's registered key. The server sets it aside naming site_1,
    # site_1 (which never replaces its own object) sits the round out, and the round aggregates the others.
    forged = Federation(prepared, keys, tmp_path / "forged")
    honest = forged.sites["site_0"].secure.protocol(1).advertisement(keys["site_0"]).to_dict()
    fake = KeyAdvertisement.build(**{**honest, "site": "site_1"})
    forged.mb.put_message(forged.mb.secagg_key(1, "keys", "site_1"), fake)
    forged.round_one()
    rec = forged.record
    assert "not by the identity key registered for site_1" in rec["rejected"]["site_1"]
    assert rec["present"] == ["site_0", "site_2"]
    # site_1 masks with something other than its masks: the unmasked sum is garbage, with integers beyond
    # what 3 sites' values in [-L, L] can sum to. The round fails and the global module stays as it was.
    from fedmedclip.secagg.protocol import SiteRound

    masks = SiteRound.masks

    def wrong(self, roster, inbox, length, bits):
        m = masks(self, roster, inbox, length, bits)
        noise = np.random.default_rng(0).integers(0, 1 << bits, length)
        return m if self.site != "site_1" else (m + noise) % (1 << bits)

    monkeypatch.setattr(SiteRound, "masks", wrong)
    garbled = Federation(prepared, keys, tmp_path / "garbled")
    before = garbled.server.received
    after = _state(garbled.round_one())
    assert "values beyond the +-15 that 3 sites" in garbled.record["failed"]
    assert garbled.record["present"] == []
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_secure_aggregation_needs_registered_keys_and_says_so_in_the_results(prepared, keys, tmp_path):
    """A server without every site's key refuses to start; what would need a single update is refused up
    front; a `train` run with secure aggregation and client-level DP (the sites clip to S/2, the server noises
    the unmasked sum) generates each site's key in its private state and says `secure aggregation on`."""
    cfg, p = prepared
    method = engine.method_for(cfg, p)
    with pytest.raises(FederationError, match="no identity key is registered for site_2"):
        FederationServer(
            Mailbox(LocalDirStore(tmp_path / "mb"), RUN),
            engine.server_setup(cfg, p, method),
            LocalDirStore(tmp_path / "state"),
            tmp_path / "out",
            identities={s: keys[s].public for s in SITES[:2]},
        )
    base = {**cfg.to_json(), "out": str(tmp_path / "train")}
    for bad, why in (
        ({"aggregator": "median"}, "needs each site's update"),
        ({"secagg_threshold": 1}, "must be above half the 3 sites"),
        ({"privacy": {"client_noise": 1.0, "client_noise_at": "sites"}}, "noise at the sites needs discrete"),
        ({"privacy": {"client_noise": 1.0, "client_quantile": 0.5}}, "adaptive clipping"),
        ({"secure_aggregation": False, "secagg_threshold": 2}, "needs --secure-aggregation"),
        ({"method": "zeroshot"}, "zeroshot sends no parameters"),  # before any work, not by the server
    ):
        with pytest.raises(ConfigError, match=why):
            TrainConfig(**{**base, **bad}).validate()
    results = engine.train(
        TrainConfig(**{**base, "privacy": {"client_noise": 0.5, "client_clip": 0.2}}), progress=False
    )
    assert results["privacy"]["secure_aggregation"] is True and results["privacy"]["client_level"]["epsilon"]
    assert results["comm"]["codec_up"] == f"{CODEC}+secagg"
    assert privacy_summary(results)["dp.secure_aggregation"] == "on"
    # What the registry's tags, the ONNX metadata and the model card show comes from that summary.
    assert run_privacy(tmp_path / "train")["dp.secure_aggregation"] == "on"
    assert build_card(tmp_path / "train")["privacy"]["dp.secure_aggregation"] == "on"
    manifest = json.loads(
        (tmp_path / "train" / "checkpoint" / "mailbox" / "runs" / "inprocess" / "manifest.json").read_text()
    )
    sec = manifest["secure_aggregation"]
    assert sec["threshold"] == 2 and sorted(sec["identities"]) == list(SITES) and sec["bound"] == 0.1
    assert set(sec["weights"].values()) == {1 / 3}  # client-level DP's equal-weight mean
    # Each site's identity key was generated in its own private state, readable by its owner only.
    pem = tmp_path / "train" / "checkpoint" / "sites" / "site_0" / "identity.pem"
    assert IdentityKey.load(pem).public == sec["identities"]["site_0"] and pem.stat().st_mode & 0o077 == 0


@pytest.mark.slow
def test_parties_killed_mid_protocol_end_identical_to_an_uninterrupted_secure_run(
    synthetic_cache, tmp_path, capsys
):
    """`server run` and `site run` over a local-directory mailbox, onboarded as a deployment is (each site
    generates its identity key, the operator gives the public keys to the server). The server and site_1 run
    as processes (the other two sites as threads of this one): site_1 is killed with SIGKILL after sending its
    shares of round 2 (before training it), the server once it has fixed round 2's survivors; both restart with the same arguments.
    The run ends with the metrics, global modules and model files of an uninterrupted secure `fedmedclip
    train` of the same seed (the masks differ, the sums are exact)."""
    from concurrent.futures import ThreadPoolExecutor

    from test_federation_runtime import Party, _env, assert_same_run, common_args, wait_for

    from fedmedclip.cli import main

    cache, run, rounds = synthetic_cache, "killed", 2
    keys = {}
    for s in SITES:
        assert main(["-q", "site", "keygen", "--state", str(tmp_path / "identity" / s)]) == 0
        keys[s] = capsys.readouterr().out.strip()
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    mailbox = tmp_path / "mailbox"
    secure = ["--secure-aggregation", "--site-keys", str(tmp_path / "keys.json"), "--codec-up", CODEC]
    server = Party(
        ["server", "run", "--mailbox", str(mailbox), "--run-id", run, "--out", str(tmp_path / "server")]
        + ["--no-track", *secure, *common_args(cache, rounds=rounds)],
        tmp_path / "server.log",
        _env(),
    )

    def site(name: str) -> list[str]:
        state, identity = tmp_path / "state" / name, tmp_path / "identity" / name / "identity.pem"
        where = ["--mailbox", str(mailbox), "--run-id", run, "--cache-dir", str(cache)]
        return ["site", "run", "--site", name, *where, "--state", str(state), "--identity", str(identity)]

    killed = Party(site("site_1"), tmp_path / "site_1.log", _env())
    with ThreadPoolExecutor(2) as pool:
        others = [pool.submit(main, ["-q", *site(s)]) for s in ("site_0", "site_2")]
        # Meanwhile, the uninterrupted run to compare with.
        expected = tmp_path / "train"
        cfg = TrainConfig(
            rounds=rounds,
            synthetic=SYNTH,
            cache_dir=str(cache),
            out=str(expected),
            codec_up=CODEC,
            secure_aggregation=True,
        )
        engine.train(cfg, progress=False, run_id=run)
        r2 = mailbox / "runs" / run / "rounds" / "0002" / "secagg"
        wait_for(lambda: (r2 / "shares" / "site_1.json").exists(), "site_1's shares of round 2")
        killed.kill()
        killed.start()
        wait_for(lambda: (r2 / "survivors.json").exists(), "the survivors of round 2")
        server.kill()
        server.start()
        assert server.wait() == 0, server.output()
        assert killed.wait() == 0, killed.output()
        assert [f.result(timeout=CEILING) for f in others] == [0, 0]
    assert "resuming" in server.output() and "resuming" in killed.output()
    assert_same_run(expected, tmp_path / "server", {s: tmp_path / "state" / s for s in SITES})
    results = json.loads((tmp_path / "server" / "results.json").read_text())
    assert [rec["secure_aggregation"]["survivors"] for rec in results["history"]] == [list(SITES)] * rounds


def test_pipeline_workers_generate_and_register_their_keys(synthetic_cache, tmp_path, monkeypatch):
    """The pipeline's workers (here as threads over a local-directory mailbox): each site generates its
    identity key in its own private prefix and registers it through the mailbox, the server takes the
    registered keys into the manifest; the run is the engine's secure run."""
    from components.kfp_components import pipeline_settings
    from components.prepare.component import prepare_step
    from components.report.component import report_step

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_id, mailbox = "pipeline", str(tmp_path / "mailbox")
    cfg = TrainConfig(
        rounds=1, synthetic=SYNTH, cache_dir=str(synthetic_cache), codec_up=CODEC, secure_aggregation=True
    )
    parties = prepare_step(pipeline_settings(cfg.validate()), "", mailbox)
    assert run_workers_at_once(parties, run_id) == [""] * len(parties)
    results, _ = report_step(mailbox, run_id, str(tmp_path / "run_dir"))
    manifest = json.loads(Path(mailbox, "runs", run_id, "manifest.json").read_text())
    for k, s in enumerate(SITES):
        key = IdentityKey.load(Path(mailbox, "sites", str(k), "private", "identity.pem"))
        assert manifest["secure_aggregation"]["identities"][s] == key.public
    cfg.out = str(tmp_path / "engine")
    assert without_timing(results) == without_timing(engine.train(cfg, progress=False, run_id=run_id))


def test_server_run_asks_for_the_sites_keys(tmp_path, capsys):
    """`server run --secure-aggregation` needs the sites' public keys, from a JSON file or the mailbox; a bad
    file is named in a one-line error, before any work."""
    from fedmedclip.cli import main

    args = ["-q", "server", "run", "--mailbox", str(tmp_path / "mb"), "--run-id", "r", "--out", str(tmp_path)]
    assert main([*args, "--no-track", "--secure-aggregation"]) == 2
    assert "needs the sites' public identity keys: --site-keys FILE" in capsys.readouterr().err
    (tmp_path / "keys.json").write_text('["ed25519:..."]')
    assert (
        main([*args, "--no-track", "--secure-aggregation", "--site-keys", str(tmp_path / "keys.json")]) == 2
    )
    assert "must hold a JSON object" in capsys.readouterr().err
    assert main([*args, "--no-track", "--site-keys", "mailbox"]) == 2
    assert "--secure-aggregation, which is off" in capsys.readouterr().err


# ------------------------------------------------------------- a hostile site, a damaged private record
def _signed_advertisement(keys: dict, protocol, **change) -> KeyAdvertisement:
    """A site's own advertisement of round 1 (`protocol`: its SiteRound) with `change` applied, signed again
    with its own valid key."""
    key = keys[protocol.site]
    fields = protocol.advertisement(key).to_dict()
    fields.pop("signature")
    fields.update(change)
    signature = key.sign(signed_bytes(*fields.values()))
    return KeyAdvertisement.build(**fields, signature=base64.b64encode(signature).decode())


@pytest.mark.parametrize("which", ["cipher_key", "mask_key"])
def test_a_low_order_public_key_signed_by_its_own_site_is_refused_at_the_server(
    which, prepared, keys, tmp_path
):
    """site_2 signs, with its own registered key, an advertisement whose X25519 key is a low-order point (all
    zeros), with which no shared key can be agreed, and shares its seeds as the protocol says. Before: the
    server accepted it (the signature is valid) and put it in the roster; every honest site then stopped with
    `ValueError: Error computing shared key` when it sealed its shares (a zero cipher key) or masked its update
    (a zero mask key), and again at every restart. Now the server refuses the advertisement naming site_2, and
    the round aggregates the honest sites."""
    fed = Federation(prepared, keys, tmp_path)
    hostile = fed.sites.pop("site_2").secure.protocol(1)  # site_2 is played by hand from here on
    zero = base64.b64encode(bytes(32)).decode()
    fed.mb.put_message(
        fed.mb.secagg_key(1, "keys", "site_2"),
        _signed_advertisement(keys, hostile, **{which: zero}),
    )
    # Its shares once the roster is out: sealed as an honest site's, whatever its own entry in the roster says.
    hostile._roster = lambda roster: verified_roster(hostile.settings, hostile.run_id, 1, roster)
    roster_key = fed.mb.secagg_key(1, "roster")
    for _ in range(1000):
        if fed.store.exists(roster_key):
            break
        fed.server.poll()
        for site in fed.sites.values():
            site.poll()
    roster = fed.mb.read_message(roster_key, Roster, "server")
    fed.mb.put_message(fed.mb.secagg_key(1, "shares", "site_2"), hostile.share_bundle(roster))
    fed.round_one()
    rec = fed.record
    assert "low-order" in rec["rejected"].get("site_2", ""), rec["rejected"]
    assert rec["present"] == ["site_0", "site_1"]


@pytest.mark.parametrize("damage", [b'{"run_id": "secure", "rou', b"[]", b"\xff\xfe"])
def test_a_damaged_record_of_the_survivors_answered_sits_the_round_out(damage, prepared, keys, tmp_path):
    """site_0's private record of the survivors it answered (secagg/answered.json) is damaged on its disk.
    Before: the site stopped with a JSONDecodeError or AttributeError traceback when the
    survivors came out, and again at every restart (it reads the record first). Now it does not answer (it
    cannot know whether it answered other survivors of this round) and says why; the others unmask the
    round."""
    fed = Federation(prepared, keys, tmp_path)
    fed.store.put("state-site_0/secagg/answered.json", damage)
    fed.round_one()
    rec = fed.record
    assert rec["secure_aggregation"]["answered"] == ["site_1", "site_2"]
    assert rec["present"] == list(SITES) and not rec["failed"]
    assert fed.sites["site_0"].secure._out is not None


# ------------------------------------------------------------- a hostile or damaged manifest
@pytest.mark.parametrize(
    "entry, value",
    [
        ("threshold", "x"),
        ("threshold", 2.9),
        ("bound", "x"),
        ("weights", "x"),
        ("weights", float("nan")),
    ],
)
def test_a_hostile_secure_aggregation_section_is_refused_where_a_site_reads_the_manifest(
    entry, value, prepared, keys, tmp_path, capsys
):
    """The manifest's `secure_aggregation` section with a threshold, bound or site weight that is not what
    the server writes. Before: it parsed as an untyped map, and the site's SecureRun.from_manifest raised a
    bare ValueError after the site had encoded its images (its process died with a traceback); 2.9 became
    threshold 2 and a NaN weight was taken. Now the one parse of the manifest refuses it, naming the server,
    in one line."""
    from fedmedclip.cli import main
    from fedmedclip.federation.messages import MessageRefused
    from fedmedclip.federation.server import read_manifest

    fed = Federation(prepared, keys, tmp_path, workers=())  # the server writes the manifest
    manifest = json.loads(fed.store.get(fed.mb.manifest_key))
    sec = manifest["secure_aggregation"]
    if entry == "weights":
        sec["weights"]["site_0"] = value
    else:
        sec[entry] = value
    fed.store.put(fed.mb.manifest_key, json.dumps(manifest).encode())  # NaN is written as JSON's NaN token
    refusal = rf"^run_manifest from server \(.*manifest\.json\) refused: secure_aggregation\.{entry}\b"
    # What a site does: it reads the manifest, then starts its worker on it.
    with pytest.raises(MessageRefused, match=refusal) as refused:
        SiteWorker(
            fed.mb,
            read_manifest(fed.mb),
            fed.setups["site_0"],
            fed.store.sub("state-site_0"),
            verbose=False,
            identity=keys["site_0"],
        )
    assert "\n" not in str(refused.value) and refused.value.party == "server"
    # `site run` stops in one line of stderr, before it reads its key or encodes an image.
    args = ["site", "run", "--mailbox", str(tmp_path / "mailbox"), "--run-id", RUN, "--site", "site_0"]
    assert main(["-q", *args, "--identity", str(tmp_path / "none.pem")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: run_manifest from server"), err
    assert not (tmp_path / "none.pem").exists()

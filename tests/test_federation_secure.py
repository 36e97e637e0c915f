"""Secure aggregation in the federation runtime: the server's sub-phases and the sites' steps over a
local-directory mailbox, with real keys, shares and masks. A site that drops after its masked upload, or after
sharing, leaves the round's aggregate exactly what the protocol promises; a forged key advertisement, an
unregistered key and a wrongly masked update are refused; and `server run` / `site run` processes killed
with SIGKILL mid-protocol end identical to an uninterrupted secure run of `fedmedclip train`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SYNTH, without_timing

from fedmedclip import engine
from fedmedclip.codec import decode
from fedmedclip.codec.wire import unpack
from fedmedclip.config import TrainConfig
from fedmedclip.federation.mailbox import Mailbox
from fedmedclip.federation.messages import KeyAdvertisement
from fedmedclip.federation.server import FederationError, FederationServer, ServerOptions
from fedmedclip.federation.site import SiteFailure, SiteWorker
from fedmedclip.federation.storage import LocalDirStore
from fedmedclip.preparation import prepare
from fedmedclip.privacy.report import privacy_summary
from fedmedclip.secagg.identity import IdentityKey

RUN = "secure"
SITES = ("site_0", "site_1", "site_2")
CODEC = "delta-ef-q4-zlib"
CEILING = 900  # only ends a broken run; every wait is for an event
TIMEOUT = 1.5  # the round timeout of the in-process federations: how long an absent site is waited for


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
    """A server and site workers of one secure round over a local-directory mailbox, polled in turn."""

    def __init__(self, prepared, keys, tmp: Path, workers=SITES, identity=None):
        cfg, p = prepared
        method = engine.method_for(cfg, p)
        store = LocalDirStore(tmp / "mailbox")
        self.mb = Mailbox(store, RUN)
        self.server = FederationServer(
            self.mb,
            engine.server_setup(cfg, p, method),
            store.sub("server-state"),
            tmp / "out",
            ServerOptions(quorum=2, round_timeout=TIMEOUT, join_timeout=TIMEOUT),
            verbose=False,
            identities={s: k.public for s, k in keys.items()},
        )
        self.server.start()
        setups = {s.name: s for s in engine.site_setups(cfg, p, method)}
        self.sites = {
            s: SiteWorker(
                self.mb,
                self.server.manifest,
                setups[s],
                store.sub(f"state-{s}"),
                verbose=False,
                identity=(identity or {}).get(s, keys[s]),
            )
            for s in workers
        }

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
    results = engine.train(
        TrainConfig(**{**cfg.to_json(), "out": str(tmp_path / "train"), "rounds": 2}), progress=False
    )
    assert results["privacy"]["secure_aggregation"] is True
    assert results["comm"]["codec_up"] == f"{CODEC}+secagg"
    assert privacy_summary(results)["dp.secure_aggregation"] == "on"
    manifest = json.loads(
        (tmp_path / "train" / "checkpoint" / "mailbox" / "runs" / "inprocess" / "manifest.json").read_text()
    )
    sec = manifest["secure_aggregation"]
    assert sec["threshold"] == 2 and sorted(sec["identities"]) == list(SITES)
    # Each site's identity key was generated in its own private state, readable by its owner only.
    pem = tmp_path / "train" / "checkpoint" / "sites" / "site_0" / "identity.pem"
    assert IdentityKey.load(pem).public == sec["identities"]["site_0"] and pem.stat().st_mode & 0o077 == 0

"""What a waiting party asks the mailbox for: while it waits, one request per poll (each is an S3 round trip
when the mailbox is S3), and a sweep that reads every missing object decides quorum and timeouts."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter

import pytest
from conftest import SYNTH
from test_federation_validation import _parties as parties

from fedmedclip.config import TrainConfig
from fedmedclip.federation.mailbox import AIM, Poller
from fedmedclip.federation.storage import LocalDirStore
from fedmedclip.preparation import prepare


class CountingStore(LocalDirStore):
    """A real local-directory store that counts the reads (get or exists) of each key."""

    def __init__(self, root):
        super().__init__(root)
        self.reads: Counter = Counter()

    def get(self, key, max_bytes=None):
        self.reads[key] += 1
        return super().get(key, max_bytes)

    def exists(self, key):
        self.reads[key] += 1
        return super().exists(key)


@pytest.fixture(scope="module")
def prepared(synthetic_cache):
    cfg = TrainConfig(rounds=3, synthetic=SYNTH, cache_dir=str(synthetic_cache), out="unused")
    return cfg, prepare(cfg, progress=False)


class RoundTripStore(CountingStore):
    """The same, taken for a store where each request is a round trip (S3): the server reads what it waits
    for at the same time (`Mailbox.read_all`), a site's report travels while it trains."""

    cheap_polls = False

    def __init__(self, root):
        super().__init__(root)
        self._lock = threading.Lock()

    def get(self, key, max_bytes=None):
        with self._lock:
            self.reads[key] += 1
        return LocalDirStore.get(self, key, max_bytes)


def _parties(cfg, p, tmp_path, store_class=CountingStore):
    server, sites, mb, store, _ = parties(cfg, p, tmp_path, quorum=3, store_class=store_class)
    return server, sites, mb, store


@pytest.mark.parametrize("store_class", [CountingStore, RoundTripStore])
def test_a_waiting_server_asks_for_the_first_missing_update_only_until_a_sweep(
    prepared, tmp_path, store_class
):
    server, sites, mb, store = _parties(*prepared, tmp_path, store_class)
    assert sites[1].poll() and sites[2].poll()  # site_1 and site_2 uploaded round 1; site_0 has not
    server.sweep_every, server._swept_at = 3600.0, float("inf")  # as run() does, between two sweeps
    store.reads.clear()
    assert not server.poll()
    assert sum(store.reads.values()) == 1 and store.reads[mb.update_key(1, "site_0")] == 1
    assert server._updates == {}  # the others are read once site_0's is in, or at the next sweep

    server._swept_at = -math.inf  # a sweep is due: every missing update is read
    store.reads.clear()
    assert server.poll()
    assert sorted(server._updates) == ["site_1", "site_2"]
    assert all(store.reads[mb.update_key(1, s)] == 1 for s in ("site_0", "site_1", "site_2"))

    server._swept_at = float("inf")
    assert sites[0].poll()  # the last update arrives: read at the next poll, and the round aggregated
    assert server.poll() and server.phase == "reports"


def test_a_waiting_site_asks_for_one_object_per_poll(prepared, tmp_path):
    server, sites, mb, store = _parties(*prepared, tmp_path)
    site = sites[0]
    assert site.poll()  # it trained round 1 and uploaded it
    site.rare_checks_every, site._rare_checked = 3600.0, float("inf")  # as run() does, between rare checks
    site._server_checked = float("inf")
    store.reads.clear()
    assert not site.poll()
    assert dict(store.reads) == {mb.global_key(1): 1}  # the next global module, nothing else

    site._rare_checked = -math.inf  # a rare check is due: whether the server went on without it, too
    store.reads.clear()
    assert not site.poll()
    assert dict(store.reads) == {mb.global_key(1): 1, mb.global_key(2): 1}


def test_a_waiting_party_aims_at_its_wait_without_the_work_the_object_set_off():
    """A site waited 0.2 s for the global module, then trained for 0.8 s: the next one is aimed at after
    about 0.2 s of waiting (AIM of it), not after 0.7 s (AIM of wait and work together), while it may already
    be there."""
    poller = Poller()
    began = time.monotonic() - 1.0
    poller.since = began  # the wait began 1 s ago
    poller.reset(seen_at=began + 0.2)  # the object was there 0.2 s later; the work took the rest
    assert poller.aim_at - time.monotonic() <= AIM * 0.2 + 0.05
    poller.reset(due_at=time.monotonic() + 5.0)  # an expected time given overrides the measured wait
    assert poller.aim_at - time.monotonic() > 4.0


def test_a_site_writes_its_status_of_every_round_only_when_it_waits(prepared, tmp_path):
    """`uploaded` goes out at once only when the site's last status is a rare check old; otherwise once it has
    waited that long: one request per site and round fewer on the store the round's updates go to."""
    server, sites, mb, store = _parties(*prepared, tmp_path)
    site = sites[0]
    site.rare_checks_every = 3600.0  # as run() does: its last status was just written
    site._status("waiting", 0, "waiting for the global module")
    assert site.poll()  # it trained round 1 and uploaded it
    assert store.exists(mb.update_key(1, "site_0"))
    assert mb.status("site_0").state == "waiting"
    site.rare_checks_every = 0.0  # it has waited a rare check's time since
    site._flush_status()
    st = mb.status("site_0")
    assert (st.state, st.round) == ("uploaded", 1)

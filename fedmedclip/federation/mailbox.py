"""The mailbox: the key layout of one federated run in an object store (docs/contracts.md, "Federation
runtime: the mailbox"), typed reads and writes, and polling with backoff.

Every key is computable from the run id, the round and the site name, so no party ever lists a prefix and
each role's storage policy can name exactly the keys it may touch.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence

from ..errors import ConfigError, FedMedClipError
from ..jsonfiles import KeyTwice, loads
from .messages import Message, MessageRefused, Status, parse
from .storage import ObjectStore, ObjectTooLarge, in_parallel, start

SERVER = "server"
MAX_MANIFEST_BYTES = 16 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def read_message(store: ObjectStore, key: str, cls: type[Message], party: str) -> Message | None:
    """The object `party` wrote at `key` of `store`, parsed against its declaration (its size checked before it
    is read); None when it is not there; MessageRefused when it is too large or does not parse."""
    try:
        raw = store.get(key, max_bytes=cls.max_bytes)
    except ObjectTooLarge as exc:
        raise MessageRefused(f"{cls.kind} from {party}: {exc}", cls.kind, party) from None
    if raw is None:
        return None
    return parse(cls, raw, party, store.where(key))


class ProtocolError(FedMedClipError):
    """A party broke the protocol (a malformed object, another run's object, a refused setting)."""


def check_name(kind: str, name: str) -> str:
    """Run ids and site names become key segments: letters, digits and ._- only."""
    if not isinstance(name, str) or not _NAME.match(name) or name == SERVER and kind == "site name":
        raise ConfigError(
            f"invalid {kind} {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit{' (and not ' + repr(SERVER) + ')' if kind == 'site name' else ''}"
        )
    return name


def _finite_json(obj) -> bytes:
    # allow_nan=False: a NaN metric is a bug upstream and must not become a readable "NaN" token.
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()


class Mailbox:
    """One run's keys in `store`. Round r's global module is the one *after* round r (r = 0: initial)."""

    def __init__(self, store: ObjectStore, run_id: str):
        self.store, self.run_id = store, check_name("run id", run_id)
        self.root = f"runs/{run_id}"

    # -- keys
    @property
    def manifest_key(self) -> str:
        return f"{self.root}/manifest.json"

    @property
    def shared_key(self) -> str:
        return f"{self.root}/shared.safetensors"

    def global_key(self, r: int) -> str:
        return f"{self.root}/rounds/{r:04d}/global.bin"

    def update_key(self, r: int, site: str) -> str:
        return f"{self.root}/rounds/{r:04d}/updates/{site}.bin"

    def report_key(self, r: int, site: str) -> str:
        return f"{self.root}/rounds/{r:04d}/reports/{site}.json"

    def secagg_key(self, r: int, what: str, site: str | None = None) -> str:
        """Secure aggregation's objects of round r (docs/secure-aggregation.md): a site's `keys`
        (advertisement), `shares`, `unmask` (answer) and `inbox`; the round's `roster` and `survivors`."""
        base = f"{self.root}/rounds/{r:04d}/secagg"
        if what in ("roster", "survivors") and site is None:
            return f"{base}/{what}.json"
        if what in ("keys", "shares", "unmask", "inbox") and site is not None:
            return f"{base}/{what}/{site}.json"
        raise ValueError(f"no secure-aggregation key {what!r} for {site!r}")

    def identity_key(self, site: str) -> str:
        """Where a site registers its public identity key itself (`site run --register-identity`)."""
        return f"{self.root}/secagg/identities/{site}.json"

    def status_key(self, party: str) -> str:
        return f"{self.root}/status/{party}.json"

    def server_private(self) -> ObjectStore:
        """The server's own area of the run (its checkpoints); no site may read it."""
        return self.store.sub(f"{self.root}/server")

    def where(self, key: str) -> str:
        return self.store.where(key)

    def poll_cap(self, cap: float) -> float:
        """The longest pause between polls of this mailbox's store, given the party's own `cap`."""
        return min(cap, CHEAP_POLL_CAP) if self.store.cheap_polls else cap

    def read_all(self, reads: Sequence[Callable[[], object]]) -> list:
        """Each read's result, or the exception it raised, in order: at the same time over S3
        (`storage.in_parallel`), so that n objects cost about one round trip instead of n in a row."""
        return in_parallel(self.store, reads)

    def put_soon(self, key: str, data: bytes) -> Callable[[], object]:
        """Start writing `key`; returns the wait until it is written (which raises what the write raised).
        Over S3 the write goes on while the caller works (a site trains while its report travels); on a local
        directory or in memory it is written before this returns (`storage.start`)."""
        return start(self.store, lambda: self.store.put(key, data))

    # -- typed access
    def put_json(self, key: str, obj) -> None:
        self.store.put(key, _finite_json(obj))

    def put_message(self, key: str, msg: Message) -> None:
        self.store.put(key, msg.to_bytes())

    def read_message(self, key: str, cls: type[Message], party: str) -> Message | None:
        return read_message(self.store, key, cls, party)

    def get_json(self, key: str, who: str = "", max_bytes: int = MAX_MANIFEST_BYTES) -> dict | None:
        try:
            raw = self.store.get(key, max_bytes=max_bytes)
        except ObjectTooLarge as exc:
            raise ProtocolError(f"{exc}{' (from ' + who + ')' if who else ''}") from None
        if raw is None:
            return None
        try:
            obj = loads(raw, unique=True)
        except KeyTwice as exc:
            raise ProtocolError(f"{self.where(key)}{' from ' + who if who else ''}: {exc}") from None
        except ValueError as exc:
            raise ProtocolError(
                f"{self.where(key)}{' from ' + who if who else ''} is not valid JSON: {exc}"
            ) from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"{self.where(key)}{' from ' + who if who else ''} is not a JSON object")
        return obj

    def put_status(self, party: str, state: str, round_index: int, message: str = "", **extra) -> None:
        self.put_message(
            self.status_key(party), Status.of(party, state, round_index, message, time.time(), **extra)
        )

    def status(self, party: str) -> Status | None:
        """`party`'s heartbeat; None when it has written none; MessageRefused when it does not parse."""
        return self.read_message(self.status_key(party), Status, party)


# Seconds between polls at most while a party waits for the next object of a secure-aggregation round, which
# follows its own within moments (the default cap is 0.25 s).
SECURE_POLL_CAP = 0.1
# ... and at most this long where a poll costs next to nothing (`ObjectStore.cheap_polls`: a local directory).
CHEAP_POLL_CAP = 0.02
# The next wait is taken to last at least this share of the one before: rounds repeat, so a party that waited
# 0.8 s for the last global module sleeps about 0.56 s before asking again, then polls fast from `first`.
AIM = 0.7


class Poller:
    """Backoff between polls, aimed at when the next object is due. After progress (`reset`) it polls from
    `first` seconds, x1.5 each time, capped at `cap`; but a wait is usually as long as the one before it (the
    server waits about as long for a round's updates as for the last round's; a site's next global module
    comes a round's period after the last one, or at a time the caller gives), so until AIM of that is over it
    sleeps towards that point (still at most `cap` at once) and then starts again from `first`. The object is
    then seen within milliseconds of its arrival, with a handful of requests per wait instead of one every few
    milliseconds (each is a round trip when the store is S3), and one that comes early is still seen within
    `cap`. The wait is measured up to the poll that saw the object, without the work it then set off."""

    def __init__(self, first: float = 0.005, cap: float = 0.25):
        self.first, self.cap = first, cap
        self.delay = first
        self.since = self.aim_at = time.monotonic()

    def reset(self, due_at: float | None = None, seen_at: float | None = None) -> None:
        """After progress. `due_at`: when (time.monotonic()) the next object is expected; by default after as
        long a wait as the one that just ended: from the previous reset to `seen_at`, when the poll that saw
        the object began. The work that object set off (a site's training, the server's aggregation) is no
        part of the wait: counted in, the aim overshot the next object by up to AIM / (1 - AIM) times that
        work, and a party slept on while it was there."""
        now = time.monotonic()
        waited = (now if seen_at is None else seen_at) - self.since
        self.aim_at = now + AIM * max(0.0, waited) if due_at is None else due_at
        self.since, self.delay = now, self.first

    def sleep(self, until: float = math.inf) -> None:
        now = time.monotonic()
        ahead = self.aim_at - now
        if ahead > self.first:
            delay = min(ahead, self.cap)
            self.delay = self.first  # from there on, close polls again
        else:
            delay = self.delay
            self.delay = min(self.cap, self.delay * 1.5)
        time.sleep(max(0.0, min(delay, until - now)))


def wait_until(
    ready: Callable[[], object], what: str, timeout: float = math.inf, poller: Poller | None = None
) -> object:
    """Poll `ready()` until it returns something other than None/False; TimeoutError after `timeout` s."""
    poller = poller or Poller()
    deadline = time.monotonic() + timeout
    while True:
        got = ready()
        if got is not None and got is not False:
            return got
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        poller.sleep(deadline)

"""A party's checkpoints in an object store, with an integrity digest, and a fallback to the previous one.

Two slots, `a/` and `b/`, alternate: a save goes to the slot that does not hold the newest intact checkpoint, its
tensors and `state.json` written together. `state.json` carries a sequence number, the sha256 and byte size of the
tensors object and a digest over itself, so a truncated, zero-byte, missing, oversized or edited file (a round
number changed by hand, a history cut short), or a slot torn by a crash between its two files, is detected and
the other slot, one save older, is used instead. Non-finite values (tensors, or numbers of the body) are refused
when saving and when loading, and so is a body its party's `check` refuses (a body is declared like the messages
parties exchange, `Body`, and parsed by the same `parse`). Nothing is listed: the two keys of each slot are fixed.

Each checkpoint also records the configuration that wrote it (`configuration`: the digest of the run's resume key
and its partition's digest): a party resumed under another configuration is refused, never continued with
state of another run.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..errors import CheckpointError, shown
from ..features import canonical_digest
from ..jsonfiles import loads, no_constant
from .messages import Message, MessageRefused, parse
from .storage import ObjectStore, ObjectTooLarge, in_parallel

log = logging.getLogger(__name__)

FORMAT = 1
SLOTS = ("a", "b")
# Why a slot holds one of its two files: `save` writes both at once, so a crash can land between them.
TORN = "a save torn by a crash, or a file removed"
# The most a state.json is read of (generous: the server's body holds every round's records and reports, a few
# kB each). Its tensors.pt is read up to the size the state.json records.
MAX_STATE_BYTES = 256 << 20
# The folder of a party's state (`server run --state`, `site run --state`) that holds its checkpoints.
PARTY_CHECKPOINTS = "ckpt"


class OtherConfiguration(CheckpointError):
    """A checkpoint written by another configuration than the run's: not damage, so no fallback to the other
    slot; the party is refused."""


def configuration(settings: dict, partition_digest: str | None) -> dict:
    """What a checkpoint records of the configuration that wrote it: the digest of the run's resume key
    (`TrainConfig.resume_key()`, the manifest's `settings`) and the partition's digest."""
    return {"settings": canonical_digest(settings), "partition": partition_digest}


def expect_type(value: Any, kind: type | tuple, where: str) -> None:
    """CheckpointError naming `where` unless `value` is of `kind` (a type or a tuple of types, `type(None)`
    where null is allowed; a bool is no number): for tensors.pt, whose tensors are no JSON to parse."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise CheckpointError(f"{where} is {shown(value)}, not {names}")


def expect_types(obj: dict, types: dict[str, type | tuple], where: str) -> None:
    """CheckpointError naming the first key of `types` that `obj` lacks or holds a value of another type
    (`expect_type`)."""
    for key, kind in types.items():
        if key not in obj:
            raise CheckpointError(f"{where}.{key} is missing")
        expect_type(obj[key], kind, f"{where}.{key}")


class Body(Message):
    """A checkpoint's body, the state.json a party writes for itself and reads back on restart, declared like
    the messages parties exchange (`parse_body`). `configuration` is the store's own (`configuration()`)."""

    kind: ClassVar[str] = "checkpoint body"
    max_bytes: ClassVar[int] = MAX_STATE_BYTES
    configuration: dict | None = None


def parse_body(declared: type[Body], body: dict) -> Body:
    """`body` parsed against `declared`, or CheckpointError naming its first problem (its digest matched: written
    so by a bug, or by a hand that computed the digest again): the store then takes the other slot."""
    try:
        return parse(declared, body)
    except MessageRefused as exc:
        raise CheckpointError(str(exc)) from None


def fit_state(load: Callable[[], None], whose: str, fresh: str) -> None:
    """Run `load` (a party's load_state_dict calls) and turn its failure into one CheckpointError line: a state
    of another method or shape (`whose`: the party and where its state is; `fresh`: how to start it anew)."""
    try:
        load()
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"{whose} does not fit this run's trainer ({type(exc).__name__}: {first}): resume with the "
            f"configuration that wrote it, or {fresh}"
        ) from None


def tensor_map(value: Any, where: str) -> None:
    """CheckpointError unless `value` is a dict of tensors (a state dict)."""
    if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise CheckpointError(f"{where} is not a dict of tensors")


def _walk_tensors(obj: Any, path: str = ""):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_tensors(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk_tensors(v, f"{path}[{i}]")


def non_finite(obj: Any) -> str | None:
    """The name of the first float tensor (nested dicts/lists) holding NaN or Inf, else None."""
    for name, t in _walk_tensors(obj):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name or "tensor"
    return None


def _json_finite(obj: Any, path: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "value"
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad = _json_finite(v, f"{path}.{k}" if path else str(k))
            if bad:
                return bad
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            bad = _json_finite(v, f"{path}[{i}]")
            if bad:
                return bad
    return None


class CheckpointStore:
    """`configuration`: what `configuration()` gives for the run (recorded in every save, and a checkpoint
    recording another is refused by `load`); None records and checks nothing. `check(body, tensors)`: the
    party's own check of what it reads (CheckpointError naming the problem): a slot it refuses is damaged."""

    def __init__(
        self,
        store: ObjectStore,
        party: str,
        configuration: dict | None = None,
        check: Callable[[dict, Any], None] | None = None,
    ):
        self.store, self.party = store, party
        self.configuration, self.check = configuration, check
        # What `load` found wrong (a damaged or removed slot): the party then resumed from older state than
        # its newest, and says so (results.json's `recovery`).
        self.problems: list[str] = []
        # Each slot's sequence number as `load` or this process's last save left it, -1 when torn or damaged.
        self._seqs: dict[str, int] | None = None

    def _state(self, slot: str) -> dict | None:
        """A slot's intact state.json (None when it has none), or CheckpointError saying what is wrong with it;
        never read past MAX_STATE_BYTES."""
        try:
            raw = self.store.get(f"{slot}/state.json", max_bytes=MAX_STATE_BYTES)
        except ObjectTooLarge as exc:
            raise CheckpointError(f"state.json is {exc.size} bytes, over {exc.limit}: not read") from None
        try:
            return None if raw is None else _intact_state(raw)
        except OtherConfiguration as exc:  # named here, where the slot is known
            raise OtherConfiguration(f"{self.party}: checkpoint {self.store.where(slot)} {exc}") from None

    def _read(self, slot: str) -> tuple[int, dict, Any]:
        """(seq, body, tensors) of a slot, or CheckpointError saying what is wrong with it. Neither file is read
        past its bound: state.json past MAX_STATE_BYTES, tensors.pt past the size its state.json records."""
        state = self._state(slot)
        if state is None:
            raise CheckpointError(f"tensors.pt without its state.json ({TORN})")
        body, seq, want = state["body"], state["seq"], state["tensors_sha256"]
        self._check_configuration(slot, body)
        try:
            blob = self.store.get(f"{slot}/tensors.pt", max_bytes=state["tensors_bytes"])
        except ObjectTooLarge as exc:
            raise CheckpointError(
                f"tensors.pt is {exc.size} bytes, not the {exc.limit} its state.json records (damaged): "
                "not read"
            ) from None
        if blob is None:
            raise CheckpointError(f"state.json without its tensors.pt ({TORN})")
        if hashlib.sha256(blob).hexdigest() != want:
            raise CheckpointError(
                f"tensors.pt does not match its sha256 ({len(blob)} bytes: truncated or damaged)"
            )
        try:
            tensors = torch.load(io.BytesIO(blob), weights_only=True)
        except Exception as exc:  # the digest matched, so this is a bug, not damage; say so plainly
            raise CheckpointError(f"tensors.pt cannot be loaded: {type(exc).__name__}: {exc}") from None
        bad = non_finite(tensors)
        if bad:
            raise CheckpointError(f"tensor {bad} holds NaN or Inf")
        if self.check is not None:
            self.check(body, tensors)
        return seq, body, tensors

    def load(self) -> tuple[int, dict, Any] | None:
        """The newest intact checkpoint as (seq, body, tensors); None when there is none at all. A damaged
        newest slot falls back to the other with a warning; when every existing slot is damaged, an error; one
        written by another configuration than this store's, an error (OtherConfiguration)."""
        found, problems, absent = [], [], []
        self._seqs = dict.fromkeys(SLOTS, -1)  # what the next save overwrites: the slot not holding `best`
        for slot in SLOTS:
            if not self.store.exists(f"{slot}/state.json") and not self.store.exists(f"{slot}/tensors.pt"):
                absent.append(slot)
                continue
            try:
                found.append(self._read(slot))
                self._seqs[slot] = found[-1][0]
            except OtherConfiguration:
                raise
            except CheckpointError as exc:
                problems.append(f"{self.store.where(slot)}: {exc}")
        # Saves alternate between the slots, so once a party has saved twice both exist: a slot gone after
        # that was removed, and may have held the newest save.
        if len(found) == 1 and absent and found[0][0] >= 1:
            problems += [
                f"{self.store.where(slot)}: removed (both of its files are missing)" for slot in absent
            ]
        self.problems = problems
        if not found:
            if problems:
                raise CheckpointError(
                    f"{self.party}: no intact checkpoint to resume from: " + "; ".join(problems)
                )
            return None
        best = max(found, key=lambda f: f[0])
        if problems:
            log.warning(
                "%s: ignoring a damaged checkpoint (%s); resuming from save #%d",
                self.party,
                problems[0],
                best[0],
            )
        return best

    def check_configuration(self) -> None:
        """`load`'s check of the configuration alone, on each slot's state.json, its tensors unread: for a caller
        that knows the run's configuration (or part of it: an entry None is not compared) before any work. A
        damaged slot is left to `load`."""
        for slot in SLOTS:
            try:
                state = self._state(slot)
            except OtherConfiguration:
                raise
            except CheckpointError:
                continue
            if state is not None:
                self._check_configuration(slot, state["body"])

    def _check_configuration(self, slot: str, body: dict) -> None:
        """OtherConfiguration unless the checkpoint in `slot` was written by this store's configuration (its
        entries that are not None)."""
        if self.configuration is None:
            return
        recorded = body.get("configuration")
        known = {key: want for key, want in self.configuration.items() if want is not None}
        if isinstance(recorded, dict) and all(recorded.get(key) == want for key, want in known.items()):
            return
        where = f"{self.party}: checkpoint {self.store.where(slot)}"
        if not isinstance(recorded, dict):
            raise OtherConfiguration(
                f"{where} records no configuration (written before checkpoints recorded theirs), so it cannot be "
                "checked against this run's: start the run again in an empty --out"
            )
        why = "; ".join(
            f"{key} {str(recorded.get(key))[:12]}... vs this run's {str(want)[:12]}..."
            for key, want in known.items()
            if recorded.get(key) != want
        )
        raise OtherConfiguration(
            f"{where} was written by another configuration: {why} (config.json edited, or another run's "
            "state?): resume with the configuration that wrote it, or start the run again in an empty --out"
        )

    def save(self, body: dict, tensors: Any) -> int:
        """Write a new checkpoint into the older slot; returns its sequence number."""
        if self.configuration is not None:
            body = {**body, "configuration": self.configuration}
        bad = non_finite(tensors) or _json_finite(body)
        if bad:
            raise CheckpointError(
                f"{self.party}: refusing to checkpoint non-finite state ({bad}) into {self.store.url}"
            )
        # The slots' sequence numbers as `load` or the last save found them intact (a torn or damaged slot is
        # -1): a slot whose state.json landed without its tensors looks newest by that file alone, and the save
        # after a restart overwrote the one intact slot.
        seqs = self._seqs or {slot: self._intact_seq(slot) for slot in SLOTS}
        target = min(SLOTS, key=lambda s: seqs[s])
        seq = max(seqs.values()) + 1
        buf = io.BytesIO()
        torch.save(tensors, buf)
        blob = buf.getvalue()
        state = {"format": FORMAT, "party": self.party, "seq": seq, "body": body}
        state["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
        state["tensors_bytes"] = len(blob)
        state["digest"] = canonical_digest(state)
        # Both files at once (one round trip over S3, not two in a row): a crash between them leaves a torn
        # slot whichever of the two landed, since state.json names the sha256 of the tensors beside it, and
        # `load` then takes the other slot, as it did when tensors.pt was written first.
        body_bytes = json.dumps(state, allow_nan=False).encode()
        self._seqs = {**seqs, target: -1}  # torn until both files are written
        for failed in in_parallel(
            self.store,
            [
                lambda: self.store.put(f"{target}/tensors.pt", blob),
                lambda: self.store.put(f"{target}/state.json", body_bytes),
            ],
        ):
            if isinstance(failed, OSError):  # the system's words name the last folder only ('ckpt')
                hint = (
                    " (a file where a folder of that path should be)" if failed.errno == errno.ENOTDIR else ""
                )
                raise CheckpointError(
                    f"{self.party}: cannot write its checkpoint into {self.store.where(target)}: "
                    f"{failed.strerror or failed}{hint}"
                ) from None
            if isinstance(failed, Exception):
                raise failed
        self._seqs[target] = seq
        return seq

    def _intact_seq(self, slot: str) -> int:
        try:
            return self._read(slot)[0]
        except CheckpointError:
            return -1


def _intact_state(raw: bytes) -> dict:
    """A slot's state.json, or CheckpointError saying what is wrong with it. Damage can leave any JSON there
    (`null`, an array, brackets nested past the parser's depth): each is refused here, for `load` and for the
    `save` after it alike, never an AttributeError or RecursionError that would stop the party at every
    restart."""
    try:
        state = loads(raw, parse_constant=no_constant)
    except ValueError as exc:
        raise CheckpointError(f"unreadable state.json ({exc})") from None
    if not isinstance(state, dict) or not {"body", "seq", "tensors_sha256"} <= state.keys():
        raise CheckpointError("unreadable state.json (not a checkpoint's object)")
    if state.get("format") != FORMAT or state.get("digest") != canonical_digest(
        {k: v for k, v in state.items() if k != "digest"}
    ):
        raise CheckpointError("state.json does not match its digest (edited or damaged)")
    if "tensors_bytes" not in state:
        # Not damage (the other slot, of the same version, would be no better): refused before any work.
        raise OtherConfiguration(
            "was written by an earlier fedmedclip, before checkpoints recorded the size of their tensors and the "
            "configuration that wrote them, so it cannot be checked against this run's: start the run again in "
            "an empty --out"
        )
    if (
        not isinstance(state["seq"], int)
        or isinstance(state["seq"], bool)
        or not isinstance(state["body"], dict)
        or not isinstance(state["tensors_bytes"], int)
        or isinstance(state["tensors_bytes"], bool)
        or state["tensors_bytes"] < 0
    ):
        raise CheckpointError("unreadable state.json (a sequence number, size or body of the wrong type)")
    # A number past float's range (`1e400`) parses to inf; a NaN written with a recomputed digest: either would
    # stop the party at its next save ("refusing to checkpoint non-finite state"), at every restart.
    bad = _json_finite(state["body"], "body")
    if bad:
        raise CheckpointError(f"state.json holds a non-finite number ({bad})")
    return state

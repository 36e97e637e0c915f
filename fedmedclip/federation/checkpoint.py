"""A party's checkpoints in an object store, with an integrity digest, and a fallback to the previous one.

Two slots, `a/` and `b/`, alternate: a save goes to the slot that does not hold the newest intact checkpoint, its
tensors and `state.json` written together. `state.json` carries a sequence number, the sha256 of the tensors
object and a digest over itself, so a truncated, zero-byte, missing or edited file (a round number changed by
hand, a history cut short), or a slot torn by a crash between its two files, is detected and the other slot, one
save older, is used instead. Non-finite tensors are refused when saving and when loading. Nothing is listed:
the two keys of each slot are fixed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from typing import Any

import torch

from ..errors import CheckpointError
from ..features import canonical_digest
from ..jsonfiles import loads
from .storage import ObjectStore, in_parallel

log = logging.getLogger(__name__)

FORMAT = 1
SLOTS = ("a", "b")
# Why a slot holds one of its two files: `save` writes both at once, so a crash can land between them.
TORN = "a save torn by a crash, or a file removed"


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
    def __init__(self, store: ObjectStore, party: str):
        self.store, self.party = store, party
        # What `load` found wrong (a damaged or removed slot): the party then resumed from older state than
        # its newest, and says so (results.json's `recovery`).
        self.problems: list[str] = []
        # Each slot's sequence number as `load` or this process's last save left it, -1 when torn or damaged.
        self._seqs: dict[str, int] | None = None

    def _read(self, slot: str) -> tuple[int, dict, Any]:
        """(seq, body, tensors) of a slot, or CheckpointError saying what is wrong with it."""
        raw = self.store.get(f"{slot}/state.json")
        if raw is None:
            raise CheckpointError(f"tensors.pt without its state.json ({TORN})")
        state = _intact_state(raw)
        body, seq, want = state["body"], state["seq"], state["tensors_sha256"]
        blob = self.store.get(f"{slot}/tensors.pt")
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
        return seq, body, tensors

    def load(self) -> tuple[int, dict, Any] | None:
        """The newest intact checkpoint as (seq, body, tensors); None when there is none at all. A damaged
        newest slot falls back to the other with a warning; when every existing slot is damaged, an error."""
        found, problems, absent = [], [], []
        self._seqs = dict.fromkeys(SLOTS, -1)  # what the next save overwrites: the slot not holding `best`
        for slot in SLOTS:
            if not self.store.exists(f"{slot}/state.json") and not self.store.exists(f"{slot}/tensors.pt"):
                absent.append(slot)
                continue
            try:
                found.append(self._read(slot))
                self._seqs[slot] = found[-1][0]
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

    def save(self, body: dict, tensors: Any) -> int:
        """Write a new checkpoint into the older slot; returns its sequence number."""
        bad = non_finite(tensors) or _json_finite(body)
        if bad:
            raise CheckpointError(f"{self.party}: refusing to checkpoint non-finite state ({bad})")
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
        state = loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"unreadable state.json ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not {"body", "seq", "tensors_sha256"} <= state.keys():
        raise CheckpointError("unreadable state.json (not a checkpoint's object)")
    if state.get("format") != FORMAT or state.get("digest") != canonical_digest(
        {k: v for k, v in state.items() if k != "digest"}
    ):
        raise CheckpointError("state.json does not match its digest (edited or damaged)")
    if (
        not isinstance(state["seq"], int)
        or isinstance(state["seq"], bool)
        or not isinstance(state["body"], dict)
    ):
        raise CheckpointError("unreadable state.json (a sequence number or body of the wrong type)")
    return state

"""Every object one party writes for another, declared once: the writer builds it from its declaration and
the reader parses it against the same declaration. Nothing else a party wrote is ever read.

A declaration is a pydantic model registered with `@message(kind, max_bytes)`: known keys only, every number
finite (JSON's `1e999` parses to inf and is refused like the `NaN`/`Infinity` tokens), integers bounded,
strings and lists bounded in length, and the serialised object bounded in bytes (checked before it is read,
`ObjectStore.get(max_bytes=...)`). Adding a kind of message (a secure-aggregation key advertisement, an
encrypted share) is one more declaration here; `MESSAGES` lists them all.

A message that does not parse raises `MessageRefused` with one line naming the kind, the party, where it was
read and the first problem; the caller makes that party absent for the round and records the reason.
"""

from __future__ import annotations

import json
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from ..errors import FedMedClipError

# ---------------------------------------------------------------- field types
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Round = Annotated[int, Field(ge=0, le=1_000_000)]
Count = Annotated[int, Field(ge=0, le=1_000_000_000)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Finite = Annotated[float, Field(ge=-1e30, le=1e30)]
Short = Annotated[str, StringConstraints(max_length=256)]
Text = Annotated[str, StringConstraints(max_length=4000)]

MESSAGES: dict[str, type[Message]] = {}


class MessageRefused(FedMedClipError):
    """A party wrote an object that does not parse against its declaration."""

    def __init__(self, reason: str, kind: str = "", party: str = ""):
        super().__init__(reason)
        self.kind, self.party = kind, party


class Message(BaseModel):
    """The base of every declaration: strict types, no unknown keys, finite numbers, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    kind: ClassVar[str] = ""
    max_bytes: ClassVar[int] = 0

    @classmethod
    def build(cls, **fields):
        """A message to write, built through its JSON form: exactly what a reader will parse (tuples become
        lists, a non-finite number is refused here, at the writer)."""
        try:
            text = json.dumps(fields, allow_nan=False)
        except ValueError as exc:
            raise MessageRefused(f"{cls.kind}: cannot write a non-finite number ({exc})", cls.kind) from None
        return parse(cls, text.encode())

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def message(kind: str, max_bytes: int):
    """Register a declaration under `kind`, with the most bytes its serialised form may take."""

    def register(cls: type[Message]) -> type[Message]:
        if kind in MESSAGES:
            raise ValueError(f"a message kind {kind!r} is already declared")
        cls.kind, cls.max_bytes = kind, int(max_bytes)
        MESSAGES[kind] = cls
        return cls

    return register


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "the object"
    value = err.get("input")
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    extra = f" ({len(exc.errors())} problems)" if len(exc.errors()) > 1 else ""
    got = "" if err["type"] == "missing" else f", got {shown}"
    return f"{where}: {err['msg'].lower()}{got}{extra}"


def parse(cls: type[Message], data: bytes | dict, party: str = "", where: str = "") -> Message:
    """`data` (the bytes a party wrote, or an already-decoded JSON object such as a payload header's meta)
    parsed against `cls`, or MessageRefused."""
    label = f"{cls.kind}" + (f" from {party}" if party else "") + (f" ({where})" if where else "")
    try:
        if isinstance(data, bytes | bytearray | memoryview):
            if len(data) > cls.max_bytes:
                raise MessageRefused(
                    f"{label} takes {len(data)} bytes, over its limit of {cls.max_bytes}", cls.kind, party
                )
            return cls.model_validate_json(bytes(data))
        if not isinstance(data, dict):
            raise MessageRefused(f"{label} is not a JSON object", cls.kind, party)
        return cls.model_validate(data)
    except ValidationError as exc:
        raise MessageRefused(f"{label} refused: {_first_problem(exc)}", cls.kind, party) from None


# ---------------------------------------------------------------- the declarations
@message("update_header", max_bytes=4 << 10)
class UpdateHeader(Message):
    """What a site's update says about itself (the `meta` of its payload header)."""

    run_id: Name
    round: Annotated[int, Field(ge=1, le=1_000_000)]
    site: Name
    n_train: Annotated[int, Field(ge=1, le=1_000_000_000)]
    loss: Finite | None  # None: kept at the site (a DP-SGD site's loss is not noised)
    steps: Count = 0


@message("global_header", max_bytes=64 << 10)
class GlobalHeader(Message):
    """What the server's global module of a round says (the `meta` of its payload header)."""

    run_id: Name
    round: Round
    sites_present: Annotated[list[Name], Field(max_length=10_000)]
    best_round: Round | None = None


class SplitMetrics(Message):
    """A site's metrics on one of its own splits: every key present; a metric is null when undefined."""

    acc: Unit | None
    bacc: Unit | None
    f1: Unit | None
    ece: Unit | None
    ece_reference: Unit | None
    n: Count
    # counts [true class][predicted class] of the split (the model card's bootstrap intervals come from them)
    confusion: (
        Annotated[list[Annotated[list[Count], Field(max_length=1000)]], Field(max_length=1000)] | None
    ) = None


class BackboneIdentity(Message):
    name: Short
    weights_sha256: Hex64
    feature_dim: Annotated[int, Field(ge=1, le=1_000_000)]
    image_size: Annotated[int, Field(ge=1, le=100_000)]
    patch_size: Annotated[int, Field(ge=1, le=100_000)]
    vision_layers: Annotated[int, Field(ge=0, le=10_000)]
    vision_width: Annotated[int, Field(ge=1, le=1_000_000)]


class PreprocessingSpec(Message):
    name: Short
    size: Annotated[int, Field(ge=1, le=100_000)]
    resample: Short
    center_crop: bool
    mean: Annotated[list[Finite], Field(min_length=3, max_length=3)]
    std: Annotated[list[Finite], Field(min_length=3, max_length=3)]


class Provenance(Message):
    """A holder's feature-store provenance (hashes only: no image id leaves a site)."""

    format: Annotated[int, Field(ge=0, le=1000)]
    backbone: BackboneIdentity
    preprocessing: PreprocessingSpec
    prompt_template: Text
    class_names: Annotated[list[Short], Field(max_length=10_000)]
    n_images: Count
    image_list_sha256: Hex64
    digest: Hex64


class PrivacyLedger(Message):
    """A DP-SGD site's privacy ledger (`fedmedclip.privacy`, where a branch has it): its plan and epsilon so
    far."""

    epsilon: Annotated[float, Field(ge=0.0, le=1e30)]
    delta: Annotated[float, Field(gt=0.0, lt=1.0)]
    noise_multiplier: Annotated[float, Field(ge=0.0, le=1e30)]
    clip: Annotated[float, Field(ge=0.0, le=1e30)]
    sample_rate: Annotated[float, Field(gt=0.0, le=1.0)]
    steps: Count
    planned_steps: Count
    n_train: Count
    accountant: Short | None = None
    budget: Annotated[float, Field(ge=0.0, le=1e30)] | None = None
    stopped_at_round: Round | None = None


class Recovery(Message):
    """A party that resumed from older state than its newest: from which round, and why."""

    from_round: Round
    reason: Text


@message("report", max_bytes=256 << 10)
class SiteReport(Message):
    """A site's metrics for a round: its own predictor, with the round's global module loaded, on its own
    validation and test splits (null when the split is empty)."""

    format: Literal[1]
    run_id: Name
    round: Annotated[int, Field(ge=1, le=1_000_000)]
    site: Name
    val: SplitMetrics | None
    test: SplitMetrics | None
    provenance: Provenance
    privacy: PrivacyLedger | None = None
    recovered: Recovery | None = None


State = Literal[
    "preparing", "waiting", "uploaded", "finishing", "done", "failed", "waiting_updates", "waiting_reports"
]


@message("status", max_bytes=16 << 10)
class Status(Message):
    """A party's heartbeat: what it is doing, at which round, when (its own clock)."""

    party: Name
    state: State
    round: Round
    message: Text
    time: Annotated[float, Field(ge=0.0, le=1e11)]
    best_round: Round | None = None

    @classmethod
    def of(cls, party: str, state: str, round_index: int, message: str, time: float, **extra) -> Status:
        """A status to write: a long message is shortened to fit (the writer's own errors can be long)."""
        limit = 4000
        text = message if len(message) <= limit else message[: limit - 3] + "..."
        return cls.build(party=party, state=state, round=round_index, message=text, time=time, **extra)


class SampleCounts(Message):
    train: Count
    val: Count
    test: Count


@message("site_summary", max_bytes=256 << 10)
class SiteSummary(Message):
    """What the server may know of a site's data (`summaries/sites/<k>.json`): counts, never images."""

    format: Literal[1]
    site: Name
    index: Annotated[int, Field(ge=0, le=100_000)]
    class_names: Annotated[list[Short], Field(max_length=10_000)]
    samples: SampleCounts
    partition_digest: Hex64


__all__ = [
    "MESSAGES",
    "GlobalHeader",
    "Message",
    "MessageRefused",
    "PrivacyLedger",
    "Provenance",
    "Recovery",
    "SiteReport",
    "SiteSummary",
    "SplitMetrics",
    "Status",
    "UpdateHeader",
    "message",
    "parse",
]

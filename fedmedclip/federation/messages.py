"""Every object one party writes for another, declared once: the writer builds it from its declaration and
the reader parses it against the same declaration. Nothing else a party wrote is ever read.

A declaration is a pydantic model registered with `@message(kind, max_bytes)`: known keys only, none twice in
an object (parsers differ on which of the two values counts), every number finite (JSON's `1e999` parses to
inf and is refused like the `NaN`/`Infinity` tokens), integers bounded, strings and lists bounded in length,
and the serialised object bounded in bytes (checked before it is read, `ObjectStore.get(max_bytes=...)`). Adding a kind of message (secure aggregation's key advertisements and
sealed shares are the last ones added) is one more declaration here; `MESSAGES` lists them all.

A message that does not parse raises `MessageRefused` with one line naming the kind, the party, where it was
read and the first problem; the caller makes that party absent for the round and records the reason.
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from ..data import DUPLICATE_POLICIES
from ..errors import FedMedClipError
from ..jsonfiles import KeyTwice, loads
from ..privacy.settings import LARGEST
from ..secagg.primitives import KEY_BYTES, NONCE_BYTES, SEED_BYTES, label

# ---------------------------------------------------------------- field types
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Round = Annotated[int, Field(ge=0, le=1_000_000)]
Count = Annotated[int, Field(ge=0, le=1_000_000_000)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Finite = Annotated[float, Field(ge=-LARGEST, le=LARGEST)]
Short = Annotated[str, StringConstraints(max_length=256)]
Text = Annotated[str, StringConstraints(max_length=4000)]
# A site's public identity key (secure aggregation): base64 of an Ed25519 key's 32 bytes
IdentityText = Annotated[str, StringConstraints(pattern=r"^ed25519:[A-Za-z0-9+/]{43}=$")]
MAX_SITES = 1000  # sites of one run, in every list or map of them

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


def _key_twice(data: bytes) -> KeyTwice | None:
    """The first key an object of `data` holds twice, which pydantic's JSON parser would take the last value of
    without a word; None also when `data` is not JSON at all (pydantic's parser then says what is wrong)."""
    try:
        loads(data, unique=True)
    except KeyTwice as exc:
        return exc
    except ValueError:
        return None
    return None


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
            twice = _key_twice(bytes(data))
            if twice is not None:
                raise MessageRefused(f"{label} refused: {twice}", cls.kind, party)
            return cls.model_validate_json(bytes(data))
        if not isinstance(data, dict):
            raise MessageRefused(f"{label} is not a JSON object", cls.kind, party)
        return cls.model_validate(data)
    except ValidationError as exc:
        raise MessageRefused(f"{label} refused: {_first_problem(exc)}", cls.kind, party) from None


# ---------------------------------------------------------------- the declarations
class ManifestSite(Message):
    """A site of the run as the manifest lists it: its name, data index and training-set size (the
    aggregation weights come from here)."""

    name: Name
    index: Annotated[int, Field(ge=0, le=1_000_000)]
    n_train: Count


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


class ManifestSecureAggregation(Message):
    """The manifest's `secure_aggregation` entry, as the server writes it (fedmedclip.federation.secure's
    `manifest_section`) and every site reads it back (`SecureRun.from_manifest`)."""

    threshold: Annotated[int, Field(ge=2, le=MAX_SITES)]  # t: n/2 < t <= n, checked against the sites below
    identities: Annotated[dict[Name, IdentityText], Field(max_length=MAX_SITES)]  # each site's registered key
    bound: Annotated[float, Field(gt=0.0, le=LARGEST)]  # the L2 norm each site clips its update to
    codec: Short  # the secure codec's name; that this version makes the same is checked by the reader
    # k of the ring Z_(2^k) the masks live in (fedmedclip.codec.secure allows far fewer bits; the reader
    # checks it is the one this version makes)
    modulus_bits: Annotated[int, Field(ge=2, le=64)]
    weights: Annotated[dict[Name, Unit], Field(max_length=MAX_SITES)]  # each site's aggregation weight


class ManifestCore(Message):
    """The run's manifest (`runs/<run>/manifest.json`), written once by the server
    (fedmedclip.federation.server.make_manifest), read by every party: all but the server options it records.
    Those are the ServerOptions fields declared `manifest=True`, added from their declarations where they live
    (fedmedclip.federation.server.RunManifest, the registered message); `settings` is the run's configuration,
    checked field by field by TrainConfig where a site builds its own."""

    format: Annotated[int, Field(ge=1, le=1000)]
    run_id: Name
    settings: Annotated[dict[Short, Any], Field(max_length=1000)]
    method: Name
    rounds: Annotated[int, Field(ge=1, le=1_000_000)]
    codec_up: Short
    codec_down: Short
    partition_digest: Short
    sites: Annotated[list[ManifestSite], Field(min_length=1, max_length=MAX_SITES)]
    aggregator: Short
    backbone: BackboneIdentity
    preprocessing: PreprocessingSpec
    class_names: Annotated[list[Short], Field(min_length=1, max_length=10_000)]
    # tensor name -> [shape, dtype] of the global module
    template: Annotated[
        dict[Short, Annotated[list[Any], Field(min_length=2, max_length=2)]], Field(max_length=100_000)
    ]
    secure_aggregation: ManifestSecureAggregation | None = None

    @field_validator("secure_aggregation")
    @classmethod
    def _of_the_runs_sites(cls, sec: ManifestSecureAggregation | None, info: ValidationInfo):
        # What a site would otherwise look up and not find (a KeyError). The threshold's range is the protocol's
        # to check (secagg.protocol.SecureSettings), with the keys themselves.
        if sec is None or "sites" not in info.data:  # no sites: that refusal comes first
            return sec
        sites = [s.name for s in info.data["sites"]]
        for entry in ("identities", "weights"):
            named = list(getattr(sec, entry))
            if sorted(named) != sorted(sites):
                raise ValueError(
                    f"{entry} names {', '.join(named) or 'no site'}, the run's sites are {', '.join(sites)}"
                )
        return sec


class EncoderUsed(Message):
    """Which engine encoded a feature store's images (fedmedclip.encoders; outside the store's digest)."""

    engine: Short
    precision: Short
    version: Short
    device: Short = "cpu"  # stores built before the device was recorded were all encoded on the CPU


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
    encoder: EncoderUsed | None = None  # None: a store built before the engine was recorded


class PrivacyLedger(Message):
    """A DP-SGD site's privacy ledger (`fedmedclip.privacy`, where a branch has it): its plan and epsilon so
    far."""

    epsilon: Annotated[float, Field(ge=0.0, le=LARGEST)]
    delta: Annotated[float, Field(gt=0.0, lt=1.0)]
    noise_multiplier: Annotated[float, Field(ge=0.0, le=LARGEST)]
    clip: Annotated[float, Field(ge=0.0, le=LARGEST)]
    sample_rate: Annotated[float, Field(gt=0.0, le=1.0)]
    steps: Count
    planned_steps: Count
    n_train: Count
    accountant: Short | None = None
    budget: Annotated[float, Field(ge=0.0, le=LARGEST)] | None = None
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


@message("duplicates", max_bytes=4 << 10)
class DuplicatesFound(Message):
    """What the exact-duplicate check found and dropped (fedmedclip.data.deduplicate): published.json's
    `duplicates`, which a run on the published data reports as results.json's `data.duplicates`."""

    policy: Literal[DUPLICATE_POLICIES]
    groups: Count
    files: Count
    groups_across_splits: Count
    conflicting_groups: Count
    dropped_conflicting: Count
    dropped_training_copies: Count


# The published data's catalogs (mlops/site_data.py; docs/contracts.md, "Data published to S3"), written by its publisher.
ImageId = Annotated[
    str, StringConstraints(min_length=1, max_length=1024)
]  # checked as a relative id on reading
Md5 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
ClassNames = Annotated[list[Short], Field(max_length=10_000)]


@message("published_catalog", max_bytes=256 << 20)
class PublishedCatalog(Message):
    """`server/published.json`: every image's id, label, split and site (no pixels) and the partition drawn."""

    format: Literal[1]
    source: Annotated[str, StringConstraints(max_length=4096)]
    class_names: ClassNames
    records: list[tuple[ImageId, Short, Short, Short | None]]
    partition_settings: dict[Short, Any]  # shown in refusals only; the digest is what is compared
    partition_digest: Hex64
    image_list: Hex64
    site_prefixes: dict[Name, Short]
    duplicates: DuplicatesFound | None = None  # absent from catalogs published before it was recorded


@message("holder_catalog", max_bytes=64 << 20)
class HolderCatalog(Message):
    """`sites/<k>/catalog.json` and `server/catalog.json`: one holder's images, their MD5s and sizes, and its
    assignment. `bytes` bounds each image's download (absent from catalogs published before it was written)."""

    format: Literal[2]
    holder: Name
    index: Annotated[int, Field(ge=0, le=100_000)] | None
    class_names: ClassNames
    records: list[tuple[ImageId, Short, Short]]
    md5: dict[ImageId, Md5]
    assignment: dict[Short, list[ImageId]]
    partition_digest: Hex64
    bytes: dict[ImageId, Annotated[int, Field(ge=0)]] | None = None


@message("site_summary", max_bytes=256 << 10)
class SiteSummary(Message):
    """What the server may know of a site's data (`summaries/sites/<k>.json`): counts, never images."""

    format: Literal[1]
    site: Name
    index: Annotated[int, Field(ge=0, le=100_000)]
    class_names: Annotated[list[Short], Field(max_length=10_000)]
    samples: SampleCounts
    partition_digest: Hex64


# ---------------------------------------------------------------- secure aggregation (docs/secure-aggregation.md)
# The objects secure aggregation adds to a round (fedmedclip/secagg/protocol.py), in the order they travel:
#     site   -> server  KeyAdvertisement  its round keys, signed with its identity key
#     server -> sites   Roster            the advertisements it accepted (U1) and the round's public grid
#     site   -> server  ShareBundle       Shamir shares of its two seeds, one ciphertext per other site of U1
#     server -> site    Inbox             the ciphertexts addressed to that site, and who shared (U2)
#     site   -> server  (its masked update, a codec payload)
#     server -> sites   Survivors         whose masked updates it aggregates (U3)
#     site   -> server  UnmaskShares      self-mask shares of the survivors, key shares of the dropped
# Keys, seeds, signatures and ciphertexts are base64 of their exact length.
SIGNATURE_BYTES = 64
TAG_BYTES = 16
SHARE_PLAINTEXT = 2 * SEED_BYTES  # the pairwise-key seed's share, then the self-mask seed's share
SEALED_SHARE_BYTES = NONCE_BYTES + SHARE_PLAINTEXT + TAG_BYTES


def _exact_base64(n: int):
    def check(text: str) -> str:
        try:
            raw = base64.b64decode(text, validate=True)
        except ValueError:
            raise ValueError("not base64") from None
        if len(raw) != n:
            raise ValueError(f"decodes to {len(raw)} bytes, expected {n}")
        return text

    return Annotated[str, StringConstraints(max_length=4 * (-(-n // 3))), AfterValidator(check)]


RoundIndex = Annotated[int, Field(ge=1, le=1_000_000)]
PublicKey = _exact_base64(KEY_BYTES)
Digest = _exact_base64(32)
Signature = _exact_base64(SIGNATURE_BYTES)
SealedShare = _exact_base64(SEALED_SHARE_BYTES)
Share = _exact_base64(SEED_BYTES)
Sites = Annotated[list[Name], Field(max_length=MAX_SITES)]
SealedShares = Annotated[dict[Name, SealedShare], Field(max_length=MAX_SITES)]  # by the other site
Shares = Annotated[dict[Name, Share], Field(max_length=MAX_SITES)]  # by the site whose seed it shares
TensorName = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Step = Annotated[float, Field(ge=1e-30, le=1e30)]


def signed_bytes(run_id, round_index, site, cipher_key, mask_key, commitment) -> bytes:
    """What a site signs: every field of its advertisement, under a label of its own."""
    return label("advertisement", json.dumps([run_id, round_index, site, cipher_key, mask_key, commitment]))


@message("secagg_identity", max_bytes=1 << 10)
class IdentityRegistration(Message):
    """A site's public identity key, registered through the mailbox by the site itself where the sites are
    created by the system (the pipeline; `site run --register-identity`): the server trusts it as far as it
    trusts the storage role that wrote it (docs/secure-aggregation.md, "Onboarding")."""

    run_id: Name
    site: Name
    identity: IdentityText


@message("secagg_key_advertisement", max_bytes=2 << 10)
class KeyAdvertisement(Message):
    """A site's public keys for one round: `cipher_key` (X25519, encrypts the shares sent to it),
    `mask_key` (X25519, agrees the pairwise masks), the SHA-256 commitment to its self-mask seed; signed
    with its identity key over all of it."""

    run_id: Name
    round: RoundIndex
    site: Name
    cipher_key: PublicKey
    mask_key: PublicKey
    self_mask_commitment: Digest
    signature: Signature

    def signed_bytes(self) -> bytes:
        return signed_bytes(
            self.run_id, self.round, self.site, self.cipher_key, self.mask_key, self.self_mask_commitment
        )


@message("secagg_roster", max_bytes=1 << 20)
class Roster(Message):
    """The advertisements the server accepted (U1), and the round's public quantisation step per tensor."""

    run_id: Name
    round: RoundIndex
    advertisements: Annotated[list[KeyAdvertisement], Field(max_length=MAX_SITES)]
    steps: Annotated[dict[TensorName, Step], Field(max_length=100_000)]


@message("secagg_shares", max_bytes=256 << 10)
class ShareBundle(Message):
    """One sealed share per other site of the roster (ChaCha20-Poly1305 under a key only the two agree)."""

    run_id: Name
    round: RoundIndex
    site: Name
    shares: SealedShares


@message("secagg_inbox", max_bytes=256 << 10)
class Inbox(Message):
    """What the server forwards to `site`: who shared (U2, the site among them) and their sealed shares."""

    run_id: Name
    round: RoundIndex
    site: Name
    senders: Sites
    shares: SealedShares


@message("secagg_survivors", max_bytes=256 << 10)
class Survivors(Message):
    """The sites whose masked updates the server aggregates (U3), out of those that shared (U2)."""

    run_id: Name
    round: RoundIndex
    shared: Sites
    survivors: Sites


@message("secagg_unmask", max_bytes=256 << 10)
class UnmaskShares(Message):
    """A site's answer to the survivors: its shares of each survivor's self-mask seed (its own share of its own
    among them), and of each other dropped site's pairwise-key seed, never both for one site; shares only, never
    a seed (secagg/protocol.py says why)."""

    run_id: Name
    round: RoundIndex
    site: Name
    self_mask: Shares
    mask_key: Shares


__all__ = [
    "MESSAGES",
    "EncoderUsed",
    "GlobalHeader",
    "IdentityRegistration",
    "Inbox",
    "KeyAdvertisement",
    "Message",
    "MessageRefused",
    "PrivacyLedger",
    "Provenance",
    "Recovery",
    "Roster",
    "ShareBundle",
    "SiteReport",
    "SiteSummary",
    "SplitMetrics",
    "Status",
    "Survivors",
    "UnmaskShares",
    "UpdateHeader",
    "message",
    "parse",
]

"""The objects secure aggregation adds to a round, each declared once and parsed against its declaration by
whoever reads it: strict types, no unknown keys, bounded sizes, keys and ciphertexts of their exact length.

    site   -> server  KeyAdvertisement  its round keys, signed with its identity key
    server -> sites   Roster            the advertisements it accepted (U1)
    site   -> server  ShareBundle       Shamir shares of its two seeds, one ciphertext per other site of U1
    server -> site    Inbox             the ciphertexts addressed to that site, and who shared (U2)
    site   -> server  (its masked update, a codec payload)
    server -> sites   Survivors         whose masked updates it aggregates (U3)
    site   -> server  UnmaskShares      self-mask shares of the survivors, key shares of the dropped
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from ..errors import FedMedClipError
from .primitives import KEY_BYTES, NONCE_BYTES, SEED_BYTES, label

MAX_SITES = 1000
SIGNATURE_BYTES = 64
TAG_BYTES = 16
SHARE_PLAINTEXT = 2 * SEED_BYTES  # the pairwise-key seed's share, then the self-mask seed's share
SEALED_SHARE_BYTES = NONCE_BYTES + SHARE_PLAINTEXT + TAG_BYTES


class SecAggRefused(FedMedClipError):
    """A secure-aggregation object or step that breaks the protocol; the message names the party."""


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


Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
RoundIndex = Annotated[int, Field(ge=1, le=1_000_000)]
PublicKey = _exact_base64(KEY_BYTES)
Digest = _exact_base64(32)
Signature = _exact_base64(SIGNATURE_BYTES)
SealedShare = _exact_base64(SEALED_SHARE_BYTES)
Share = _exact_base64(SEED_BYTES)
Sites = Annotated[list[Name], Field(max_length=MAX_SITES)]


def raw(text: str) -> bytes:
    return base64.b64decode(text)


def text(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Declared(BaseModel):
    """Strict, closed, immutable; `kind` names the object in errors, `max_bytes` bounds what is read."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    kind: ClassVar[str] = ""
    max_bytes: ClassVar[int] = 0

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def parse(cls, data: bytes, party: str = ""):
        """The object `party` wrote, or SecAggRefused naming the kind, the party and the first problem."""
        who = f"{cls.kind}" + (f" from {party}" if party else "")
        if len(data) > cls.max_bytes:
            raise SecAggRefused(f"{who} takes {len(data)} bytes, over its limit of {cls.max_bytes}")
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in err["loc"]) or "the object"
            raise SecAggRefused(f"{who} refused: {where}: {err['msg'].lower()}") from None


class KeyAdvertisement(Declared):
    """A site's public keys for one round: `cipher_key` (X25519, encrypts the shares sent to it),
    `mask_key` (X25519, agrees the pairwise masks), the SHA-256 commitment to its self-mask seed; signed
    with its identity key over all of it."""

    kind = "secagg key advertisement"
    max_bytes = 2 << 10

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


def signed_bytes(run_id, round_index, site, cipher_key, mask_key, commitment) -> bytes:
    """What a site signs: every field of its advertisement, under a label of its own."""
    return label("advertisement", json.dumps([run_id, round_index, site, cipher_key, mask_key, commitment]))


class Roster(Declared):
    kind = "secagg roster"
    max_bytes = 1 << 20

    run_id: Name
    round: RoundIndex
    advertisements: Annotated[list[KeyAdvertisement], Field(max_length=MAX_SITES)]


class ShareBundle(Declared):
    """One sealed share per other site of the roster (ChaCha20-Poly1305 under a key only the two agree)."""

    kind = "secagg shares"
    max_bytes = 256 << 10

    run_id: Name
    round: RoundIndex
    site: Name
    shares: Annotated[dict[Name, SealedShare], Field(max_length=MAX_SITES)]


class Inbox(Declared):
    """What the server forwards to `site`: who shared (U2, the site among them) and their sealed shares."""

    kind = "secagg inbox"
    max_bytes = 256 << 10

    run_id: Name
    round: RoundIndex
    site: Name
    senders: Sites
    shares: Annotated[dict[Name, SealedShare], Field(max_length=MAX_SITES)]


class Survivors(Declared):
    """The sites whose masked updates the server aggregates (U3), out of those that shared (U2)."""

    kind = "secagg survivors"
    max_bytes = 256 << 10

    run_id: Name
    round: RoundIndex
    shared: Sites
    survivors: Sites


class UnmaskShares(Declared):
    """A site's answer to the survivors: its shares of each other survivor's self-mask seed, and of each
    dropped site's pairwise-key seed, never both for one site; and, when it is a survivor itself, its own
    self-mask seed (which the server rebuilds anyway: handing it over saves the site keeping a share of it)."""

    kind = "secagg unmasking shares"
    max_bytes = 256 << 10

    run_id: Name
    round: RoundIndex
    site: Name
    self_mask: Annotated[dict[Name, Share], Field(max_length=MAX_SITES)]
    mask_key: Annotated[dict[Name, Share], Field(max_length=MAX_SITES)]
    own_self_mask_seed: Share | None = None

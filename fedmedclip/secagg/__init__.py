"""Secure aggregation: the server learns only the weighted sum of the updates of the sites present.

- `identity.py`: each site's long-term Ed25519 identity key (generated at the site, public key in the run
  manifest).
- `primitives.py`: the calls into `cryptography` and `pycryptodome` (X25519, HKDF, ChaCha20, AEAD, Shamir).
- `messages.py`: the objects the protocol adds to a round, declared once.
- `protocol.py`: one round of Bonawitz et al. (CCS 2017) for each site and for the server.
- The masking itself is a stage of the update's codec: `fedmedclip/codec/secure.py`.

Threat model and costs: docs/secure-aggregation.md."""

from .identity import IdentityKey
from .messages import (
    Inbox,
    KeyAdvertisement,
    Roster,
    SecAggRefused,
    ShareBundle,
    Survivors,
    UnmaskShares,
)
from .primitives import random_secret
from .protocol import (
    SecureSettings,
    SiteRound,
    as_tensors,
    check_advertisement,
    check_bundle,
    check_unmask,
    default_threshold,
    make_inboxes,
    make_roster,
    make_survivors,
    unmask_total,
)

__all__ = [
    "IdentityKey",
    "Inbox",
    "KeyAdvertisement",
    "Roster",
    "SecAggRefused",
    "SecureSettings",
    "ShareBundle",
    "SiteRound",
    "Survivors",
    "UnmaskShares",
    "as_tensors",
    "check_advertisement",
    "check_bundle",
    "check_unmask",
    "default_threshold",
    "make_inboxes",
    "make_roster",
    "make_survivors",
    "random_secret",
    "unmask_total",
]

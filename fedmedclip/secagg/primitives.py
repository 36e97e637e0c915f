"""The cryptographic building blocks of secure aggregation, each a thin call into a maintained library:
`cryptography` (X25519, HKDF-SHA256, ChaCha20, ChaCha20-Poly1305, SHA-256) and `pycryptodome` (Shamir
secret sharing over GF(2^128)). Nothing here implements a primitive; this module only fixes how they are
called (key sizes, domain-separation labels, encodings), so that every party calls them the same way.

Every secret a site shares is a 16-byte seed (pycryptodome's Shamir shares 16-byte secrets): the seed of its
round's pairwise-mask key pair and the seed of its self-mask. Keys are derived from seeds with HKDF, as HPKE
(RFC 9180) derives its key pairs."""

from __future__ import annotations

import hashlib
import os

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DOMAIN = b"fedmedclip secure aggregation v1"
SEED_BYTES = 16  # one Shamir secret
KEY_BYTES = 32
NONCE_BYTES = 12


def label(*parts) -> bytes:
    """A domain-separation label: DOMAIN and the parts, each length-prefixed (no two lists of parts give the
    same bytes)."""
    out = bytearray(DOMAIN)
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        out += len(b).to_bytes(4, "big") + b
    return bytes(out)


def hkdf(secret: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def random_secret() -> bytes:
    """A site's per-run secret, from which it derives every round's keys and seeds (kept in its state)."""
    return os.urandom(KEY_BYTES)


def x25519_from_seed(seed: bytes, purpose: str) -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.from_private_bytes(hkdf(seed, label("x25519", purpose)))


def public_bytes(key: x25519.X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# Any X25519 private key: only a low-order public key gives it the all-zero shared secret, which `exchange`
# refuses (ValueError), and it gives every private key that secret (a clamped scalar is a multiple of 8).
_PROBE = x25519.X25519PrivateKey.from_private_bytes(bytes(range(1, KEY_BYTES + 1)))


def usable_public(peer_public: bytes) -> bool:
    """Whether a key can be agreed with `peer_public`: 32 bytes that are not a low-order point (all zeros, one,
    ...), with which every party's `agree` raises instead of deriving a key."""
    try:
        _PROBE.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        return False
    return True


def agree(private: x25519.X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF of the X25519 shared secret, bound to `info`."""
    shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    return hkdf(shared, info)


def prg(key: bytes, n: int, bits: int) -> np.ndarray:
    """n pseudo-random integers uniform in [0, 2^bits) (bits <= 32), as uint32, from the ChaCha20 keystream of
    `key` (each key is used for one stream only, so the nonce is fixed). Keeping the low bits of uniform
    bytes keeps them uniform."""
    width = 1 if bits <= 8 else 2 if bits <= 16 else 4
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(n * width))
    values = np.frombuffer(stream, dtype={1: np.uint8, 2: "<u2", 4: "<u4"}[width]).astype(np.uint32)
    return values & np.uint32((1 << bits) - 1)


class RingSum:
    """A running sum modulo 2^bits (bits <= 32) of uint32 vectors: uint32 arithmetic wraps modulo 2^32,
    which 2^bits divides, so the low bits are kept once at the end instead of after every term."""

    def __init__(self, n: int, bits: int):
        self.total, self.bits = np.zeros(n, dtype=np.uint32), bits

    def add(self, values: np.ndarray, sign: int = 1) -> None:
        if sign > 0:
            self.total += values
        else:
            self.total -= values

    def value(self) -> np.ndarray:
        """The sum in [0, 2^bits), as int64."""
        return (self.total & np.uint32((1 << self.bits) - 1)).astype(np.int64)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305: a random nonce, then the ciphertext and its tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes | None:
    """The plaintext, or None when the ciphertext, its tag or the associated data was altered."""
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except (InvalidTag, ValueError):
        return None


def split_secret(seed: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares of a 16-byte seed: share i (0-based) is the polynomial at x = i + 1; any `threshold` of
    them give the seed back, fewer tell nothing about it."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a shared secret is {SEED_BYTES} bytes, not {len(seed)}")
    shares = Shamir.split(threshold, holders, seed)
    return [share for _, share in sorted(shares)]


def combine_secret(shares: dict[int, bytes]) -> bytes:
    """The seed from shares {x: share} (x = holder index + 1); pass exactly `threshold` of them."""
    return Shamir.combine(sorted(shares.items()))


def commitment(seed: bytes, purpose: str) -> bytes:
    """SHA-256 of a 128-bit random seed: lets the server check a reconstructed seed without learning it."""
    return hashlib.sha256(label("commitment", purpose) + seed).digest()

"""A site's long-term identity: an Ed25519 key pair (`cryptography`). The private key is generated at the
site and never leaves it (a PEM file readable by its owner only); the public key, printed as
`ed25519:<base64>`, is registered at onboarding in the run manifest. It signs the site's key advertisement
of every round, so that neither the server nor anyone with write access to the bucket can stand in for a
site."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..errors import ConfigError

PREFIX = "ed25519:"
PUBLIC_BYTES = 32


class IdentityKey:
    """A site's Ed25519 private key."""

    def __init__(self, private: ed25519.Ed25519PrivateKey):
        self._private = private

    @classmethod
    def generate(cls) -> IdentityKey:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes, where: str) -> IdentityKey:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where} is not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"{where} holds a {type(key).__name__}, not an Ed25519 identity key")
        return cls(key)

    def to_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def load(cls, path: str | Path) -> IdentityKey:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the identity key {path}: {exc.strerror}") from None
        return cls.from_pem(data, str(path))

    def save(self, path: str | Path) -> None:
        """Write the private key (PEM, PKCS#8) readable by its owner only; never overwrites a key."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"{path} exists: an identity key is never overwritten") from None
        with os.fdopen(fd, "wb") as f:
            f.write(self.to_pem())

    @property
    def public(self) -> str:
        raw = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PREFIX + base64.b64encode(raw).decode()

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)


IDENTITY_FILE = "identity.pem"


def site_identity(location: str | Path, create: bool = False) -> tuple[IdentityKey, bool]:
    """(the identity key kept at `location`, whether it was created now). `location`: a PEM file, or an
    object of a store (`s3://BUCKET/PREFIX/identity.pem`, where a pipeline site keeps its private state).
    With `create`, a missing key is generated there (a local file readable by its owner only); an existing
    one is never replaced."""
    text = str(location)
    if "://" not in text or text.startswith("file://"):
        path = Path(text.removeprefix("file://"))
        if not path.exists() and create:
            key = IdentityKey.generate()
            key.save(path)
            return key, True
        return IdentityKey.load(path), False
    from ..federation.storage import open_store

    parent, _, name = text.rstrip("/").rpartition("/")
    store = open_store(parent)
    data = store.get(name, max_bytes=16 << 10)
    if data is None:
        if not create:
            raise ConfigError(f"no identity key at {text}: generate one with `fedmedclip site keygen`")
        key = IdentityKey.generate()
        store.put(name, key.to_pem())
        return key, True
    return IdentityKey.from_pem(data, text), False


def public_key(text: str, who: str = "") -> ed25519.Ed25519PublicKey:
    """`ed25519:<base64 of 32 bytes>` -> the key; ConfigError naming `who` otherwise."""
    where = f" of {who}" if who else ""
    if not isinstance(text, str) or not text.startswith(PREFIX):
        raise ConfigError(f"the identity key{where} must read 'ed25519:<base64>', got {text!r}")
    try:
        raw = base64.b64decode(text[len(PREFIX) :], validate=True)
    except ValueError:
        raise ConfigError(f"the identity key{where} is not valid base64: {text!r}") from None
    if len(raw) != PUBLIC_BYTES:
        raise ConfigError(f"the identity key{where} holds {len(raw)} bytes, an Ed25519 key {PUBLIC_BYTES}")
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def verify(public: str, message: bytes, signature: bytes) -> bool:
    try:
        public_key(public).verify(signature, message)
        return True
    except (InvalidSignature, ConfigError, ValueError):
        return False

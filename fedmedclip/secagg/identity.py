"""A site's long-term identity: an Ed25519 key pair (`cryptography`). The private key is generated at the
site and never leaves it (a PEM file readable by its owner only); the public key, printed as
`ed25519:<base64>`, is registered at onboarding in the run manifest. It signs the site's key advertisement
of every round, so that neither the server nor anyone with write access to the bucket can stand in for a
site."""

from __future__ import annotations

import base64
import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..errors import ConfigError
from ..paths import lock_folder

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
        if not data:
            raise ConfigError(
                f"the identity key {path} is empty (its generation was interrupted): it is replaced by the next "
                "start that creates the key (`fedmedclip site keygen`, `site run --register-identity`)"
            )
        try:
            return cls.from_pem(data, str(path))
        except ConfigError as exc:
            raise ConfigError(
                f"{exc}; an identity key is never replaced automatically (its public key may be registered "
                f"with a server): restore the key, or remove {path} and register the new key it gets"
            ) from None

    def save(self, path: str | Path) -> None:
        """Write the private key (PEM, PKCS#8) readable by its owner only; never overwrites a key."""
        if not self._publish(Path(path)):
            raise ConfigError(f"{path} exists: an identity key is never overwritten")

    def _publish(self, path: Path) -> bool:
        """Put the key at `path` whole or not at all, unless a key is there already (False): the PEM goes to a
        temporary file of this process's own beside it (0600), synced, then is linked to `path`, which fails
        when another process got there first. Only a zero-length file, what a kill mid-write of older code
        left and which nobody can have read a key from, is replaced (under a lock of the folder, so that two
        processes that both found it empty publish one key)."""
        folder = path.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.to_pem())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                if not _replace_if_empty(tmp, path):
                    return False
            _sync_folder(folder)
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    @property
    def public(self) -> str:
        raw = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PREFIX + base64.b64encode(raw).decode()

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)


IDENTITY_FILE = "identity.pem"


def _missing_or_empty(path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return True
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def _replace_if_empty(tmp: str, path: Path) -> bool:
    """Move `tmp` onto `path` if that is a zero-length file (True); False when it holds anything. Every
    process that found `path` taken comes here, and they take turns (an exclusive lock of the folder, freed by
    the kernel when its holder dies): the first replaces the empty file, the others then find a key."""
    with lock_folder(path.parent):
        try:
            os.link(tmp, path)  # removed by hand meanwhile
            return True
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size:
            return False
        os.replace(tmp, path)
        return True


def _sync_folder(folder: Path) -> None:
    """Make the new name durable: a key whose public half went out must survive a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def site_identity(location: str | Path, create: bool = False) -> tuple[IdentityKey, bool]:
    """(the identity key kept at `location`, whether it was created now). `location`: a PEM file, or an
    object of a store (`s3://BUCKET/PREFIX/identity.pem`, where a pipeline site keeps its private state).
    With `create`, a missing key is generated there (a local file readable by its owner only, which appears
    whole or not at all; processes creating it at once all get the one that was written first); an existing
    one is never replaced, and a file that is not a key is refused. Only a zero-length file (a generation killed
    mid-write by older code, from which no key can have been read) is replaced."""
    text = str(location)
    if "://" not in text or text.startswith("file://"):
        path = Path(text.removeprefix("file://"))
        if create and _missing_or_empty(path):
            key = IdentityKey.generate()
            if key._publish(path):
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

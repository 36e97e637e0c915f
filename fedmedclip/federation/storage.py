"""Object storage behind one small interface: what the federation's parties exchange and keep.

Two implementations live in the core: a local directory (single machine, tests, a hospital's own disk) and
memory (the in-process simulator). S3 lives in `components/` (boto3 is not a core dependency) and plugs in
through the entry-point group `fedmedclip.stores` (name = URL scheme, value = a callable taking the URL).

The contract every implementation keeps, so that parties never coordinate through anything but keys:
- `put` publishes a complete object atomically: a reader sees the old object, or the new one, never half;
- `get` returns the bytes, or None when the key does not exist (a permission problem is an error, never None);
  with `max_bytes` it learns the object's size before reading it and refuses a larger one (`ObjectTooLarge`),
  so another party's object is never read whole to find out it is too big;
- keys are relative, `/`-separated, and confined to the store (no `..`, no absolute path, no empty segment;
  a local directory follows no symbolic link below its root).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import FedMedClipError
from ..extensions import load_extension

STORE_ENTRY_POINTS = "fedmedclip.stores"
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")


class StoreError(FedMedClipError):
    """An object store refused or failed an operation; the message names the object and the party."""


class StoreAccessDenied(StoreError):
    """The credentials in use may not touch this object (the role's policy refuses it)."""


class ObjectTooLarge(StoreError):
    """An object is larger than its reader allows; it was not read."""

    def __init__(self, where: str, size: int, limit: int):
        super().__init__(f"{where} is {size} bytes, over the limit of {limit}: not read")
        self.size, self.limit = size, limit


# Requests of one process to a store at the same time at most (`in_parallel`, `start`); the S3 client keeps 16
# connections.
MAX_PARALLEL = 8
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=MAX_PARALLEL, thread_name_prefix="store")
        return _POOL


def _outcome(call: Callable[[], object]) -> object:
    try:
        return call()
    except Exception as exc:  # handed to the caller, which decides what a failed request means
        return exc


def in_parallel(store: ObjectStore, calls: Sequence[Callable[[], object]]) -> list:
    """Each call's result, or the exception it raised, in order. Where each request to `store` is a network
    round trip (S3) the calls run at the same time, so that n requests cost about one round trip instead of
    n in a row; on a local directory or in memory one after the other, in order."""
    if len(calls) < 2 or store.cheap_polls:
        return [_outcome(call) for call in calls]
    return list(_pool().map(_outcome, calls))


def start(store: ObjectStore, call: Callable[[], object]) -> Callable[[], object]:
    """Start `call` (a request to `store`); returns the wait for its result, which raises what it raised.
    Where a request is a round trip (S3) it goes on while the caller works; elsewhere it is done at once."""
    if store.cheap_polls:
        result = call()
        return lambda: result
    return _pool().submit(call).result


def check_size(where: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ObjectTooLarge(where, size, max_bytes)


def check_key(key: str) -> str:
    """A key confined to its store: relative segments of letters, digits and `._=-`, none starting with a dot."""
    parts = key.split("/")
    if not key or any(not _KEY_SEGMENT.match(p) for p in parts):
        raise StoreError(
            f"invalid object key {key!r}: use relative '/'-separated names of letters, digits and ._=- "
            "(no '..', no absolute path, no empty segment)"
        )
    return key


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file whole or not at all: a temporary file in the same folder (mkstemp's: this write's own,
    readable by its owner only), renamed into place, so a reader (or a crash) never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            os.replace(tmp, path)
        except IsADirectoryError as exc:
            # The system's words named the temporary file, removed below, before the path asked for.
            clear = IsADirectoryError(f"cannot write {path}: it is a directory")
            clear.errno = exc.errno
            raise clear from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_partial_writes(folder: str | Path) -> None:
    """Delete the temporary files of `atomic_write_bytes` calls that a kill (SIGKILL, a lost node) interrupted
    in `folder` (not below it: another party may be writing there): a restart writes those files again whole."""
    for p in list(Path(folder).glob(".*.part")):
        if p.is_file():
            p.unlink(missing_ok=True)


class ObjectStore:
    """The interface. `url` names the store in messages (`s3://bucket/prefix`, a directory, `memory://x`)."""

    url: str = ""
    # Whether asking for a missing object costs next to nothing (a stat of a local file, a dict lookup), so a
    # waiting party may poll every few milliseconds; False where each poll is a network round trip (S3).
    cheap_polls: bool = False

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get(self, key: str, max_bytes: int | None = None) -> bytes | None:
        """The object's bytes, None when it does not exist; ObjectTooLarge (without reading it) when it is
        larger than `max_bytes`."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        return self.get(key) is not None

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def where(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    def sub(self, prefix: str) -> ObjectStore:
        """The same store seen under `prefix/` (a party's area)."""
        return PrefixStore(self, prefix)


class PrefixStore(ObjectStore):
    def __init__(self, base: ObjectStore, prefix: str):
        self.base, self.prefix = base, check_key(prefix.strip("/"))
        self.url = base.where(self.prefix)
        self.cheap_polls = base.cheap_polls

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{check_key(key)}"

    def put(self, key, data):
        self.base.put(self._k(key), data)

    def get(self, key, max_bytes=None):
        return self.base.get(self._k(key), max_bytes)

    def exists(self, key):
        return self.base.exists(self._k(key))

    def delete(self, key):
        self.base.delete(self._k(key))


# A folder of a local store, opened to reach the next name below it and never through a link. O_PATH (Linux)
# needs only search permission on the folder, as a path lookup does; elsewhere the folder is opened to read.
_FOLDER = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY


def _is_link(name: str, folder: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except OSError:
        return False


class LocalDirStore(ObjectStore):
    """Objects as files under a root directory; `put` writes a temporary file and renames it into place.

    Another party sharing the directory may plant a symbolic link at a key, or at a folder on the way to one,
    leading to any file outside the store: a reader would read it (and quote it in a refusal), a writer write
    through it. So every name below the root is opened relative to its folder's descriptor without following a
    link (O_NOFOLLOW), and a link is refused naming the key; `put` renames over a link at the key, which
    replaces the link itself."""

    cheap_polls = True

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.url = str(self.root)
        if self.root.exists() and not self.root.is_dir():  # a mailbox there would be waited for, never found
            raise StoreError(f"{root} is a file, not a folder: give a folder (or s3://BUCKET/PREFIX)")

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _link(self, key: str, at: str) -> StoreError:
        what = "" if at == key else f": its folder {self.where(at)}"
        return StoreError(f"{self.where(key)}{what} is a symbolic link: not followed")

    def _folder(self, key: str, create: bool = False) -> tuple[int, str]:
        """(a descriptor of the folder holding `key`, the key's last name), each folder below the root reached
        without following a link (`create`: made where missing); FileNotFoundError or NotADirectoryError when
        one is missing or a file."""
        *folders, name = check_key(key).split("/")
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, _FOLDER)
        try:
            for i, folder in enumerate(folders):
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(folder, dir_fd=fd)
                try:
                    inner = os.open(folder, _FOLDER | os.O_NOFOLLOW, dir_fd=fd)
                except OSError:
                    if _is_link(folder, fd):
                        raise self._link(key, "/".join(folders[: i + 1])) from None
                    raise
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        return fd, name

    def put(self, key, data):
        folder, name = self._folder(key, create=True)
        try:
            # Not a key (keys never start with a dot); O_EXCL | O_NOFOLLOW: never a file someone put there.
            tmp = f".{name}.{os.urandom(8).hex()}.part"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=folder)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=folder)
                raise
        finally:
            os.close(folder)

    def get(self, key, max_bytes=None):
        try:
            folder, name = self._folder(key)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except PermissionError as exc:
            raise StoreAccessDenied(f"cannot read {self.where(key)}: {exc.strerror}") from None
        try:
            # Non-blocking open: another party sharing the directory may have put a FIFO (or a device) at one
            # of its keys, whose plain open would wait for a writer forever; such a file is refused below.
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0), dir_fd=folder)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except PermissionError as exc:
            raise StoreAccessDenied(f"cannot read {self.where(key)}: {exc.strerror}") from None
        except OSError:
            if _is_link(name, folder):
                raise self._link(key, key) from None
            raise
        finally:
            os.close(folder)
        # What is at the key is looked at before it becomes a file object: `os.fdopen` of a folder raises
        # IsADirectoryError, which no caller expects of a party's key (a site could stop the server so).
        try:
            mode = os.fstat(fd).st_mode
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(mode):
            os.close(fd)
            if stat.S_ISDIR(mode):
                return None
            raise StoreError(f"{self.where(key)} is not a regular file (a FIFO, socket or device): not read")
        with os.fdopen(fd, "rb") as fh:
            if max_bytes is None:
                return fh.read()
            check_size(self.where(key), os.fstat(fh.fileno()).st_size, max_bytes)
            data = fh.read(max_bytes + 1)  # a file that grew since: still never more than this
            check_size(self.where(key), len(data), max_bytes)
            return data

    def exists(self, key):
        """Whether a regular file is at `key` (a link, a FIFO: no)."""
        try:
            folder, name = self._folder(key)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False
        finally:
            os.close(folder)

    def delete(self, key):
        try:
            folder, name = self._folder(key)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            os.unlink(name, dir_fd=folder)  # a link at the key is removed itself, never its target
        except FileNotFoundError:
            pass
        finally:
            os.close(folder)


_MEMORY: dict[str, dict[str, bytes]] = {}
_MEMORY_LOCK = threading.Lock()


class MemoryStore(ObjectStore):
    """Objects in a dict of this process; stores of the same name share their objects (`memory://NAME`)."""

    cheap_polls = True

    def __init__(self, name: str = "default"):
        self.url = f"memory://{name}"
        with _MEMORY_LOCK:
            self._objects = _MEMORY.setdefault(name, {})

    def put(self, key, data):
        with _MEMORY_LOCK:
            self._objects[check_key(key)] = bytes(data)

    def get(self, key, max_bytes=None):
        with _MEMORY_LOCK:
            data = self._objects.get(check_key(key))
        if data is not None:
            check_size(self.where(key), len(data), max_bytes)
        return data

    def delete(self, key):
        with _MEMORY_LOCK:
            self._objects.pop(check_key(key), None)

    def clear(self) -> None:
        """Drop every object of this named store (the in-process simulator frees its mailbox at the end)."""
        with _MEMORY_LOCK:
            self._objects.clear()
            _MEMORY.pop(self.url.removeprefix("memory://"), None)


def open_store(url: str | Path) -> ObjectStore:
    """`memory://NAME`, a local directory (or `file://DIR`), or any scheme a layer registered under the
    entry-point group `fedmedclip.stores` (the MLOps layer registers `s3`)."""
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return LocalDirStore(text)
    if scheme == "memory":
        return MemoryStore(rest or "default")
    if scheme == "file":
        return LocalDirStore(rest)
    factory = load_extension(STORE_ENTRY_POINTS, scheme, StoreError, f"{text}: the {scheme}:// store")
    if factory is not None:
        return factory(text)
    raise StoreError(f"{text}: unknown store scheme {scheme!r}; use a local directory, memory:// or s3://")

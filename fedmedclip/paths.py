"""Paths named by data we did not write (manifests, catalogs, object keys) confined to their root.

An image id is a `/`-separated path relative to its source's root. Read back from a manifest, a catalog or
an object store, it is joined to a local folder (the data root, a download cache) or to a key prefix
(`sites/<k>/images/`); an id such as `../../x` or `/etc/x`, or a symlink under the root that points
elsewhere, would then reach outside. These helpers refuse that with an error naming the id and where it
came from. And `put_folder_in_place`: a folder written under a private name put where processes sharing a
cache look for it; `lock_folder`: processes that change a folder's contents taking turns.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from .errors import ConfigError, DataError

# Where encoded features, downloaded backbones and S3 images are kept unless --cache-dir says otherwise.
DEFAULT_CACHE_DIR = ".cache/fedmedclip"


def check_folder_flag(flag: str, folder: str | Path) -> None:
    """A folder a command creates or writes in, refused in one line (ConfigError) when it or a folder above it
    is a file: mkdir said only "[Errno 17] File exists" or "[Errno 20] Not a directory"."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == path else f" {existing}"
        raise ConfigError(f"{flag} {folder}:{where} is a file, not a directory")


MAX_NAME_BYTES = 255  # the longest file name (one segment of a path) a POSIX file system takes


def relative_id_problem(image_id: object) -> str | None:
    """Why `image_id` is not a non-empty relative posix path with no `.`/`..`/empty segment, no NUL and no
    segment longer than a file name can be (None when it is one): a path another party named, to be placed
    under a root of ours."""
    if not isinstance(image_id, str) or not image_id:
        return "it is empty"
    if "\0" in image_id:
        return "it contains a NUL byte"
    if image_id.startswith("/") or PurePosixPath(image_id).is_absolute() or _windows_absolute(image_id):
        return "it is an absolute path"
    parts = image_id.split("/")
    if ".." in parts:
        return "it has a '..' segment"
    if any(p in ("", ".") for p in parts):
        return "it has an empty or '.' segment"
    if long := next((p for p in parts if len(p.encode()) > MAX_NAME_BYTES), None):
        return f"its name {long[:40]!r}... takes {len(long.encode())} bytes, more than a file name can"
    return None


def check_relative_id(image_id: str, source: str) -> str:
    """`image_id` itself when `relative_id_problem` finds nothing, else DataError; `source` names where the id
    was read (a manifest line, a catalog URI) for the error."""
    if problem := relative_id_problem(image_id):
        raise DataError(
            f"image id {image_id!r} from {source} is refused: {problem} (ids must stay inside their root)"
        )
    return image_id


def _windows_absolute(text: str) -> bool:
    # `C:/x` or `C:\x`: harmless on POSIX, but never a relative id either.
    return len(text) >= 2 and text[1] == ":" and text[0].isalpha()


def is_within(path: str | Path, root: str | Path) -> bool:
    """True when `path`, with every symlink resolved, is `root` or lies under it (also resolved)."""
    return Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(root)))


def confined_path(root: str | Path, image_id: str, source: str) -> Path:
    """`root/image_id`, refused when the id is not a clean relative path or when the joined path, symlinks
    resolved, leaves `root` (a link inside the root pointing elsewhere). The path need not exist yet: its
    deepest existing ancestor is what is resolved."""
    check_relative_id(image_id, source)
    root = Path(root)
    target = root.joinpath(*image_id.split("/"))
    if not is_within(target, root):
        raise DataError(
            f"image id {image_id!r} from {source} is refused: {target} resolves to {os.path.realpath(target)}, "
            f"outside its root {os.path.realpath(root)} (a symbolic link)"
        )
    return target


def check_file_within(path: str | Path, root: str | Path, what: str, hint: str = "") -> None:
    """Refuse a file that resolves outside `root` (`what` names it and its source in the error; `hint` says
    how to allow it on purpose)."""
    if not is_within(path, root):
        raise DataError(
            f"{what} resolves to {os.path.realpath(path)}, outside the data root {os.path.realpath(root)}"
            + (f"; {hint}" if hint else "")
        )


def put_folder_in_place(tmp: str | Path, final: str | Path, already_there: Callable[[], bool]) -> None:
    """Move the folder `tmp` (written under a private temporary name beside `final`) to `final` in one step, so
    that no reader sees it half-written. Processes sharing a cache may build the same folder at once: when one
    got there first (a non-empty folder cannot be replaced), `tmp` is dropped, and the error stands only when
    `already_there()` says that what is at `final` is not that folder: then, when something else is there (an
    interrupted or edited copy, a file), an OSError in one line naming `final` and what to do; it is left
    untouched."""
    try:
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if already_there():
            return
        if os.path.lexists(final) and exc.errno in _IN_THE_WAY:
            # The system's words named the temporary folder, removed by now, and said nothing of what to do.
            what = "a folder" if os.path.isdir(final) else "a file"
            clear = OSError(
                f"{final} is {what} that does not hold what belongs there (an interrupted or edited copy): it is "
                "left untouched; delete it, and the next run builds it again"
            )
            clear.errno = exc.errno
            raise clear from None
        raise


_IN_THE_WAY = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)  # os.replace onto what is there


@contextlib.contextmanager
def lock_folder(folder: str | Path, on_wait: Callable[[], None] = lambda: None):
    """An exclusive advisory lock on `folder` itself, held for the `with` block (flock on a descriptor of it: no
    lock file that would make the folder non-empty, and the kernel frees it when its holder dies). When another
    process holds it, `on_wait()` first: it says why this one waits, or raises to refuse rather than wait.
    Where the file system takes no locks, the block runs without one."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks
            pass
        yield
    finally:
        os.close(fd)

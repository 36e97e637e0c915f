"""Reading the JSON files of a run directory (config.json, results.json, model/model.json, ...), which a crash,
a disk or a person may have damaged: every reader gets a ValueError naming what is wrong, never a traceback,
and never reads past a bound (only a regular file of at most MAX_JSON_BYTES: a link to /dev/zero is refused).
And `unique_keys`, the hook every parser of JSON another party wrote passes to `json.loads`.
Standard library only: the model card and `fedmedclip track` read run directories without torch.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

# The most `read_json` reads of a file. Generous: a run directory's JSON files are small (results.json holds a few
# kB per round), and the largest file read so, a feature store's index.json, holds one image id per image (about
# 50 bytes each: 2.5 million images). A link to /dev/zero, a FIFO or a file grown without end is never read whole.
MAX_JSON_BYTES = 128 << 20


class KeyTwice(ValueError):
    """A JSON object holds a key twice. Parsers differ on which value counts (Python's keeps the last, others
    the first or either), so two readers of one object could act on different values: it is refused."""

    def __init__(self, key: str):
        shown = repr(key) if len(key) <= 60 else repr(key[:57]) + "..."
        super().__init__(f"key {shown} written twice")
        self.key = key


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """`json.loads`'s object_pairs_hook for JSON another party wrote: KeyTwice for a key written twice in any
    object of it."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise KeyTwice(key)
        obj[key] = value
    return obj


def loads(data: str | bytes, unique: bool = False, **options):
    """JSON text parsed (`options`: json.loads's), or a ValueError: what is not JSON, nesting too deep for
    Python's parser (it raises RecursionError, which no reader of a damaged file or another party's object
    expects) and, with `unique`, a key written twice (KeyTwice, `unique_keys`)."""
    try:
        return json.loads(data, object_pairs_hook=unique_keys if unique else None, **options)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def no_constant(name: str):
    """`json.loads`'s parse_constant for strict JSON: NaN and Infinity are not JSON (Python's writer puts them
    unless told not to; every writer of this project is told), so one in a file was written by another hand."""
    raise ValueError(f"{name} is not a number JSON has")


def read_bounded(path: str | Path, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file at `path` (a link is followed to one), or a ValueError for anything else
    (a folder, a device such as /dev/zero, a FIFO, a socket) and for a file larger than `max_bytes` (default
    MAX_JSON_BYTES), which is not read. Opened without blocking, so a FIFO without a writer is refused rather
    than waited on. OSError (a file missing, no permission) passes through."""
    max_bytes = MAX_JSON_BYTES if max_bytes is None else max_bytes
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:  # looked at before it becomes a file object (`os.fdopen` of a folder raises IsADirectoryError)
        info = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            what = "a folder" if stat.S_ISDIR(info.st_mode) else "a device, FIFO or socket"
            raise ValueError(f"not a regular file ({what}): not read")
        raise ValueError(f"{info.st_size:,} bytes, over the limit of {max_bytes:,} bytes: not read")
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(max_bytes + 1)  # a file that grew since: still never more than this
    if len(data) > max_bytes:
        raise ValueError(f"over the limit of {max_bytes:,} bytes (it grew while read): not read")
    return data


def read_json(path: str | Path, max_bytes: int | None = None):
    """The JSON in a run directory's file (`loads`: a ValueError for what is not JSON, NaN and Infinity
    included; `read_bounded`: a ValueError for what is not a regular file of at most `max_bytes`); OSError
    passes through."""
    return loads(read_bounded(path, max_bytes), parse_constant=no_constant)


def read_json_object(path: str | Path, max_bytes: int | None = None) -> dict:
    """`read_json`, and a ValueError unless it is a JSON object (`[]` must not read as an empty settings)."""
    obj = read_json(path, max_bytes)
    if not isinstance(obj, dict):
        raise ValueError(f"a JSON object expected, got {type(obj).__name__}")
    return obj

"""Reading the JSON files of a run directory (config.json, results.json, model/model.json, ...), which a crash,
a disk or a person may have damaged: every reader gets a ValueError naming what is wrong, never a traceback.
And `unique_keys`, the hook every parser of JSON another party wrote passes to `json.loads`.
Standard library only: the model card and `fedmedclip track` read run directories without torch.
"""

from __future__ import annotations

import json
from pathlib import Path


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


def read_json(path: str | Path):
    """The JSON in a run directory's file (`loads`: a ValueError for what is not JSON, NaN and Infinity
    included); OSError passes through."""
    return loads(Path(path).read_text(), parse_constant=no_constant)


def read_json_object(path: str | Path) -> dict:
    """`read_json`, and a ValueError unless it is a JSON object (`[]` must not read as an empty settings)."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise ValueError(f"a JSON object expected, got {type(obj).__name__}")
    return obj

"""Where a benchmark's figures go besides its printed lines: the `--json` file, written again after every row
so that a long run interrupted keeps what it measured."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | None, data) -> None:
    """`data` as indented JSON at `path` (its folder made); nothing when no path was given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1))

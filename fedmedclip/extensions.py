"""How the core finds what the MLOps layer adds to it without importing it: entry points (stores, data sources,
remote backbones, the live observer, CLI commands), each group read once per process."""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points


@functools.cache
def installed(group: str) -> tuple[EntryPoint, ...]:
    """The installed entry points of `group`. Read once: each read scans every installed distribution's metadata
    (about 7 ms of CPU in this project's environment), where a process opens stores and builds parsers often."""
    return tuple(entry_points(group=group))


def load_extension(group: str, name: str, refusal: type[Exception], needs: str):
    """What the entry point `name` of `group` names, None where none is installed. One that is declared but
    cannot be imported (its layer's extra is not installed here) is refused as `refusal`, in one wording: what
    `needs` it and the missing import."""
    for ep in installed(group):
        if ep.name == name:
            try:
                return ep.load()
            except ImportError as exc:
                raise refusal(
                    f"{needs} needs the MLOps layer's packages ({exc}); install the project with its `pipelines` "
                    "extra"
                ) from None
    return None

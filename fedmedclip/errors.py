"""Errors a user can act on. The CLI prints their message and exits with status 2, no traceback."""

import os
import signal
import sys
import traceback


def shown(value: object) -> str:
    """`value` for a one-line message about another party's input: its repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def shown_list(values: list, most: int = 10) -> str:
    """The first `most` of `values`, each as `shown` writes it, and how many more: one bounded line."""
    more = f" and {len(values) - most} more" if len(values) > most else ""
    return ", ".join(map(shown, values[:most])) + more


def printable(text: str) -> str:
    """`text` with every character that is not printable (control characters such as ESC, CR, NEL, U+2028,
    bidi overrides) written as its Python escape: what another party wrote never forges a log line or drives
    the terminal an operator reads the log in."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


# The most of another party's words a record or log line keeps: a 2 MB codec name quoted in a rejection reason
# was written into the server's checkpoint, results.json and log every round.
MAX_REASON_CHARS = 500


def reason_line(text: str) -> str:
    """Why another party's object was refused (or what it said of itself), as recorded and logged: printable,
    at most MAX_REASON_CHARS."""
    text = printable(text)
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def first_repeat(names: list) -> int | None:
    """The index at which `names` lists a name a second time, first in order; None when each is there once."""
    seen = set()
    for index, name in enumerate(names):
        if name in seen:
            return index
        seen.add(name)
    return None


def class_names_problem(names) -> str | None:
    """Why `names` cannot be a model's classes (None when they can): class names are printed by every console,
    log, model card and `predict`, and answered by the server, so one holding ESC, CR or a newline (a folder named
    so, a manifest's label) would drive the terminal of whoever reads them; a name twice makes two answers one."""
    names = list(names)  # an iterator too (the model card's)
    twice = first_repeat(names)
    # The names before the repeat in order, as one pass would: the repeated name itself was checked already.
    for name in names[:twice]:
        if not name.strip():
            return f"class name {shown(name)} is empty"
        if not name.isprintable():
            return f"class name {shown(name)} holds control characters (ESC, CR, newline, ...)"
    return None if twice is None else f"class name {shown(names[twice])} is listed twice"


class FedMedClipError(Exception):
    """Base class: the message names the problem and, where possible, the fix."""


class ConfigError(FedMedClipError):
    """A bad option or combination of options."""


class DataError(FedMedClipError):
    """A bad data source: missing file, empty class, unknown label."""


class ImageDecodeError(DataError):
    """An image file that cannot be read or decoded."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path!r}: {reason}")
        self.path = path
        self.reason = reason


class BackboneNotFound(FedMedClipError):
    """CLIP weights are not available locally (we never download at run time)."""


class ProvenanceMismatch(FedMedClipError):
    """A stored artifact was made from different inputs than the ones asked for."""


class CheckpointError(FedMedClipError):
    """A checkpoint that cannot be resumed from."""


def run_command(args) -> int:
    """A command's exit status: its handler's, or a FedMedClipError's message (status 2) or an OSError's (an
    --out that cannot be created, a full disk: status 1; the system's words name the path) on one line of
    stderr, with the traceback under -v. A closed output pipe ends it quietly (status 141, as SIGPIPE would)."""
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader gone shows here, not as a traceback while the interpreter exits
        return status
    except BrokenPipeError:
        # The reader of our output went away (`fedmedclip card --json | head`): end quietly, as a Unix tool
        # killed by SIGPIPE does; what is still buffered for stdout goes nowhere instead of failing at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (FedMedClipError, OSError) as exc:
        if getattr(args, "verbose", False) and not isinstance(exc, FedMedClipError):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, FedMedClipError) else 1

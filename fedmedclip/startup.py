"""A process collects no cyclic garbage while it imports its libraries.

torch and transformers create hundreds of thousands of long-lived objects when imported, and every full
collection the interpreter triggers meanwhile walks all of them, for nothing: `import torch; from transformers
import CLIPModel` takes 4.3 s of CPU with the collector and 3.3 s without it (a loaded 2-core machine), and every
party of a federation pays it in its own process. So a fresh process that is about to import them pauses the
collector (`pause_collection`), and resumes it once its imports are done (`resume_collection`), after
`gc.freeze()` has moved everything that exists by then out of the collector's sight for good (resuming without
the freeze gains nothing: the next full collection walks it all). Used by the `fedmedclip` command while it
builds its parser, whose declarations import torch and the methods (`imports_without_collection`), and by the
Kubeflow tasks (components/__init__.py).

And at the other end, `leave_now`: a process whose work is done and reported leaves without tearing its
interpreter down (freeing every object torch and transformers made takes seconds of a loaded machine).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys

_paused = False  # by pause_collection, until resume_collection


def pause_collection() -> bool:
    """No automatic collection until `resume_collection`; True when this call paused it. Only in a process that
    has not imported torch yet: one that has (a test process calling the CLI in-process) gains nothing, and its
    objects are not frozen."""
    global _paused
    if "torch" in sys.modules or _paused or not gc.isenabled():
        return False
    gc.disable()
    _paused = True
    return True


def resume_collection() -> None:
    """Where `pause_collection` paused it: freeze what was imported, then collect as usual."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()


@contextlib.contextmanager
def imports_without_collection():
    """The imports inside run with the collector paused (in a fresh process), which resumes after them."""
    pause_collection()
    try:
        yield
    finally:
        resume_collection()


def leave_now() -> None:
    """End this process now, status 0, its logs and standard streams flushed: for one whose work is done and
    reported, from an exit handler that runs after the others (the interpreter's teardown is skipped)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed stream: nothing to flush
            stream.flush()
    os._exit(0)

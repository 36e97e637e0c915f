"""A KFP task's process ends as soon as its work is done and its output written.

A task that imported torch and transformers spends seconds in the interpreter's teardown after the KFP
executor has written its output (measured: 2-4 s of a loaded 2-core machine per process; ten such tasks run
per pipeline, most on the critical path). Nothing is left to do by then (threads joined, the other exit
handlers run), so it leaves with `os._exit(0)` after flushing its streams and logs. A task that failed (an
uncaught exception) or called `sys.exit` exits as Python always does, with its traceback and status.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys


def in_kfp_task() -> bool:
    """Whether this process is a KFP task's (the command KFP compiles sets _KFP_RUNTIME=true)."""
    return os.environ.get("_KFP_RUNTIME", "").lower() == "true"


def exit_fast_after_success() -> None:
    """Install the quick exit in this process (components/__init__.py does, once, in a KFP task only)."""
    failed = []
    previous_hook, previous_exit = sys.excepthook, sys.exit

    def note_failure(kind, value, tb):
        failed.append(kind)
        previous_hook(kind, value, tb)

    def note_exit(code=None):
        failed.append(SystemExit)  # an explicit exit keeps its own status: the normal way out
        previous_exit(code)

    def leave():
        if failed:
            return
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed stream: nothing to flush
                stream.flush()
        os._exit(0)

    sys.excepthook, sys.exit = note_failure, note_exit
    atexit.register(leave)

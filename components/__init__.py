"""Kubeflow pipeline components, one folder each (components/README.md): thin wrappers around the core. No
component module has `from __future__ import annotations`: KFP reads the components' annotations as types.

Every component's body imports this package, so in a KFP task's process (only there: the command KFP compiles
sets _KFP_RUNTIME=true) it pauses the garbage collector while the task imports torch and transformers
(fedmedclip/startup.py says why; the worker and export tasks resume it before their long work), and it installs
the quick exit: a task that imported torch and transformers spends seconds in the interpreter's teardown after
the executor has written its output (2-4 s of a loaded 2-core machine per process, ten such tasks per pipeline,
most on the critical path), with nothing left to do by then (threads joined, other exit handlers run). So a task
that succeeded leaves with `os._exit(0)` after flushing its streams and logs; one that failed (an uncaught
exception) or called `sys.exit` exits as Python always does, with its traceback and status.
"""

import atexit
import os
import sys

from fedmedclip.startup import leave_now, pause_collection


def exit_fast_after_success() -> None:
    """Install the quick exit in this process (this package does, once, in a KFP task only)."""
    failed = []
    previous_hook, previous_exit = sys.excepthook, sys.exit

    def note_failure(kind, value, tb):
        failed.append(kind)
        previous_hook(kind, value, tb)

    def note_exit(code=None):
        failed.append(SystemExit)  # an explicit exit keeps its own status: the normal way out
        previous_exit(code)

    def leave():
        if not failed:
            leave_now()

    sys.excepthook, sys.exit = note_failure, note_exit
    atexit.register(leave)


if os.environ.get("_KFP_RUNTIME", "").lower() == "true":
    exit_fast_after_success()
    pause_collection()

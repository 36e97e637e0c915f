"""A pipeline task's process collects no cyclic garbage while it imports its libraries.

torch and transformers create hundreds of thousands of long-lived objects when imported, and every full
collection the interpreter triggers meanwhile walks all of them, for nothing: measured on a loaded 2-core
machine, `import torch; from transformers import CLIPModel` takes 4.3 s of CPU with the collector and 3.3 s
without it, and every party of a run pays it in its own task process. So the package pauses the collector in a
KFP task's process (only there, as components/task_exit.py does its quick exit); a task that goes on to long
work (a party's federation worker, the ONNX export) resumes it once its imports are done, after `gc.freeze()`
has moved everything that exists by then out of the collector's sight for good. The short tasks (prepare,
report, register) end with it paused.
"""

from __future__ import annotations

import gc
import sys

from .task_exit import in_kfp_task


def pause_collection() -> bool:
    """In a KFP task's process: no automatic collection until `resume_collection`; True when paused."""
    if not in_kfp_task() or getattr(sys, "_fedmedclip_gc_paused", False):
        return False
    gc.disable()
    sys._fedmedclip_gc_paused = True
    return True


def resume_collection() -> None:
    """Where `pause_collection` paused it: freeze what was imported, then collect as usual. Elsewhere (tests, the
    CLI) nothing changes."""
    if getattr(sys, "_fedmedclip_gc_paused", False):
        sys._fedmedclip_gc_paused = False
        gc.freeze()
        gc.enable()

"""A pipeline task's process collects no cyclic garbage while it imports its libraries (fedmedclip/startup.py
says why). The package pauses the collector in a KFP task's process (only there, as components/task_exit.py does
its quick exit); a task that goes on to long work (a party's federation worker, the ONNX export) resumes it once
its imports are done (`resume_collection`, with everything imported by then frozen). The short tasks (prepare,
report, register) end with it paused.
"""

from __future__ import annotations

from fedmedclip.startup import pause_collection as _pause
from fedmedclip.startup import resume_collection

from .task_exit import in_kfp_task

__all__ = ["pause_collection", "resume_collection"]


def pause_collection() -> bool:
    """In a KFP task's process: no automatic collection until `resume_collection`; True when paused."""
    return in_kfp_task() and _pause()

"""Kubeflow pipeline components and the MLOps glue (tracking, registry, local stack): thin wrappers around the core.

Every component's body imports from this package, so a KFP task's process installs its quick exit here
(components/task_exit.py: no seconds of interpreter teardown after the task's output is written) and pauses the
garbage collector while it imports torch and transformers (components/task_gc.py)."""

from .task_exit import exit_fast_after_success
from .task_gc import pause_collection

exit_fast_after_success()
pause_collection()

"""Kubeflow pipeline components, one folder each (components/README.md): thin wrappers around the core.

Every component's body imports this package, so in a KFP task's process (only there) it installs the quick exit
(task_exit.py) and pauses the garbage collector while the task imports torch and transformers
(fedmedclip/startup.py says why); a task that goes on to long work (a party's worker, the ONNX export) resumes
it with `fedmedclip.startup.resume_collection` once its imports are done."""

from fedmedclip.startup import pause_collection

from .task_exit import exit_fast_after_success, in_kfp_task

if in_kfp_task():
    exit_fast_after_success()
    pause_collection()

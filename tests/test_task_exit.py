"""A KFP task's process leaves right after its work (components/__init__.py): with status 0 and its output
flushed when it succeeded, the normal way (traceback, non-zero status) when it failed or called sys.exit,
and never outside a KFP task."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# An exit handler registered before the components are imported runs after theirs: it prints only when the
# process went through the interpreter's normal teardown.
SCRIPT = """
import atexit, sys
atexit.register(lambda: print("normal teardown", flush=True))
import components.kfp_components
print("work done")
{ending}
"""


def _task(ending: str, kfp_runtime: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("_KFP_RUNTIME", None)
    if kfp_runtime:
        env["_KFP_RUNTIME"] = "true"
    return subprocess.run(
        [sys.executable, "-c", SCRIPT.format(ending=ending)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_a_task_that_succeeded_leaves_without_the_teardown_with_its_output():
    done = _task("")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "work done\n"  # flushed, and no normal teardown


@pytest.mark.parametrize(
    "ending, status",
    [("raise RuntimeError('the step failed')", 1), ("sys.exit(3)", 3)],
)
def test_a_task_that_failed_or_exited_leaves_the_normal_way(ending, status):
    done = _task(ending)
    assert done.returncode == status
    assert done.stdout == "work done\nnormal teardown\n"
    if status == 1:
        assert "RuntimeError: the step failed" in done.stderr


def test_outside_a_kfp_task_nothing_changes():
    done = _task("", kfp_runtime=False)
    assert done.returncode == 0
    assert done.stdout == "work done\nnormal teardown\n"

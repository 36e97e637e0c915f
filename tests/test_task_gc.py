"""A KFP task's process, and a fresh `fedmedclip` process, collect no garbage while they import
(fedmedclip/startup.py, components/__init__.py): in a task the collector is paused when the components are
imported, and a task resuming it afterwards has everything imported so far frozen out of the collector's sight;
outside a KFP task nothing changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import gc, json, sys
import components.kfp_components
from fedmedclip.startup import resume_collection
paused = not gc.isenabled()
resume_collection()
print(json.dumps({"paused": paused, "enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}))
sys.stdout.flush()
"""


def _task(kfp_runtime: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("_KFP_RUNTIME", None)
    if kfp_runtime:
        env["_KFP_RUNTIME"] = "true"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    return json.loads(done.stdout)


def test_a_task_imports_without_the_collector_then_resumes_it_with_its_imports_frozen():
    got = _task(kfp_runtime=True)
    assert got["paused"] and got["enabled"]
    assert got["frozen"] > 10_000  # kfp and the components' imports, never walked again


def test_outside_a_kfp_task_nothing_changes():
    assert _task(kfp_runtime=False) == {"paused": False, "enabled": True, "frozen": 0}


CLI_SCRIPT = """
import gc, json, sys
from fedmedclip.cli import main
main(["methods"])
print(json.dumps({"enabled": gc.isenabled(), "frozen": gc.get_freeze_count(), "torch": "torch" in sys.modules}))
"""


def test_a_fresh_cli_process_parses_without_the_collector_then_runs_with_it():
    """`fedmedclip`'s parser imports torch and the methods (fedmedclip/startup.py): a fresh process does so with
    the collector paused, and the command runs with it back on and those imports frozen."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", CLI_SCRIPT], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["torch"] and got["enabled"] and got["frozen"] > 10_000


def test_a_process_that_has_imported_torch_is_left_alone(capsys):
    """A process calling the CLI in-process after importing torch (this test's) gains nothing from a pause, and
    none of its objects is frozen."""
    import gc

    import torch  # noqa: F401

    from fedmedclip.cli import main

    frozen = gc.get_freeze_count()
    assert main(["methods"]) == 0
    # Not `==`: objects tests/conftest.py froze after collection may be freed meanwhile, which lowers the count;
    # a freeze by the CLI would raise it by tens of thousands.
    assert gc.isenabled() and gc.get_freeze_count() <= frozen

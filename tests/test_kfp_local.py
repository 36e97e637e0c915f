"""kfp.local as the federation needs it, with the pinned kfp: every ParallelFor iteration runs at once under
`pipelines/_kfp_local.py` (the server worker and the site workers wait for one another), and a compile-size harness
for pipelines whose graph must not grow with sites and rounds.

`assert_same_yaml_for_every_size` is the harness the federation pipeline's test uses:

    from test_kfp_local import assert_same_yaml_for_every_size
    assert_same_yaml_for_every_size(lambda sites, rounds: build_pipeline(...), tmp_path)
"""

# No `from __future__ import annotations`: kfp reads the components' annotations as types.
import builtins
import difflib
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl

from fedmedclip.errors import FedMedClipError
from pipelines._kfp_local import (
    KFP_LOCAL_ITERATION_CAP,
    PINNED_VERSION,
    check_local_orchestrator,
    parallel_for_runs_all_iterations,
)
from pipelines.local import _last_exception, run_compiled

# ------------------------------------------------------------------------------ compile-size harness

MAX_PIPELINE_YAML_BYTES = 200_000  # Argo keeps a Workflow in etcd (1.5 MiB by default): stay far below
SIZES = ((3, 3), (3, 50), (10, 3), (10, 100), (50, 100))  # (sites, rounds)


def compile_yaml(pipeline_func, path: Path) -> bytes:
    compiler.Compiler().compile(pipeline_func, str(path))
    return path.read_bytes()


def assert_same_yaml_for_every_size(
    build: Callable[[int, int], object],
    tmp_path: Path,
    sizes: Iterable[tuple[int, int]] = SIZES,
    max_bytes: int = MAX_PIPELINE_YAML_BYTES,
) -> int:
    """Compile `build(sites, rounds)` for each size; fail unless every YAML is byte-identical (sites and
    rounds are run-time parameters, not graph) and under `max_bytes`. Returns the YAML's size in bytes."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    compiled = {
        size: compile_yaml(build(*size), tmp_path / f"pipeline-{size[0]}x{size[1]}.yaml") for size in sizes
    }
    (first, reference), *rest = compiled.items()
    for size, text in rest:
        if text != reference:
            diff = difflib.unified_diff(
                reference.decode().splitlines(),
                text.decode().splitlines(),
                f"{first[0]} sites x {first[1]} rounds",
                f"{size[0]} sites x {size[1]} rounds",
                lineterm="",
                n=1,
            )
            head = "\n".join(list(diff)[:40])
            raise AssertionError(
                f"the compiled pipeline depends on its size: {first[0]} sites x {first[1]} rounds gives "
                f"{len(reference)} bytes, {size[0]} sites x {size[1]} rounds {len(text)} bytes:\n{head}"
            )
    if len(reference) >= max_bytes:
        raise AssertionError(
            f"the compiled pipeline is {len(reference)} bytes, over the {max_bytes} bytes allowed"
        )
    return len(reference)


# -------------------------------------------------------------------------------------- toy pipelines


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
def rendezvous(role: str, party: str, n_workers: int, meeting_dir: str, timeout_s: float) -> int:
    """A federation worker in miniature: it cannot finish until every worker of the run has started."""
    import time
    from pathlib import Path

    meeting = Path(meeting_dir)
    meeting.mkdir(parents=True, exist_ok=True)
    (meeting / f"arrived-{role}-{party}").write_text("")
    deadline = time.monotonic() + timeout_s
    while (arrived := len(list(meeting.glob("arrived-*")))) < n_workers:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{role} {party}: only {arrived} of {n_workers} workers running after {timeout_s} s"
            )
        time.sleep(0.05)
    return arrived


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
def summarise(meeting_dir: str) -> int:
    from pathlib import Path

    return len(list(Path(meeting_dir).glob("arrived-*")))


@dsl.pipeline(name="meeting")
def meeting_pipeline(workers: list, n_workers: int, meeting_dir: str, timeout_s: float) -> int:
    """The shape of the federation: one ParallelFor over the server and the sites (run-time items)."""
    with dsl.ParallelFor(workers) as worker:
        met = rendezvous(
            role=worker.role,
            party=worker.party,
            n_workers=n_workers,
            meeting_dir=meeting_dir,
            timeout_s=timeout_s,
        )
    # What comes after the loop waits for it with .after() (dsl.Collected of a task inside dsl.If within the
    # loop does not compile with kfp 2.17; .after() does).
    return summarise(meeting_dir=meeting_dir).after(met).output


def workers(n_sites: int) -> list[dict]:
    # Not `name`: a loop item's `.name` is the loop argument's own name, not the item's field.
    return [{"role": "server", "party": "server"}] + [
        {"role": "site", "party": f"site_{k}"} for k in range(n_sites)
    ]


@pytest.fixture(scope="module")
def meeting_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kfp") / "meeting.yaml"
    compile_yaml(meeting_pipeline, path)
    return path


# --------------------------------------------------------------------------------------------- tests


def test_the_pinned_kfp_local_orchestrator_is_the_one_we_patch():
    """Fails when kfp changes underneath (pipelines/_kfp_local.py lists what it works around): the pin, the
    cap we lift, and how the orchestrator creates it."""
    from importlib.metadata import version

    from kfp.local.orchestrator import enhanced_dag_orchestrator as orchestrator

    assert version("kfp") == PINNED_VERSION == "2.17.0"
    assert check_local_orchestrator() is orchestrator
    capped = orchestrator.ParallelExecutor
    assert (capped().conservative_max, capped(max_workers=8).max_workers) == (KFP_LOCAL_ITERATION_CAP,) * 2
    with parallel_for_runs_all_iterations():
        lifted = orchestrator.ParallelExecutor()
        assert lifted.conservative_max > 1000 and lifted.max_workers > 1000
        assert orchestrator.ParallelExecutor(max_workers=3).max_workers == 3  # an explicit bound still holds
        with parallel_for_runs_all_iterations():  # nested: no double patch
            assert orchestrator.ParallelExecutor().conservative_max == lifted.conservative_max
        assert orchestrator.ParallelExecutor is type(lifted)
    # Confined to the block: outside it kfp.local is as shipped.
    assert orchestrator.ParallelExecutor is capped and capped().conservative_max == KFP_LOCAL_ITERATION_CAP


def test_every_worker_of_a_parallel_for_runs_at_once(meeting_yaml, tmp_path):
    """A server and four sites that each wait until all five have started: they finish only if all run at
    the same time (two at a time, the first two would wait for ever)."""
    meeting = tmp_path / "meeting"
    plain_print, root_handlers = builtins.print, logging.getLogger().handlers[:]
    done = run_compiled(
        meeting_yaml,
        tmp_path / "root",
        log_path=tmp_path / "pipeline.log",
        workers=workers(4),
        n_workers=5,
        meeting_dir=str(meeting),
        timeout_s=120.0,
    )
    assert done.task.output == 5
    # kfp.local's per-task swaps of print and of the root logger's handlers do not outlive the run.
    assert builtins.print is plain_print and logging.getLogger().handlers == root_handlers
    assert sorted(p.name for p in meeting.iterdir()) == [
        "arrived-server-server",
        *[f"arrived-site-site_{k}" for k in range(4)],
    ]


def test_without_the_lift_kfp_local_runs_two_iterations_at_a_time(meeting_yaml, tmp_path, capfd, monkeypatch):
    """The cap the lift exists for, on the pinned kfp: of three workers that wait for one another, the first
    two never see the third (it cannot start before one of them ends), so they time out. When this test
    fails, kfp.local runs loops concurrently by itself and the lift can go."""
    from kfp import components, local

    # Plain kfp.local may leave its per-task swaps of print and of the root logger behind.
    root = logging.getLogger()
    monkeypatch.setattr(builtins, "print", builtins.print)
    monkeypatch.setattr(root, "handlers", root.handlers[:])
    monkeypatch.setattr(root, "level", root.level)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "root"),
        raise_on_error=True,
    )
    pipeline = components.load_component_from_file(str(meeting_yaml))
    with pytest.raises(RuntimeError, match="FAILURE"):
        pipeline(workers=workers(2), n_workers=3, meeting_dir=str(tmp_path / "meeting"), timeout_s=3.0)
    assert re.search(r"only [12] of 3 workers running after 3.0 s", capfd.readouterr().out)


def test_run_compiled_reports_a_failed_worker(meeting_yaml, tmp_path):
    """One line: the failed task and the error it raised, not kfp's colours or the task's traceback."""
    with pytest.raises(FedMedClipError) as failure:
        run_compiled(
            meeting_yaml,
            tmp_path / "root",
            log_path=tmp_path / "pipeline.log",
            workers=workers(1),
            n_workers=3,  # one worker more than the loop has: nobody can meet
            meeting_dir=str(tmp_path / "meeting"),
            timeout_s=1.0,
        )
    message = str(failure.value)
    assert re.fullmatch(
        r"the local pipeline run failed: Pipeline 'meeting' finished with status FAILURE\. Inner task failed: .*\. "
        r"It raised RuntimeError: .*only [12] of 3 workers running after 1\.0 s; task logs: \S+pipeline\.log",
        message,
    ), message
    assert re.search(r"only [12] of 3 workers running", (tmp_path / "pipeline.log").read_text())


def test_the_failed_tasks_error_is_found_in_interleaved_task_output():
    """The two iterations of a loop stream their output at once: one traceback indented, the other's last
    lines after kfp.local's own summary line (a loaded machine, 2026-12-07); the last error line is read."""
    log = [
        "03:19:34.912 - INFO - Executing task 'rendezvous'",
        "                    Traceback (most recent call last):",
        '                      File "executor.py", line 453, in execute',
        "                    RuntimeError: server server: only 2 of 3 workers running after 1.0 s",
        "                    Traceback (most recent call last):",
        "                        executor_main()",
        "03:19:35.026 - ERROR - Task 'rendezvous' finished with status FAILURE",
        "-" * 80,
        "    raise RuntimeError(",
        "RuntimeError: site site_0: only 2 of 3 workers running after 1.0 s",
        "03:19:35.049 - INFO - Skipping task summarise: upstream task(s) ['for-loop-1'] failed.",
    ]
    assert _last_exception(log) == "RuntimeError: site site_0: only 2 of 3 workers running after 1.0 s"
    assert _last_exception(log[:6]) == "RuntimeError: server server: only 2 of 3 workers running after 1.0 s"
    assert _last_exception(["    fedmedclip.errors.FedMedClipError: no data"]) == ""  # no traceback before it
    traceback = ["Traceback (most recent call last):", "  fedmedclip.errors.FedMedClipError: x"]
    assert _last_exception(traceback) == "FedMedClipError: x"


def test_compile_size_harness(tmp_path):
    """The run-time-parameter pipeline compiles to one YAML for every size; an unrolled one is caught."""
    size = assert_same_yaml_for_every_size(lambda sites, rounds: meeting_pipeline, tmp_path)
    assert 0 < size < MAX_PIPELINE_YAML_BYTES

    def unrolled(sites: int, rounds: int):
        @dsl.pipeline(name="meeting")
        def pipeline(meeting_dir: str):
            for k in range(sites):
                rendezvous(
                    role="site", party=f"site_{k}", n_workers=sites, meeting_dir=meeting_dir, timeout_s=1.0
                )

        return pipeline

    with pytest.raises(
        AssertionError, match=r"depends on its size: 3 sites x 3 rounds gives \d+ bytes, 10 sites"
    ):
        assert_same_yaml_for_every_size(unrolled, tmp_path / "unrolled", sizes=((3, 3), (3, 50), (10, 3)))
    with pytest.raises(AssertionError, match=rf"is {size} bytes, over the 1000 bytes allowed"):
        assert_same_yaml_for_every_size(lambda s, r: meeting_pipeline, tmp_path / "small", max_bytes=1000)
    # The compiled loop takes its items at run time.
    spec = next(yaml.safe_load_all((tmp_path / "pipeline-3x3.yaml").read_text()))
    loop = next(t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t)
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--workers"}


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
def count_one(role: str) -> int:
    return 1


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
def add_up(values: list) -> int:
    return sum(values)


def test_collecting_from_a_branch_inside_the_loop_needs_after(tmp_path):
    """kfp 2.17's compiler, as the federation pipeline must use it: within a ParallelFor whose body branches
    (dsl.If / dsl.Else: server or site), dsl.Collected over a branch's task does not compile; depending on
    the loop's tasks with .after() does. When the first half fails, kfp fixed it and Collected can be used."""

    def branching(collect: bool):
        @dsl.pipeline(name="branching")
        def pipeline(workers: list):
            with dsl.ParallelFor(workers) as worker:
                with dsl.If(worker.role == "site"):
                    site = count_one(role=worker.role)
                with dsl.Else():
                    server = count_one(role=worker.role)
            if collect:
                add_up(values=dsl.Collected(site.output))
            else:
                add_up(values=[1]).after(site, server)

        return pipeline

    with pytest.raises(AttributeError, match="'PipelineParameterChannel' object has no attribute 'channels'"):
        compile_yaml(branching(collect=True), tmp_path / "collected.yaml")
    spec = next(yaml.safe_load_all(compile_yaml(branching(collect=False), tmp_path / "after.yaml")))
    assert spec["root"]["dag"]["tasks"]["add-up"]["dependentTasks"] == ["for-loop-1"]

"""kfp.local, as the pinned kfp (PINNED_VERSION) ships it, made fit for the federation: where its shortcomings
are worked around, and only here (tests/test_kfp_local.py fails if the pinned version changes underneath).

- Concurrency. On Argo every iteration of a `dsl.ParallelFor` runs at once (unless the loop sets
  `parallelism`). kfp.local 2.17 does not: it runs at most `ParallelExecutor.conservative_max` = 2 iterations
  at a time whatever the loop says (kfp/local/orchestrator/enhanced_dag_orchestrator.py). The federation runs
  its server and every site as the iterations of one ParallelFor, and they wait for one another: two at a
  time, they would never finish. `parallel_for_runs_all_iterations` lifts that cap for the duration of a run,
  after `check_local_orchestrator` has checked that the installed kfp still has the structure the lift relies
  on; a kfp that changed fails there with a message instead of hanging.
- kfp.local swaps builtins.print and the root logger's handlers for each task and restores what it found;
  overlapping tasks restore each other's swaps (`process_state_restored` puts the process back).
- Its "Cleaned up" message is logged after its own handler is gone (`not_kfp_cleanup` filters it), and it
  logs every loop item it selects at INFO on the root logger (`kfp_chatter_off` keeps that off the console).
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import logging
import os
import sys

from fedmedclip.errors import FedMedClipError

PINNED_VERSION = "2.17.0"

# kfp.local's cap on concurrent ParallelFor iterations, as measured on the pinned kfp (2.17.0).
KFP_LOCAL_ITERATION_CAP = 2


class LocalOrchestratorChanged(FedMedClipError):
    """The installed kfp's local orchestrator is not the one `parallel_for_runs_all_iterations` was written for."""


def check_local_orchestrator():
    """The kfp.local structure that lifting the iteration cap relies on; returns the orchestrator module.

    - `ParallelExecutor()` (no arguments) caps iterations at `conservative_max` and `max_workers`;
    - `execute_parallel_tasks` bounds its thread pool by `self.conservative_max`;
    - `run_enhanced_dag` looks `ParallelExecutor` up in its module when it runs a DAG (so replacing the
      module's name for the duration of a run reaches it)."""
    import kfp
    from kfp.local.orchestrator import enhanced_dag_orchestrator as orchestrator

    problems = []
    executor_class = getattr(orchestrator, "ParallelExecutor", None)
    if executor_class is None:
        problems.append("it has no ParallelExecutor")
    else:
        executor = executor_class()
        caps = (getattr(executor, "conservative_max", None), getattr(executor, "max_workers", None))
        if caps != (KFP_LOCAL_ITERATION_CAP, KFP_LOCAL_ITERATION_CAP):
            problems.append(f"ParallelExecutor() caps (conservative_max, max_workers) are {caps}")
        try:
            pool_source = inspect.getsource(executor_class.execute_parallel_tasks)
            dag_source = inspect.getsource(orchestrator.run_enhanced_dag)
        except (AttributeError, OSError, TypeError) as e:
            problems.append(f"its source cannot be read ({e})")
        else:
            if "self.conservative_max" not in pool_source:
                problems.append("execute_parallel_tasks no longer bounds its pool by self.conservative_max")
            if "ParallelExecutor()" not in dag_source:
                problems.append("run_enhanced_dag no longer creates ParallelExecutor()")
    if problems:
        raise LocalOrchestratorChanged(
            f"kfp {kfp.__version__}: the local orchestrator changed ({'; '.join(problems)}); "
            f"pipelines/_kfp_local.py (parallel_for_runs_all_iterations) was written for kfp {PINNED_VERSION} and "
            "must be "
            "reviewed before the federation's workers can run together locally"
        )
    return orchestrator


@contextlib.contextmanager
def parallel_for_runs_all_iterations():
    """Within the block, kfp.local runs all iterations of a ParallelFor at once, as Argo does (a loop's
    `parallelism`, when set, still bounds them). Only the executor class the orchestrator instantiates is
    swapped, and it is put back on exit."""
    from kfp.local.orchestrator import enhanced_dag_orchestrator

    if getattr(enhanced_dag_orchestrator.ParallelExecutor, "lifted_by_fedmedclip", False):
        yield  # an enclosing block already lifted it
        return
    orchestrator = check_local_orchestrator()
    capped = orchestrator.ParallelExecutor

    class AllIterationsExecutor(capped):
        lifted_by_fedmedclip = True

        def __init__(self, max_workers: int | None = None):
            super().__init__(max_workers)
            # The thread pool starts threads only for the iterations it is given: as many as the loop has.
            self.conservative_max = sys.maxsize
            self.max_workers = sys.maxsize if max_workers is None else max_workers

    orchestrator.ParallelExecutor = AllIterationsExecutor
    try:
        yield
    finally:
        orchestrator.ParallelExecutor = capped


@contextlib.contextmanager
def process_state_restored():
    """kfp.local swaps builtins.print (to indent a task's output) and the root logger's handlers and level
    for the duration of each task, and restores what it found. Tasks that overlap restore each other's swaps,
    which can leave print indenting and the root logger writing to stdout for the rest of the process."""
    root = logging.getLogger()
    saved_print, saved_handlers, saved_level = builtins.print, root.handlers[:], root.level
    try:
        yield
    finally:
        builtins.print = saved_print
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def not_kfp_cleanup(record: logging.LogRecord) -> bool:
    # The one kfp.local message logged after its own handler is gone, so it would reach the console.
    return not (f"{os.sep}kfp{os.sep}" in record.pathname and record.getMessage().startswith("Cleaned up"))


@contextlib.contextmanager
def kfp_chatter_off(active: bool):
    """kfp.local logs every loop item it selects at INFO on the root logger, whose console handler our CLI set
    up: keep kfp's records below WARNING off the console (they are in the task log)."""
    if not active:
        yield
        return
    marker = f"{os.sep}kfp{os.sep}"

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or marker not in record.pathname

    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(keep)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(keep)

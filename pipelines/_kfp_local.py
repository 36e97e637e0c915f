"""kfp.local, as the pinned kfp (PINNED_VERSION) ships it, made fit for the federation: every workaround of its
shortcomings is here, and only here (tests/test_kfp_local.py fails if the pinned version changes underneath).
Its ParallelFor runs 2 iterations at a time where Argo runs them all, and the federation's server and sites are
one loop's iterations waiting for one another; each task swaps print and the root logger's handlers; it logs
after its own handler is gone, and every loop item at INFO on the root logger.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import logging
import os
import sys
import warnings

from fedmedclip.errors import FedMedClipError

PINNED_VERSION = "2.17.0"
KFP_LOCAL_ITERATION_CAP = 2  # kfp.local's cap on concurrent ParallelFor iterations in the pinned kfp
_KFP_SOURCE = f"{os.sep}kfp{os.sep}"  # in the path of every record kfp itself logs


class LocalOrchestratorChanged(FedMedClipError):
    """The installed kfp's local orchestrator is not the one `parallel_for_runs_all_iterations` was written for."""


def check_local_orchestrator():
    """The orchestrator module, once checked to have what lifting the cap relies on (a kfp that changed fails
    here with a message instead of hanging): `ParallelExecutor()` caps iterations at `conservative_max` and
    `max_workers`, its pool is bounded by `self.conservative_max`, and `run_enhanced_dag` looks the class up in
    its module on each run (so replacing the module's name for a run reaches it)."""
    import kfp
    from kfp.local.orchestrator import enhanced_dag_orchestrator as orchestrator

    problems = []
    executor_class = getattr(orchestrator, "ParallelExecutor", None)
    try:
        executor = executor_class()
        caps = (getattr(executor, "conservative_max", None), getattr(executor, "max_workers", None))
        if caps != (KFP_LOCAL_ITERATION_CAP, KFP_LOCAL_ITERATION_CAP):
            problems.append(f"ParallelExecutor() caps (conservative_max, max_workers) are {caps}")
        if "self.conservative_max" not in inspect.getsource(executor_class.execute_parallel_tasks):
            problems.append("execute_parallel_tasks no longer bounds its pool by self.conservative_max")
        if "ParallelExecutor()" not in inspect.getsource(orchestrator.run_enhanced_dag):
            problems.append("run_enhanced_dag no longer creates ParallelExecutor()")
    except (AttributeError, OSError, TypeError) as e:  # no ParallelExecutor, or its source cannot be read
        problems.append(f"its structure cannot be read ({e})")
    if problems:
        raise LocalOrchestratorChanged(
            f"kfp {kfp.__version__}: the local orchestrator changed ({'; '.join(problems)}); "
            f"pipelines/_kfp_local.py (parallel_for_runs_all_iterations) was written for kfp {PINNED_VERSION} and "
            "must be reviewed before the federation's workers can run together locally"
        )
    return orchestrator


@contextlib.contextmanager
def parallel_for_runs_all_iterations():
    """Within the block, kfp.local runs all iterations of a ParallelFor at once (a loop's `parallelism`, when
    set, still bounds them): the executor class the orchestrator instantiates is swapped for the block."""
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
def local_session(pipeline_root):
    """kfp.local for the block, with the SubprocessRunner (each task a subprocess of this Python, no Docker) and
    its artifacts under `pipeline_root`, every ParallelFor iteration at once; afterwards builtins.print and the
    root logger's handlers and level as they were (kfp.local's tasks that overlap can leave print indenting and
    the root logger writing to stdout for the rest of the process)."""
    from kfp import local

    root = logging.getLogger()
    saved_print, saved_handlers, saved_level = builtins.print, root.handlers[:], root.level
    try:
        with parallel_for_runs_all_iterations(), warnings.catch_warnings():
            # Our image's packages are this Python's: kfp's warning about the components' base image is moot.
            warnings.filterwarnings("ignore", message=".*base image")
            local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
            yield local
    finally:
        builtins.print = saved_print
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


@contextlib.contextmanager
def kfp_chatter_off():
    """kfp's records below WARNING stay off the root logger's handlers (those of our CLI, or a test's): the
    loop items it logs at INFO, and what it logs after its own handler is gone ("Cleaned up")."""
    handlers = list(logging.getLogger().handlers)

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _KFP_SOURCE not in record.pathname

    for h in handlers:
        h.addFilter(keep)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(keep)

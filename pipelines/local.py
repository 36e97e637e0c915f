"""Running the pipeline on this machine with kfp.local (SubprocessRunner: each task is a subprocess of
this Python, no Docker, no cluster). It runs the compiled IR YAML itself: the artifact a cluster gets."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from fedmedclip.errors import FedMedClipError

log = logging.getLogger("fedmedclip.pipeline")


@dataclass
class LocalRun:
    run_dir: Path  # the pipeline's run directory (copied to `out` when given)
    model_uri: str  # '' when registration was skipped
    results: dict
    seconds: float
    pipeline_root: Path


def _task_count(pipeline_yaml: Path) -> int:
    import yaml

    spec = next(yaml.safe_load_all(pipeline_yaml.read_text()))
    return len(spec["root"]["dag"]["tasks"])


def _watch_tasks(root: Path, total: int, done: threading.Event, progress: bool) -> None:
    """A progress bar over the pipeline's tasks: a task is finished when its executor output exists."""
    from tqdm.auto import tqdm

    seen: set[Path] = set()
    with tqdm(total=total, desc="pipeline tasks", unit="task", disable=not progress) as bar:
        while True:
            finished = done.wait(0.5)
            new = set(root.glob("*/*/executor_output.json")) - seen
            for path in sorted(new, key=lambda p: p.stat().st_mtime):
                seen.add(path)
                bar.set_postfix_str(path.parent.name, refresh=False)
                bar.update(1)
            if finished:
                return


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _not_kfp_cleanup(record: logging.LogRecord) -> bool:
    # The one kfp.local message logged after its own handler is gone, so it would reach the console.
    return not (f"{os.sep}kfp{os.sep}" in record.pathname and record.getMessage().startswith("Cleaned up"))


def run_local(
    pipeline_yaml: str | Path,
    pipeline_root: str | Path | None = None,
    out: str | Path | None = None,
    log_path: str | Path | None = None,
    progress: bool = False,
    **params,
) -> LocalRun:
    """Execute a compiled pipeline YAML locally with `params` as pipeline parameters.

    kfp.local streams every task's executor input and output (thousands of lines). With `log_path` they go
    to that file instead, and `progress` shows a bar over the tasks; a failure quotes the log's tail."""
    from kfp import components, local

    pipeline_yaml = Path(pipeline_yaml)
    if not pipeline_yaml.exists():
        raise FedMedClipError(f"no compiled pipeline at {pipeline_yaml}: run `fedmedclip pipeline compile`")
    if out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise FedMedClipError(f"output directory {str(out)!r} is not empty: choose another --out")
    root = Path(pipeline_root or tempfile.mkdtemp(prefix="fedmedclip-kfp-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # Tasks run with this process's working directory; a relative cache or data path would be ambiguous.
    for key in ("cache_dir", "data"):
        if (
            key in params
            and params[key]
            and params[key] != "synthetic"
            and not params[key].startswith("s3://")
        ):
            params[key] = str(Path(params[key]).resolve())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    pipeline = components.load_component_from_file(str(pipeline_yaml))
    t0 = time.perf_counter()
    done = threading.Event()
    watcher = None
    with contextlib.ExitStack() as stack:
        if log_path is not None:
            log_path = Path(log_path)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            # kfp.local's handler and the tasks' streamed output both write to sys.stdout.
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(log_path.open("w"))))
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings(
                "ignore", message=".*(no effect in the current local runner|base image).*"
            )
            watcher = threading.Thread(
                target=_watch_tasks, args=(root, _task_count(pipeline_yaml), done, progress), daemon=True
            )
            watcher.start()
            root_logger = logging.getLogger()
            root_logger.addFilter(_not_kfp_cleanup)
            stack.callback(root_logger.removeFilter, _not_kfp_cleanup)
        try:
            task = pipeline(**params)
        except RuntimeError as e:
            where = (
                f"\n--- last lines of {log_path} ---\n{_tail(log_path)}" if log_path else " (task logs above)"
            )
            raise FedMedClipError(f"the local pipeline run failed: {e}; artifacts in {root}{where}") from e
        finally:
            done.set()
            if watcher is not None:
                watcher.join()
    seconds = time.perf_counter() - t0
    run_dir = Path(task.outputs["run_dir"].path)
    if out is not None:
        shutil.copytree(run_dir, out, dirs_exist_ok=True)
        run_dir = Path(out)
    results = json.loads((run_dir / "results.json").read_text())
    return LocalRun(run_dir, task.outputs["model_uri"], results, seconds, root)

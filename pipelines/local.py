"""Running the pipeline on this machine with kfp.local (SubprocessRunner: each task is a subprocess of
this Python, no Docker, no cluster). It runs the compiled IR YAML itself: the artifact a cluster gets.

Every ParallelFor iteration runs at once, as on Argo (the federation's server and sites wait for one another):
kfp.local's own cap of two is lifted while a run goes on (pipelines/_kfp_local.py, where every kfp.local
workaround lives). tests/test_kfp_local.py proves both the cap and the lift with real kfp.local runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from fedmedclip.errors import FedMedClipError

from ._kfp_local import not_kfp_cleanup, parallel_for_runs_all_iterations, process_state_restored

log = logging.getLogger("fedmedclip.pipeline")


@dataclass
class LocalRun:
    run_dir: Path  # the pipeline's run directory (copied to `out` when given)
    model_uri: str  # '' when registration was skipped
    results: dict
    seconds: float
    pipeline_root: Path
    promotion: str = ""  # the register task's outcome: promoted, refused: <why>, not promoted (<why>)


def _task_count(pipeline_yaml: Path) -> int:
    import yaml

    spec = next(yaml.safe_load_all(pipeline_yaml.read_text()))
    return len(spec["root"]["dag"]["tasks"])


def _watch_tasks(
    root: Path,
    total: int,
    done: threading.Event,
    progress: bool,
    rounds: int = 0,
    rounds_of=None,
) -> None:
    """Progress bars over the pipeline's tasks (a task is finished when its executor output exists) and,
    with `rounds_of` (a reader of the federation server's status in the mailbox, `server_status_reader`),
    over the federated rounds as the server closes them."""
    from tqdm.auto import tqdm

    seen: set[Path] = set()
    with contextlib.ExitStack() as bars:
        bar = bars.enter_context(tqdm(total=total, desc="pipeline tasks", unit="task", disable=not progress))
        round_bar = None
        while True:
            finished = done.wait(0.5)
            new = set(root.glob("*/*/executor_output.json")) - seen
            for path in sorted(new, key=lambda p: p.stat().st_mtime):
                seen.add(path)
                bar.set_postfix_str(path.parent.name, refresh=False)
                bar.update(1)
            status = rounds_of() if rounds_of is not None and rounds and progress else None
            if status:
                if round_bar is None:
                    round_bar = bars.enter_context(tqdm(total=rounds, desc="federated rounds", unit="round"))
                closed = rounds_closed(status, rounds)
                round_bar.set_postfix_str(status_line(status), refresh=False)
                round_bar.update(max(0, closed - round_bar.n))
            if finished:
                return


def rounds_closed(status: dict, rounds: int) -> int:
    """How many rounds the server has closed, from its status (docs/contracts.md: `round` is the round it
    works on; `done` when the run is over)."""
    r = status.get("round")
    if not isinstance(r, int):
        return 0
    return rounds if status.get("state") == "done" else max(0, min(rounds, r - 1))


def status_line(status: dict) -> str:
    text = f"server {status.get('state', '?')}"
    if status.get("best_round") is not None:
        text += f", best round {status['best_round']}"
    return text


def server_status_reader(mailbox: str, local_stack: str = ""):
    """A function returning the federation server's last status (`runs/<run>/status/server.json` in the
    mailbox) of the run the local pipeline started, or None while there is none. The run id is the KFP run's,
    which kfp.local draws itself: the reader takes the run whose manifest appeared after it was made.

    A local directory is read directly; an S3 mailbox with the local stack's admin key (`local_stack`), else
    with the environment's credentials. Progress only: any failure is None."""
    since = time.time() - 1.0
    if not mailbox:
        return None
    found: dict = {}

    if "://" not in mailbox:
        runs = Path(mailbox) / "runs"

        def newest():
            manifests = [m for m in runs.glob("*/manifest.json") if m.stat().st_mtime >= since]
            return max(manifests, key=lambda m: m.stat().st_mtime).parent.name if manifests else None

        def read(run: str):
            path = runs / run / "status" / "server.json"
            return json.loads(path.read_text()) if path.is_file() else None

    elif mailbox.startswith("s3://"):
        bucket, _, prefix = mailbox[len("s3://") :].partition("/")
        prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""

        def client():
            if "client" not in found:
                if local_stack:
                    from devstack.stack import read_state

                    found["client"] = read_state(local_stack).s3_client()
                else:
                    from mlops.s3 import s3_client

                    found["client"] = s3_client()
            return found["client"]

        def newest():
            listed = client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}runs/", Delimiter="/")
            best = None
            for common in listed.get("CommonPrefixes", []):
                key = f"{common['Prefix']}manifest.json"
                try:
                    modified = client().head_object(Bucket=bucket, Key=key)["LastModified"].timestamp()
                except Exception:
                    continue
                if modified >= since and (best is None or modified > best[0]):
                    best = (modified, common["Prefix"][len(prefix) + len("runs/") :].strip("/"))
            return best[1] if best else None

        def read(run: str):
            key = f"{prefix}runs/{run}/status/server.json"
            return json.loads(client().get_object(Bucket=bucket, Key=key)["Body"].read(1 << 20))

    else:
        return None

    def status() -> dict | None:
        try:
            if "run" not in found:
                run = newest()
                if run is None:
                    return None
                found["run"] = run
            got = read(found["run"])
            return got if isinstance(got, dict) else None
        except Exception as exc:  # progress display only
            log.debug("server status not readable yet: %s", exc)
            return None

    return status


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class CompiledRun:
    task: object  # what kfp.local returns for the pipeline: `.outputs` holds its outputs
    pipeline_root: Path
    seconds: float


def run_compiled(
    pipeline_yaml: str | Path,
    pipeline_root: str | Path | None = None,
    log_path: str | Path | None = None,
    progress: bool = False,
    rounds_of=None,
    **params,
) -> CompiledRun:
    """Execute any compiled pipeline YAML with kfp.local, every ParallelFor iteration at once.

    kfp.local streams every task's executor input and output (thousands of lines). With `log_path` they go
    to that file instead, and `progress` shows a bar over the tasks (and over the rounds, read from the
    server's status by `rounds_of`); a failure quotes the log's tail."""
    from kfp import components, local

    pipeline_yaml = Path(pipeline_yaml)
    if not pipeline_yaml.exists():
        raise FedMedClipError(f"no compiled pipeline at {pipeline_yaml}: run `fedmedclip pipeline compile`")
    root = Path(pipeline_root or tempfile.mkdtemp(prefix="fedmedclip-kfp-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    pipeline = components.load_component_from_file(str(pipeline_yaml))
    t0 = time.perf_counter()
    done = threading.Event()
    watcher = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(parallel_for_runs_all_iterations())
        stack.enter_context(process_state_restored())
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
                target=_watch_tasks,
                args=(
                    root,
                    _task_count(pipeline_yaml),
                    done,
                    progress,
                    int(params.get("rounds") or 0),
                    rounds_of,
                ),
                daemon=True,
            )
            watcher.start()
            root_logger = logging.getLogger()
            root_logger.addFilter(not_kfp_cleanup)
            stack.callback(root_logger.removeFilter, not_kfp_cleanup)
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
    return CompiledRun(task, root, time.perf_counter() - t0)


def run_local(
    pipeline_yaml: str | Path,
    pipeline_root: str | Path | None = None,
    out: str | Path | None = None,
    log_path: str | Path | None = None,
    progress: bool = False,
    rounds_of=None,
    **params,
) -> LocalRun:
    """Execute the fedmedclip pipeline's compiled YAML locally with `params` as pipeline parameters; its
    run directory is copied to `out` when given."""
    if out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise FedMedClipError(f"output directory {str(out)!r} is not empty: choose another --out")
    # Tasks run with this process's working directory; a relative cache or data path would be ambiguous.
    settings = params["settings"] = dict(params.get("settings") or {})
    for key in ("cache_dir", "data"):
        value = settings.get(key)
        if value and value != "synthetic" and not value.startswith("s3://"):
            settings[key] = str(Path(value).resolve())
    done = run_compiled(
        pipeline_yaml, pipeline_root, log_path=log_path, progress=progress, rounds_of=rounds_of, **params
    )
    run_dir = Path(done.task.outputs["run_dir"].path)
    if out is not None:
        shutil.copytree(run_dir, out, dirs_exist_ok=True)
        run_dir = Path(out)
    results = json.loads((run_dir / "results.json").read_text())
    outputs = done.task.outputs
    return LocalRun(
        run_dir, outputs["model_uri"], results, done.seconds, done.pipeline_root, outputs.get("promotion", "")
    )

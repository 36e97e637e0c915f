"""Running the pipeline on this machine with kfp.local (SubprocessRunner: each task is a subprocess of this
Python, no Docker, no cluster), from the compiled IR YAML itself: the artifact a cluster gets. Every iteration
of a ParallelFor runs at once, as on Argo (pipelines/_kfp_local.py lifts kfp.local's cap of two)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from fedmedclip.errors import FedMedClipError

from ._kfp_local import kfp_chatter_off, local_session

log = logging.getLogger("fedmedclip.pipeline")


@dataclass
class LocalRun:
    run_dir: Path  # the pipeline's run directory (copied to `out` when given)
    model_uri: str  # '' when registration was skipped
    results: dict
    seconds: float
    pipeline_root: Path
    promotion: str = ""  # the register task's outcome: promoted, refused: <why>, not promoted (<why>)


def _watch_tasks(root: Path, total: int, done: threading.Event, rounds: int, rounds_of) -> None:
    """Progress bars over the tasks (finished: its executor output exists) and the rounds the server closed."""
    from tqdm.auto import tqdm

    seen: set[Path] = set()
    with contextlib.ExitStack() as bars:
        bar = bars.enter_context(tqdm(total=total, desc="pipeline tasks", unit="task"))
        round_bar = None
        while True:
            finished = done.wait(0.5)
            new = set(root.glob("*/*/executor_output.json")) - seen
            for path in sorted(new, key=lambda p: p.stat().st_mtime):
                seen.add(path)
                bar.set_postfix_str(path.parent.name, refresh=False)
                bar.update(1)
            status = rounds_of() if rounds_of is not None and rounds else None
            if status:
                if round_bar is None:
                    round_bar = bars.enter_context(tqdm(total=rounds, desc="federated rounds", unit="round"))
                best = "" if status.best_round is None else f", best round {status.best_round}"
                round_bar.set_postfix_str(f"server {status.state}{best}", refresh=False)
                round_bar.update(max(0, rounds_closed(status, rounds) - round_bar.n))
                # Closed when the server ends: its s/round is then the rounds', not the whole pipeline's.
                if status.state in ("done", "failed"):
                    round_bar.close()
                    rounds_of = None
            if finished:
                return


def rounds_closed(status, rounds: int) -> int:
    """Rounds the server closed, from its status (docs/contracts.md: `round` is the one it works on)."""
    return rounds if status.state == "done" else max(0, min(rounds, status.round - 1))


def server_status_reader(mailbox: str, local_stack: str = ""):
    """A function returning the server's last status (a messages.Status) in the mailbox (a local directory, or
    S3 with the local stack's admin key, else the environment's) for the run whose manifest appeared after it was
    made (kfp.local draws the run id itself), or None while there is none. Progress only: any failure is None."""
    s3 = mailbox.startswith("s3://")
    if not mailbox or ("://" in mailbox and not s3):
        return None
    since, found = time.time() - 1.0, {}

    def started_runs(store) -> dict[str, float]:
        """Each run of the mailbox, with the time its manifest was written."""
        if not s3:
            return {m.parent.name: m.stat().st_mtime for m in Path(mailbox, "runs").glob("*/manifest.json")}
        prefix = f"{store.prefix}/runs/" if store.prefix else "runs/"
        listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=prefix, Delimiter="/")
        runs = {}
        for common in listed.get("CommonPrefixes", []):
            with contextlib.suppress(Exception):  # no manifest (yet)
                head = store.client.head_object(Bucket=store.bucket, Key=f"{common['Prefix']}manifest.json")
                runs[common["Prefix"][len(prefix) :].strip("/")] = head["LastModified"].timestamp()
        return runs

    def status():
        from fedmedclip.federation.mailbox import SERVER, Mailbox
        from fedmedclip.federation.storage import open_store

        try:
            if "store" not in found:
                if s3 and local_stack:
                    from devstack.stack import read_state
                    from mlops.s3 import S3Store

                    found["store"] = S3Store(mailbox, read_state(local_stack).s3_client())
                else:
                    found["store"] = open_store(mailbox)
            if "run" not in found:
                runs = {run: t for run, t in started_runs(found["store"]).items() if t >= since}
                if not runs:
                    return None
                found["run"] = Mailbox(found["store"], max(runs, key=runs.get))
            return found["run"].status(SERVER)  # read as declared, or None
        except Exception as exc:  # progress display only
            log.debug("server status not readable yet: %s", exc)
            return None

    return status


def load_pipeline(pipeline_yaml: str | Path, params=()):
    """The compiled pipeline in `pipeline_yaml` as kfp loads it, taking every parameter named in `params`; else
    a FedMedClipError in one line naming --yaml, the file and why (no such file, not YAML, not a compiled
    pipeline, another pipeline's parameters), before anything runs."""
    from kfp import components

    path = Path(pipeline_yaml)
    if not path.is_file():
        why = "it is a directory" if path.is_dir() else "no such file"
        raise FedMedClipError(
            f"--yaml {path}: {why}; give a YAML from `fedmedclip pipeline compile --out FILE.yaml`"
        )
    # kfp and yaml raise many kinds on what is no compiled pipeline: AttributeError, KeyError, YAMLError, ...
    try:
        pipeline = components.load_component_from_file(str(path))
        inputs = set(pipeline.component_spec.inputs or {})
    except Exception as exc:
        mark = getattr(exc, "problem_mark", None)  # YAML's own: what is wrong, and where
        detail = " ".join(str(getattr(exc, "problem", None) or exc).split())
        if mark is not None:
            detail += f" at line {mark.line + 1}, column {mark.column + 1}"
        why = f"{type(exc).__name__}: {detail[:160]}" if detail else type(exc).__name__
        raise FedMedClipError(
            f"--yaml {path}: not a compiled pipeline YAML ({why}); give one from `fedmedclip pipeline compile`"
        ) from None
    unknown = sorted(set(params) - inputs)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise FedMedClipError(
            f"--yaml {path}: this pipeline has no parameter {', '.join(unknown[:3])}{more} (compiled from "
            "another pipeline?); give one from `fedmedclip pipeline compile`"
        )
    return pipeline


@dataclass
class CompiledRun:
    task: object  # what kfp.local returns for the pipeline: `.outputs` holds its outputs
    pipeline_root: Path
    seconds: float


def run_compiled(
    pipeline_yaml: str | Path,
    pipeline_root: str | Path,
    log_path: str | Path | None = None,
    progress: bool = False,
    rounds_of=None,
    **params,
) -> CompiledRun:
    """Execute any compiled pipeline YAML with kfp.local, every ParallelFor iteration at once. With `log_path`,
    what kfp.local streams (every task's executor input and output) goes to that file, not to the console, a
    failure quotes its tail, and `progress` shows bars over the tasks and over the rounds (the server's status,
    read by `rounds_of`)."""
    pipeline = load_pipeline(pipeline_yaml, params)
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(local_session(root))
        if log_path is not None:
            log_path = Path(log_path)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            # kfp.local's handler and the tasks' streamed output both write to sys.stdout.
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(log_path.open("w"))))
            warnings.filterwarnings("ignore", message=".*no effect in the current local runner")
            stack.enter_context(kfp_chatter_off())  # it is in the log: off the console
        if log_path is not None and progress:
            # The parties' loop writes no executor output of its own (its workers' rounds have their own bar).
            tasks = pipeline.pipeline_spec.root.dag.tasks.values()  # the YAML as kfp loaded it
            total = sum(not t.HasField("parameter_iterator") for t in tasks)
            rounds = int((params.get("settings") or {}).get("rounds") or 0)
            done = threading.Event()
            args = (root, total, done, rounds, rounds_of)
            watcher = threading.Thread(target=_watch_tasks, args=args, daemon=True)
            watcher.start()
            # Last in, first out: `done` is set, then the watcher's last update joined, before the log closes.
            stack.callback(watcher.join)
            stack.callback(done.set)
        try:
            task = pipeline(**params)
        except RuntimeError as e:
            reason, where = _ANSI.sub("", str(e)), ""
            if log_path is not None:
                lines = _ANSI.sub("", log_path.read_text(errors="replace")).splitlines()
                raised = _last_exception(lines)
                if raised:  # the task's own error is the line to read; its traceback stays in the log
                    raise FedMedClipError(
                        f"the local pipeline run failed: {reason} It raised {raised}; task logs: {log_path}"
                    ) from e
                where = f"\n--- last lines of {log_path} ---\n" + "\n".join(lines[-40:])
            raise FedMedClipError(
                f"the local pipeline run failed: {reason}; artifacts in {root}{where}"
            ) from e
    return CompiledRun(task, root, time.perf_counter() - t0)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # kfp.local colours task and status names


def _last_exception(lines: list[str]) -> str:
    """`Type: message` of the last exception line after a traceback in a task log, the type without its
    module; '' when the log holds none. Any indentation: kfp.local streams a task's output indented, and the
    iterations of a loop run at once, so two tasks' tracebacks can interleave line by line."""
    starts = [i for i, line in enumerate(lines) if line.strip() == "Traceback (most recent call last):"]
    for line in reversed(lines[starts[0] + 1 :] if starts else []):
        if found := _EXCEPTION_LINE.fullmatch(line.strip()):
            return found[1] + (found[2] or "")
    return ""


_EXCEPTION_LINE = re.compile(r"(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt))(: .*)?")


def absolute_location(value: str) -> str:
    """A local path made absolute; synthetic data and URLs as they are."""
    from fedmedclip.config import SYNTHETIC
    from fedmedclip.sources import is_remote

    return value if value == SYNTHETIC or is_remote(value) else str(Path(value).resolve())


def run_local(
    pipeline_yaml: str | Path, pipeline_root: str | Path, out: str | Path | None = None, **params
) -> LocalRun:
    """Execute the fedmedclip pipeline's YAML locally (`params`: run_compiled's options and the pipeline's
    parameters); its run directory copied to `out` if given."""
    if out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise FedMedClipError(f"output directory {str(out)!r} is not empty: choose another --out")
    # Tasks run with this process's working directory; a relative cache or data path would be ambiguous.
    settings = params["settings"] = dict(params.get("settings") or {})
    for key in ("cache_dir", "data"):
        if settings.get(key):
            settings[key] = absolute_location(settings[key])
    done = run_compiled(pipeline_yaml, pipeline_root, **params)
    outputs = done.task.outputs
    run_dir = Path(outputs["run_dir"].path)
    if out is not None:
        run_dir = Path(shutil.copytree(run_dir, out, dirs_exist_ok=True))
    results = json.loads((run_dir / "results.json").read_text())
    return LocalRun(
        run_dir, outputs["model_uri"], results, done.seconds, done.pipeline_root, outputs.get("promotion", "")
    )

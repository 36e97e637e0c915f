"""Running the pipeline on this machine with kfp.local (SubprocessRunner: each task is a subprocess of
this Python, no Docker, no cluster). It runs the compiled IR YAML itself: the artifact a cluster gets."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
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


def run_local(
    pipeline_yaml: str | Path,
    pipeline_root: str | Path | None = None,
    out: str | Path | None = None,
    **params,
) -> LocalRun:
    """Execute a compiled pipeline YAML locally with `params` as pipeline parameters."""
    from kfp import components, local

    if not Path(pipeline_yaml).exists():
        raise FedMedClipError(f"no compiled pipeline at {pipeline_yaml}: run `fedmedclip pipeline compile`")
    if out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise FedMedClipError(f"output directory {str(out)!r} is not empty: choose another --out")
    root = Path(pipeline_root or tempfile.mkdtemp(prefix="fedmedclip-kfp-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # Tasks run with this process's working directory; a relative cache or data path would be ambiguous.
    for key in ("cache_dir", "data"):
        if key in params and params[key] and params[key] != "synthetic":
            params[key] = str(Path(params[key]).resolve())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    pipeline = components.load_component_from_file(str(pipeline_yaml))
    t0 = time.perf_counter()
    try:
        task = pipeline(**params)
    except RuntimeError as e:
        raise FedMedClipError(
            f"the local pipeline run failed: {e} (task logs above; artifacts in {root})"
        ) from e
    seconds = time.perf_counter() - t0
    run_dir = Path(task.outputs["run_dir"].path)
    if out is not None:
        shutil.copytree(run_dir, out, dirs_exist_ok=True)
        run_dir = Path(out)
    results = json.loads((run_dir / "results.json").read_text())
    return LocalRun(run_dir, task.outputs["model_uri"], results, seconds, root)

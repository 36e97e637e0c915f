"""A run directory (docs/contracts.md, "Run directory") read and checked, and logged to MLflow: its files (the
sites' private heads withheld unless asked), its lineage, and, after the fact, the whole run (`log_run_dir`: the
same MLflow run live logging makes, each round at the time the run recorded for it).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from fedmedclip.digests import canonical_digest, model_dir_digest
from fedmedclip.jsonfiles import read_json
from fedmedclip.model_card import dataset_digest, run_files_problem
from fedmedclip.paths import lock_folder
from fedmedclip.privacy.report import privacy_summary

from .tracking import (
    COMPLETE_TAG,
    RUN_KEY_TAG,
    RunDirError,
    _client,
    _flatten,
    _num,
    describe_run,
    git_commit,
    run_parameters,
)

log = logging.getLogger("fedmedclip.tracking")

REQUIRED_FILES = ("results.json", "config.json", "partition.json", "provenance.json")
# A site's private part of the model (FedMedCLIP's MLP): never sent to the central MLflow by default.
SITE_MODEL_GLOB = "site_*.safetensors"


@dataclass
class RunDir:
    path: Path
    config: dict
    results: dict
    partition: dict
    provenance: dict
    model_info: dict

    @property
    def site_names(self) -> list[str]:
        names = self.results.get("site_names") or [
            s["site"] for s in self.results["metrics"].get("sites", [])
        ]
        return [str(n) for n in names]


def _read_json(run_dir: Path, name: str):
    path = run_dir / name
    if not path.is_file():
        raise RunDirError(
            f"{run_dir} is not a complete run directory: {name} is missing "
            f"(expected the output of `fedmedclip train --out {run_dir}`, see docs/contracts.md)"
        )
    try:
        return read_json(path)
    except ValueError as e:
        raise RunDirError(f"{path} is not valid JSON: {e}") from e


def read_run_dir(run_dir: str | Path) -> RunDir:
    """Load and check a run directory; RunDirError names the first missing piece."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"run directory {path} does not exist or is not a directory")
    data = {name: _read_json(path, name) for name in REQUIRED_FILES}
    if not (path / "model").is_dir():
        raise RunDirError(f"{path} is not a complete run directory: model/ is missing")
    model_info = _read_json(path, "model/model.json") if (path / "model" / "model.json").exists() else {}
    problem = run_files_problem(path, {**data, "model/model.json": model_info})
    if problem:
        raise RunDirError(problem)
    try:  # the model's files as export and registration read them: a truncated or damaged one is no model
        model_dir_digest(path / "model")
    except ValueError as e:
        raise RunDirError(str(e)) from None
    results, where = data["results.json"], path / "results.json"
    for key in ("method", "metrics.global.acc", "metrics.global.bacc", "history"):
        node = results
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise RunDirError(
                    f"{where} has no `{key}` (see docs/contracts.md for the results.json format)"
                )
            node = node[part]
    if not isinstance(results["history"], list):
        raise RunDirError(f"{where}: `history` must be a list of per-round records")
    for i, rec in enumerate(results["history"]):
        if not isinstance(rec, dict) or "round" not in rec:
            raise RunDirError(f"{where}: history[{i}] has no `round`")
    partition, provenance = data["partition.json"], data["provenance.json"]
    # Two digests of one partition that disagree mean files from different runs were mixed.
    declared = (results.get("partition") or {}).get("digest")
    if declared and partition.get("digest") and declared != partition["digest"]:
        raise RunDirError(
            f"{path}: results.json names partition {declared[:12]} but partition.json is "
            f"{partition['digest'][:12]}; the run directory mixes files from different runs"
        )
    return RunDir(path, data["config.json"], results, partition, provenance, model_info)


def run_params(run: RunDir) -> dict[str, str]:
    """run_parameters of a run directory: the config, and what results.json resolved."""
    res = run.results
    part, preprocessing = res.get("partition") or {}, res.get("preprocessing")
    options = res.get("method_options")
    params = run_parameters(
        run.config,
        options if isinstance(options, dict) else None,
        preprocessing.get("name") if isinstance(preprocessing, dict) else None,
    )
    # Facts from results.json that a search or comparison wants as params; the config wins on clashes.
    extra = {
        "method": res.get("method"),
        "sites": res.get("sites"),
        "site_names": ",".join(run.site_names) or None,
        "rounds": res.get("rounds"),
        "partition.scheme": part.get("scheme"),
        "partition.alpha": part.get("alpha"),
        "partition.seed": part.get("seed"),
        "comm.codec": (res.get("comm") or {}).get("codec"),
        "metrics.selection": (res.get("metrics") or {}).get("selection"),
        "federation_run_id": res.get("run_id"),
    }
    return {**_flatten({k: v for k, v in extra.items() if v is not None}), **params}


def _log_run_files(client, run_id: str, run_path: Path, include_site_models: bool) -> dict[str, str]:
    """The run directory's files into the run's artifacts (never checkpoint/: resume state only).
    Returns the tag that names the site model files left out, if any."""
    for name in REQUIRED_FILES:
        if (run_path / name).is_file():
            client.log_artifact(run_id, str(run_path / name))
    for d in ("plots", "rounds"):
        if (run_path / d).is_dir():
            client.log_artifacts(run_id, str(run_path / d), artifact_path=d)
    withheld = []
    model_dir = run_path / "model"
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        if f.parent == model_dir and f.match(SITE_MODEL_GLOB) and not include_site_models:
            withheld.append(f.name)
        else:
            client.log_artifact(
                run_id, str(f), artifact_path=(Path("model") / f.parent.relative_to(model_dir)).as_posix()
            )
    if not withheld:
        return {}
    return {"fedmedclip.site_models": "withheld (kept on the sites' own storage): " + ", ".join(withheld)}


def _lineage_tags(run: RunDir, record_path: bool = True) -> dict[str, str]:
    """Registration's lineage; the run directory's path only where it means something to a reader (not a
    pod's temporary directory: `record_path=False`)."""
    backbone = run.results.get("backbone") or run.model_info.get("backbone") or {}
    commit = git_commit(run.results, run.config)
    tags = {
        "method": str(run.results["method"]),
        "partition_digest": str(run.partition.get("digest", "")),
        # Dataset identity: which images (and labels) each holder's feature store was built from.
        "dataset_digest": dataset_digest(run.provenance),
        "backbone": str(backbone.get("name", "unknown")),
        "backbone_sha256": str(backbone.get("weights_sha256", "unknown")),
        "feature_provenance_digest": canonical_digest(
            {h: p.get("digest", "") for h, p in sorted(run.provenance.items())}
        ),
        "git_commit": commit,
        **privacy_summary(run.results),
        "mlflow.source.git.commit": commit,
        "fedmedclip.sites": ",".join(run.site_names),
    }
    if record_path:
        tags["fedmedclip.run_dir"] = str(run.path.resolve())
    return tags


def recorded_times(results: dict) -> tuple[float | None, float | None]:
    """(start, end) of a finished run in unix seconds, from each round's `finished_at` and the run's total
    seconds; (None, None) for a run directory written before rounds had their time. `results` has passed
    read_run_dir: its history is a list of round records."""
    ends = [t for t in (_num(r.get("finished_at")) for r in results["history"]) if t is not None]
    if not ends:
        return None, None
    end = max(ends)
    total = _num((results.get("timing") or {}).get("total_seconds"))
    if total is None:
        first = min(results["history"], key=lambda r: _num(r.get("finished_at")) or end)
        total = (end - min(ends)) + (_num(first.get("seconds")) or 0.0)
    return end - total, end


class LoggedRun(NamedTuple):
    run_id: str
    existing: bool  # logged before (the same results.json to the same experiment): nothing was logged again


def log_run_dir(run_dir: str | Path, experiment: str, tracking_uri: str | None = None, **kwargs) -> str:
    """Log a finished run directory as one MLflow run and return its run id (track_run_dir)."""
    return track_run_dir(run_dir, experiment, tracking_uri, **kwargs).run_id


def _logged_key(run: RunDir, include_site_models: bool, kfp_run_id: str | None) -> str:
    """The MLflow run key of a run directory logged after the fact: its results.json (which records every
    round's time, so another training into the same folder differs), whether the sites' heads went too, and
    the Kubeflow run it belongs to."""
    digest = hashlib.sha256((run.path / "results.json").read_bytes())
    digest.update(f"\0{bool(include_site_models)}\0{kfp_run_id or ''}".encode())
    return f"rundir-{digest.hexdigest()[:32]}"


def _complete_run(tracking_uri: str | None, experiment: str, key: str) -> str | None:
    """The finished, completely logged MLflow run with run key `key` in `experiment`, if there is one."""
    client, _ = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
    done = [r for r in found if r.info.status == "FINISHED" and r.data.tags.get(COMPLETE_TAG) == "complete"]
    return done[0].info.run_id if done else None


def track_run_dir(
    run_dir: str | Path | RunDir,
    experiment: str,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    include_site_models: bool = False,
    kfp_run_id: str | None = None,
    record_run_dir: bool = True,
    source: str = "fedmedclip track",
) -> LoggedRun:
    """Log a finished run directory as one MLflow run: the same parameters, metrics, files and tags as live
    logging, each round at the time the run recorded for it (not now). Keyed on the directory's results: logging
    it again (a retried pipeline task, a second `fedmedclip track`) finds the run it made instead of adding
    one, and an attempt that stopped part-way is continued."""
    # Before touching the server: a bad run dir makes no empty run.
    run = run_dir if isinstance(run_dir, RunDir) else read_run_dir(run_dir)
    from .live import LiveRunLogger

    key = _logged_key(run, include_site_models, kfp_run_id)
    # Find-or-create and the logging, one process at a time: a second `track` waits, then finds this one's run.
    with lock_folder(
        run.path, on_wait=lambda: log.info("%s: waiting for the process writing or logging it", run.path)
    ):
        found = _complete_run(tracking_uri, experiment, key)
        if found is not None:
            log.info(
                "%s is logged already as run %s in experiment %r: nothing logged again",
                run.path,
                found,
                experiment,
            )
            return LoggedRun(found, True)
        logger = LiveRunLogger(
            experiment,
            tracking_uri,
            kfp_run_id=kfp_run_id,
            include_site_models=include_site_models,
            background=False,
            record_run_dir=record_run_dir,
        )
        start, end = recorded_times(run.results)
        part, data = run.results.get("partition") or {}, str(run.config.get("data") or "")
        run_id = logger.start(
            run_params(run),
            tags={
                **_lineage_tags(run, record_run_dir),
                "fedmedclip.times": "recorded" if start is not None else "logging time (none recorded)",
                **(tags or {}),
            },
            run_name=run_name or run.path.resolve().name,
            source=source,
            site_names=run.site_names,
            partition=run.partition,
            data_source=data,
            run_key=key,
            description=describe_run(
                str(run.results["method"]),
                run.site_names,
                run.results.get("rounds"),
                data or str(part.get("source") or "?"),
                part,
                f"Logged from the run directory by `{source}`.",
            ),
            start_time=start,
        )
        with logger:
            logger.log_rounds(run.results["history"])
            logger.finish(run.path, "FINISHED", end_time=end)
        log.info("logged %s as run %s in experiment %r", run.path, run_id, experiment)
        return LoggedRun(run_id, False)

"""Live logging: one MLflow run logged while the federated run goes on (`LiveRunLogger`; `fedmedclip track
RUN_DIR`, mlops/rundir.py, logs a finished directory through it too), and the core's observer over it
(`MlflowObserver`). Tracking never stops the federation: an MLflow that cannot be reached or refuses something
is a warning (the pipeline's register task then logs the run directory after the fact).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import time
import uuid
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from fedmedclip.observer import RunObserver
from fedmedclip.tracking_server import DEFAULT_EXPERIMENT

from ._mlflow import operation_futures
from .rundir import _lineage_tags, _log_run_files, read_run_dir, run_params
from .tracking import (
    COMPLETE_TAG,
    KFP_RUN_ID_TAG,
    RUN_KEY_TAG,
    RunDirError,
    TrackingError,
    _client,
    _flatten,
    _num,
    context_tags,
    describe_run,
    final_metrics,
    get_or_create_experiment,
    is_operational,
    log_dataset_inputs,
    outcome_line,
    round_metrics,
    run_parameters,
)

log = logging.getLogger("fedmedclip.tracking")

# Where `train --track` records which MLflow run it logs to, so that `train --resume` continues that run.
TRACKING_RECORD = "tracking.json"


class MlflowObserver(RunObserver):
    def __init__(
        self,
        cfg,
        run_id: str,
        experiment: str = DEFAULT_EXPERIMENT,
        *,
        tracking_uri: str | None = None,
        kfp_run_id: str | None = None,
        options: dict | None = None,
        run_name: str | None = None,
        source: str = "fedmedclip server run",
        record_run_dir: bool = True,
        key_file: Path | None = None,
    ):
        self.cfg, self.run_id, self.run_key, self.run_dir = cfg, run_id, run_id, Path(cfg.out)
        self.options, self.run_name, self.source = dict(options or {}), run_name or run_id, source
        self.kfp_run_id, self.key_file = kfp_run_id, key_file
        # The MLflow run lasts as long as the command (data preparation and feature extraction included).
        self.created = time.time()
        # The sites' private heads never go to the central MLflow live (`track --include-site-models` may).
        self.logger = LiveRunLogger(
            experiment, tracking_uri, kfp_run_id=kfp_run_id, record_run_dir=record_run_dir
        )
        self.enabled = False  # True once the MLflow run is started; False again if tracking had to stop

    @property
    def tracked_run_id(self) -> str | None:
        return self.logger.run_id if self.enabled else None

    def _recorded_key(self) -> str:
        """`train`'s key: the one its run directory records, else a new one, recorded now (atomically: a torn
        record would make `--resume` start a second MLflow run)."""
        from fedmedclip.federation.records import atomic_write_json

        try:
            return str(json.loads(self.key_file.read_text())["run_key"])
        except (OSError, ValueError, KeyError, TypeError):
            key = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            atomic_write_json(self.key_file, {"run_key": key}, indent=None)
            return key

    def start(self, manifest: dict, resumed: bool = False) -> None:
        from fedmedclip.methods import resolved_options, resolved_preprocessing

        if self.key_file is not None:
            self.run_key = self._recorded_key()
        cfg, kfp = self.cfg, self.kfp_run_id
        names = [s["name"] for s in manifest.get("sites", [])]
        # The server's options are operational (`server.*`): a restart may change them.
        server = {k: v for k, v in self.options.items() if v is not None}
        if manifest.get("quorum") is not None:
            server["quorum"] = manifest["quorum"]  # resolved: every site when none was given
        partition_file = self.run_dir / "partition.json"
        where = (
            f"Kubeflow Pipelines run `{kfp}`: the server's worker logged it live."
            if kfp
            else f"`{self.source}`, logged live as the rounds finished."
        )
        scheme = {"scheme": cfg.partition, "alpha": cfg.alpha, "seed": cfg.seed}
        try:
            params = run_parameters(
                cfg.to_json(),
                resolved_options(cfg),
                resolved_preprocessing(cfg),
                {"federation_run_id": self.run_id, "site_names": ",".join(names), "server": server or None},
            )
            self.logger.start(
                params,
                {"orchestrator": "kubeflow-pipelines" if kfp else "federation-runtime"},
                self.run_name,
                source=self.source,
                source_type="JOB" if kfp else "LOCAL",
                site_names=names,
                partition=json.loads(partition_file.read_text()) if partition_file.is_file() else None,
                data_source=str(cfg.data),
                run_key=self.run_key,
                description=describe_run(cfg.method, names, cfg.rounds, str(cfg.data), scheme, where),
                start_time=self.created,
            )
        except Exception as exc:  # tracking must not stop the federation
            log.warning("live MLflow tracking is off for run %s: %s", self.run_id, exc)
            return
        self.enabled = True
        started = "resumed" if resumed else "started"
        log.info("%s run %s live in MLflow run %s", started, self.run_id, self.logger.run_id)

    def round(self, record: dict) -> None:
        if self.enabled:
            try:
                self.logger.log_round(record)  # queued: never waits for MLflow
            except Exception as exc:
                log.warning(
                    "MLflow: round %s of run %s not logged: %s", record.get("round"), self.run_id, exc
                )

    def finish(self, results: dict | None, error: str | None = None) -> None:
        if not self.enabled:
            return
        if error is not None:
            log.warning("run %s failed; its finished rounds stay in MLflow: %s", self.run_id, error)
        try:
            self.logger.finish(
                self.run_dir if error is None else None, "FINISHED" if error is None else "FAILED"
            )
        except Exception as exc:
            log.warning("MLflow: the end of run %s was not logged: %s", self.run_id, exc)
            if error is None:  # registration needs a completely logged run: let the pipeline log it again
                self.enabled = False


def mlflow_observer(
    cfg, run_id: str | None, experiment: str = DEFAULT_EXPERIMENT, **kwargs
) -> MlflowObserver:
    """The entry point `fedmedclip.observers:mlflow`. `train` passes `run_id=None`: its MLflow run is keyed on
    a key recorded in its run directory (TRACKING_RECORD) on the first start, so `train --resume` continues
    that run and a new run directory never continues an old one."""
    if run_id is None:
        kwargs.setdefault("key_file", Path(cfg.out) / TRACKING_RECORD)
        kwargs.setdefault("run_name", Path(cfg.out).resolve().name)
        kwargs.setdefault("source", "fedmedclip train")
        run_id = "inprocess"
    return MlflowObserver(cfg, run_id, experiment, **kwargs)


@dataclass
class _Batch:
    round: int
    metrics: list
    futures: list | None = None  # MLflow's futures while in flight; None: to be sent (again)


@dataclass(eq=False)
class LiveRunLogger:
    """One MLflow run: `start`, `log_round` per finished round (never waits for MLflow), `finish` (the rounds
    logged stay). As a context manager, an exception ends the run FAILED.

    Rounds go through MLflow's asynchronous logging, which gives a batch up once its HTTP retries fail (an outage
    longer than them): the logger keeps each batch until MLflow has it and sends the failed ones again, at the
    next round and in `flush` (every `retry_seconds`); `finish` flushes for up to two minutes. With
    `background=False` (after-the-fact logging) metrics are sent in the caller's thread and errors raise."""

    experiment: str = DEFAULT_EXPERIMENT
    tracking_uri: str | None = None
    _: KW_ONLY
    kfp_run_id: str | None = None
    include_site_models: bool = False
    background: bool = True
    retry_seconds: float = 5.0
    record_run_dir: bool = True
    # What `start` sets and the run's state:
    run_id: str | None = field(default=None, init=False)
    description: str = field(default="", init=False)
    site_names: list[str] = field(default_factory=list, init=False)
    _client: object = field(default=None, init=False)
    # The parameters logged: MLflow refuses a parameter logged again with another value.
    _param_keys: set[str] = field(default_factory=set, init=False)
    # Each round's metrics, until MLflow has them.
    _batches: list[_Batch] = field(default_factory=list, init=False)
    _last_error: Exception | None = field(default=None, init=False)
    _finished: bool = field(default=False, init=False)

    def start(
        self,
        params: dict,
        tags: dict[str, str] | None = None,
        run_name: str | None = None,
        *,
        source: str = "fedmedclip",
        source_type: str = "LOCAL",
        site_names: list[str] | None = None,
        partition: dict | None = None,
        data_source: str | None = None,
        run_key: str | None = None,
        description: str | None = None,
        start_time: float | None = None,
    ) -> str:
        """Create the MLflow run and log `params` and, with the partition manifest, its inputs; returns its id.
        With `run_key`, a run already logged under that key is continued: its defining parameters must be the
        same; operational ones (`is_operational`) that changed go into a tag."""
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        client, uri = _client(self.tracking_uri)
        exp_id = get_or_create_experiment(client, self.experiment)
        all_tags = {**context_tags(source, source_type), **(tags or {})}
        if description:
            self.description = all_tags["mlflow.note.content"] = description
        if self.kfp_run_id:
            all_tags[KFP_RUN_ID_TAG] = str(self.kfp_run_id)
        existing = None
        if run_key:
            if not re.fullmatch(r"[A-Za-z0-9._-]+", str(run_key)):
                raise TrackingError(f"run key {run_key!r}: use letters, digits, '.', '_' or '-'")
            all_tags[RUN_KEY_TAG] = str(run_key)
            found = client.search_runs([exp_id], f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
            existing = found[0] if found else None
        flat, logged = _flatten(params), existing.data.params if existing is not None else {}
        differ = {k: (logged[k], v) for k, v in flat.items() if logged.get(k, v) != v}
        if existing is not None:
            run_id = existing.info.run_id
            changed = sorted((k, d) for k, d in differ.items() if not is_operational(k))
            if changed:
                raise TrackingError(
                    f"MLflow run {run_id} of {run_key} was started with other parameters ("
                    + "; ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in changed)
                    + "): a run continues only with its own configuration"
                )
            client.update_run(run_id, status="RUNNING")
            log.info("continuing MLflow run %s of %s on %s", run_id, run_key, uri)
            if differ:  # parameters cannot change: the restart's operational settings go into a tag
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                record = {k: {"before": old, "now": new} for k, (old, new) in sorted(differ.items())}
                all_tags[f"fedmedclip.restarted.{stamp}"] = json.dumps(record)[:5000]
        else:
            start_ms = int(start_time * 1000) if start_time is not None else None
            run_id = client.create_run(
                exp_id, run_name=run_name, tags=all_tags, start_time=start_ms
            ).info.run_id
        self._client, self.run_id = client, run_id
        self._param_keys = set(flat) | set(logged)
        self.site_names = [str(s) for s in site_names or []]
        try:  # MLflow splits the batch; the tags only to a continued run (create_run gave a new one its tags)
            params_now = [Param(k, v) for k, v in flat.items() if k not in differ]
            tags_now = [RunTag(k, v) for k, v in all_tags.items()] if existing is not None else []
            client.log_batch(run_id, params=params_now, tags=tags_now)
            if existing is None and partition:
                log_dataset_inputs(client, run_id, partition, data_source or "")
        except BaseException as e:
            client.set_terminated(run_id, "FAILED")
            self._finished = True
            if isinstance(e, MlflowException):
                raise TrackingError(f"MLflow refused the start of run {run_id}: {e.message}") from e
            raise
        log.info("MLflow run %s in experiment %r on %s", run_id, self.experiment, uri)
        return run_id

    def log_round(self, record: dict) -> None:
        """One finished round (a results.json `history` entry), step = its round, stamped now."""
        self.log_rounds([record])

    def log_rounds(self, records: list[dict]) -> None:
        from mlflow.entities import Metric

        if self.run_id is None or self._finished:
            raise TrackingError("log_round needs a started, unfinished run: call start() first")
        now = time.time()
        for rec in records:
            if not isinstance(rec, dict) or not isinstance(rec.get("round"), int):
                raise TrackingError(f"a round record needs an integer `round`, got {str(rec)[:200]}")
            # The round's own time when the record has it (a finished run logged afterwards), else now.
            stamp = int((_num(rec.get("finished_at")) or now) * 1000)
            metrics = [
                Metric(k, v, stamp, rec["round"]) for k, v in round_metrics(rec, self.site_names).items()
            ]
            if self.background:
                self._batches.append(_Batch(rec["round"], metrics))
            else:
                self._client.log_batch(self.run_id, metrics=metrics)
        self._settle(0.0)
        self._send()

    def _send(self) -> None:
        """Hand MLflow's queue every batch not in flight: new ones, and those it gave up."""
        for b in self._batches:
            if b.futures is None:
                b.futures = operation_futures(
                    self._client.log_batch(self.run_id, metrics=b.metrics, synchronous=False)
                )

    def _settle(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the batches in flight: drop those MLflow has, mark those it gave up for
        sending again. True when none is left."""
        concurrent.futures.wait([f for b in self._batches for f in b.futures or []], timeout=timeout)
        for b in [b for b in self._batches if b.futures is not None and all(f.done() for f in b.futures)]:
            error = next((f.exception() for f in b.futures if f.exception() is not None), None)
            if error is None:
                self._batches.remove(b)
                continue
            if self._last_error is None:
                log.warning(
                    "MLflow run %s: round %s not logged yet (%s); sending it again",
                    self.run_id,
                    b.round,
                    error,
                )
            self._last_error, b.futures = error, None
        return not self._batches

    def flush(self, timeout: float = 120.0) -> bool:
        """Wait until every round logged so far is in MLflow (or `timeout` seconds); True when it is."""
        deadline = time.monotonic() + timeout
        while True:
            self._send()
            if self._settle(max(0.0, deadline - time.monotonic())):
                self._last_error = None
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(self.retry_seconds, left))

    @property
    def unsent_rounds(self) -> list[int]:
        return sorted({b.round for b in self._batches})

    def finish(
        self, run_dir: str | Path | None = None, status: str = "FINISHED", end_time: float | None = None
    ) -> None:
        """End the run with `status` (FINISHED, FAILED or KILLED); the rounds logged stay. From `run_dir`: its
        files (the sites' private heads only with `include_site_models`) and final metrics; a FINISHED run
        whose directory is complete gets the lineage tags registration needs, an incomplete one ends FAILED
        and raises RunDirError."""
        from mlflow.entities import Metric, Param, RunTag

        if self._finished:
            return
        self._finished = True
        client, run_id = self._client, self.run_id
        tags: dict[str, str] = {}
        metrics, params = [], []
        if not self.flush():
            tags["fedmedclip.unlogged_rounds"] = missing = ",".join(map(str, self.unsent_rounds))
            log.warning(
                "MLflow run %s: metrics of rounds %s could not be logged (%s)",
                run_id,
                missing,
                self._last_error,
            )
        final_status, problem = status, None
        path = Path(run_dir) if run_dir is not None else None
        try:
            if path is not None and path.is_dir():
                tags.update(_log_run_files(client, run_id, path, self.include_site_models))
                try:
                    results = json.loads((path / "results.json").read_text())
                except (OSError, ValueError):
                    results = None
                if isinstance(results, dict):
                    now = int((end_time or time.time()) * 1000)
                    metrics = [Metric(k, v, now, 0) for k, v in final_metrics(results).items()]
                    if self.description:
                        tags["mlflow.note.content"] = f"{self.description}\n\n{outcome_line(results)}"
            if status == "FINISHED" and path is not None:
                try:  # a directory that is missing or not complete ends the run FAILED
                    run = read_run_dir(path)
                    tags.update(_lineage_tags(run, self.record_run_dir))
                    tags[COMPLETE_TAG] = "complete"
                    # What results.json resolved (run_params, as `fedmedclip track` logs a directory): the
                    # same parameters whether a run was logged live or after the fact.
                    params = [Param(k, v) for k, v in run_params(run).items() if k not in self._param_keys]
                except RunDirError as e:
                    final_status, problem = "FAILED", e
            client.log_batch(run_id, metrics, params, [RunTag(k, v) for k, v in tags.items()])
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(
            run_id, final_status, end_time=int(end_time * 1000) if end_time is not None else None
        )
        if problem is not None:
            raise problem

    def __enter__(self) -> LiveRunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is not None and not self._finished:
            self.finish(None, "FAILED" if exc_type is not None else "FINISHED")

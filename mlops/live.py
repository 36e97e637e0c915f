"""Live logging: one MLflow run logged while the federated run it describes goes on (`LiveRunLogger`), and the
federation's observer over it (`MlflowObserver`, fedmedclip.observer.RunObserver), so the core never imports
mlflow. ONE mechanism for every way a run is made:

- `fedmedclip server run --track`: the server calls it (entry point `fedmedclip.observers`, name `mlflow`);
- `fedmedclip train --track`: the in-process engine calls it the same way, round by round as they finish;
- the pipeline's server worker builds it directly;
- `fedmedclip track RUN_DIR` logs a finished directory through the same `LiveRunLogger`, each round at the
  time the run recorded for it (`finished_at`), so the history looks the same as if it had been live.

The interface the core calls is fedmedclip.observer.RunObserver.

Tracking never stops the federation: an MLflow that cannot be reached at the start, or refuses something later,
is logged as a warning and the run goes on (the pipeline's register task then logs the finished run directory
after the fact). The MLflow run is keyed on the federation's run id (a restarted server continues the same
MLflow run; `train --resume` continues the MLflow run recorded in its run directory), tagged with the KFP run
id; the sites' private heads are not logged.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fedmedclip.observer import RunObserver

from ._mlflow import operation_futures
from .rundir import _lineage_tags, _log_run_files, read_run_dir
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
    dataset_inputs,
    describe_run,
    final_metrics,
    get_or_create_experiment,
    is_operational,
    outcome_line,
    round_metrics,
    run_parameters,
)

log = logging.getLogger("fedmedclip.tracking")

# Where `train --track` records which MLflow run it logs to, so that `train --resume` continues that run.
TRACKING_RECORD = "tracking.json"


def resolved_method_options(cfg) -> dict:
    """The method's options with every default filled in (what results.json's `method_options` holds)."""
    from fedmedclip.methods import METHODS

    cls = METHODS.get(cfg.method)
    return {**(cls.options if cls is not None else {}), **(cfg.method_options or {})}


def resolved_preprocessing(cfg) -> str:
    from fedmedclip.methods import METHODS

    cls = METHODS.get(cfg.method)
    return cfg.preprocessing or (cls.default_preprocessing if cls is not None else "")


class MlflowObserver(RunObserver):
    def __init__(
        self,
        cfg,
        run_id: str,
        experiment: str = "fedmedclip",
        *,
        tracking_uri: str | None = None,
        kfp_run_id: str | None = None,
        options: dict | None = None,
        run_name: str | None = None,
        source: str = "fedmedclip server run",
        record_run_dir: bool = True,
        key_file: str | Path | None = None,
    ):
        self.cfg, self.run_id, self.run_key = cfg, run_id, run_id
        self.run_dir = Path(cfg.out)
        self.options = dict(options or {})
        self.run_name = run_name or run_id
        self.source = source
        self.kfp_run_id = kfp_run_id
        self.key_file = Path(key_file) if key_file is not None else None
        # The run starts when its command does (data preparation and feature extraction included), not when
        # its manifest is out: the MLflow run's duration is the run's.
        self.created = time.time()
        # The sites' private heads never go to the central MLflow live (`track --include-site-models` may).
        self.logger = LiveRunLogger(
            experiment, tracking_uri, kfp_run_id=kfp_run_id, record_run_dir=record_run_dir
        )
        self.enabled = True

    @property
    def tracked_run_id(self) -> str | None:
        """The MLflow run id; None while nothing is logged, or once tracking is off."""
        return self.logger.run_id if self.enabled else None

    def params(self, manifest: dict) -> dict:
        """Every resolved setting of the run (mlops.tracking.run_parameters): the configuration, the
        method's options with their defaults, the preprocessing, the run's sites and the server's options
        (quorum, timeouts, norm factor: `server.*`, operational, so a restart may change them)."""
        names = [s["name"] for s in manifest.get("sites", [])]
        server = {k: v for k, v in self.options.items() if v is not None}
        if manifest.get("quorum") is not None:
            server["quorum"] = manifest["quorum"]  # resolved: every site when none was given
        return run_parameters(
            self.cfg.to_json(),
            resolved_method_options(self.cfg),
            resolved_preprocessing(self.cfg),
            {"federation_run_id": self.run_id, "site_names": ",".join(names), "server": server or None},
        )

    def _recorded_key(self) -> str:
        """`train`'s key: the one its run directory records, else a new one, recorded now."""
        try:
            return str(json.loads(self.key_file.read_text())["run_key"])
        except (OSError, ValueError, KeyError, TypeError):
            key = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            self.key_file.parent.mkdir(parents=True, exist_ok=True)
            self.key_file.write_text(json.dumps({"run_key": key}) + "\n")
            return key

    def start(self, manifest: dict, resumed: bool = False) -> None:
        if self.key_file is not None:
            self.run_key = self._recorded_key()

        partition_file = self.run_dir / "partition.json"
        partition = json.loads(partition_file.read_text()) if partition_file.is_file() else None
        names = [s["name"] for s in manifest.get("sites", [])]
        cfg = self.cfg
        scheme = {"scheme": cfg.partition, "alpha": cfg.alpha, "seed": cfg.seed}
        where = (
            f"Kubeflow Pipelines run `{self.kfp_run_id}`: the server's worker logged it live."
            if self.kfp_run_id
            else f"`{self.source}`, logged live as the rounds finished."
        )
        tags = {
            **context_tags(self.source, "JOB" if self.kfp_run_id else "LOCAL"),
            "orchestrator": "kubeflow-pipelines" if self.kfp_run_id else "federation-runtime",
        }
        try:
            self.logger.start(
                self.params(manifest),
                tags,
                run_name=self.run_name,
                site_names=names,
                partition=partition,
                data_source=str(cfg.data),
                run_key=self.run_key,
                description=describe_run(cfg.method, names, cfg.rounds, str(cfg.data), scheme, where),
                start_time=self.created,
            )
        except Exception as exc:  # tracking must not stop the federation
            self.enabled = False
            log.warning("live MLflow tracking is off for run %s: %s", self.run_id, exc)
            return
        log.info(
            "%s run %s live in MLflow run %s",
            "resumed" if resumed else "started",
            self.run_id,
            self.logger.run_id,
        )

    def round(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self.logger.log_round(record)  # queued: never waits for MLflow
        except Exception as exc:
            log.warning("MLflow: round %s of run %s not logged: %s", record.get("round"), self.run_id, exc)

    def finish(self, results: dict | None, error: str | None = None) -> None:
        if not self.enabled:
            return
        try:
            if error is None:
                self.logger.finish(self.run_dir, "FINISHED")
            else:
                log.warning("run %s failed; its finished rounds stay in MLflow: %s", self.run_id, error)
                self.logger.finish(None, "FAILED")
        except Exception as exc:
            log.warning("MLflow: the end of run %s was not logged: %s", self.run_id, exc)
            if error is None:  # registration needs a completely logged run: let the pipeline log it again
                self.enabled = False


def mlflow_observer(cfg, run_id: str, experiment: str = "fedmedclip", **kwargs) -> MlflowObserver:
    """The entry point `fedmedclip.observers:mlflow` (`fedmedclip server run --track`, `train --track`): the
    tracking server by the one rule (fedmedclip.tracking_server), the run directory cfg.out.

    `train` passes `run_id=None`: its MLflow run is keyed on a key recorded in its run directory
    (`tracking.json`), created on the first start, so `train --resume` continues the same MLflow run and a new
    run directory never continues an old one."""
    if run_id is None:
        kwargs.setdefault("key_file", Path(cfg.out) / TRACKING_RECORD)
        kwargs.setdefault("run_name", Path(cfg.out).resolve().name)
        kwargs.setdefault("source", "fedmedclip train")
        run_id = "inprocess"
    return MlflowObserver(cfg, run_id, experiment, **kwargs)


class LiveRunLogger:
    """One MLflow run logged while the federated run it describes goes on.

        logger = LiveRunLogger("fedmedclip", kfp_run_id=...)
        logger.start(params, tags, run_name, partition=manifest, data_source="s3://bucket")
        for each finished round: logger.log_round(record)      # never waits for MLflow
        logger.finish(run_dir, "FINISHED")                       # or "FAILED": the rounds logged stay

    `log_round` stamps the metrics with the time it is called and hands them to MLflow's own asynchronous
    logging (`log_batch(..., synchronous=False)`: MLflow's queue and threads), so a slow or unreachable
    tracking server never holds up a round. MLflow's queue gives a batch up once its HTTP retries fail (a
    tracking outage longer than them); the logger keeps every batch until MLflow has it and sends the failed
    ones again, at the next round and in `flush`, every `retry_seconds`; `finish` flushes for up to
    `flush_timeout`. With `background=False` metrics are sent in the caller's thread and errors raise
    (after-the-fact logging: `log_run_dir`). Used as a context manager, an exception ends the run as FAILED.
    """

    def __init__(
        self,
        experiment: str = "fedmedclip",
        tracking_uri: str | None = None,
        *,
        kfp_run_id: str | None = None,
        include_site_models: bool = False,
        background: bool = True,
        retry_seconds: float = 5.0,
        flush_timeout: float = 120.0,
        record_run_dir: bool = True,
    ):
        self.experiment = experiment
        self.record_run_dir = record_run_dir
        self.description = ""
        self.tracking_uri = tracking_uri
        self.kfp_run_id = kfp_run_id or None
        self.include_site_models = include_site_models
        self.background = background
        self.retry_seconds = retry_seconds
        self.flush_timeout = flush_timeout
        self.run_id: str | None = None
        self.site_names: list[str] = []
        self._client = None
        self._batches: list[_Batch] = []  # each round's metrics, until MLflow has them
        self._last_error: Exception | None = None
        self._finished = False

    # -- start
    def start(
        self,
        params: dict,
        tags: dict[str, str] | None = None,
        run_name: str | None = None,
        *,
        site_names: list[str] | None = None,
        partition: dict | None = None,
        data_source: str | None = None,
        run_key: str | None = None,
        description: str | None = None,
        start_time: float | None = None,
    ) -> str:
        """Create the MLflow run (named `run_name`, tagged with the KFP run id when given, `description` as
        its note, started at `start_time` (unix seconds; default now)), log `params` (nested dicts are
        flattened to dotted keys) and, with the partition manifest, the data set and the partition as inputs.
        With `run_key` (the federation's run id), a run already logged under that key is continued instead: a
        restarted server keeps one MLflow run; its defining parameters must be the same, and operational
        ones (`is_operational`) that changed are recorded in a tag. Returns the MLflow run id."""
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        if self.run_id is not None:
            raise TrackingError(f"this logger already started MLflow run {self.run_id}")
        client, uri = _client(self.tracking_uri)
        exp_id = get_or_create_experiment(client, self.experiment)
        all_tags = {**context_tags("fedmedclip"), **(tags or {})}
        if description:
            self.description = description
            all_tags["mlflow.note.content"] = description
        if self.kfp_run_id:
            all_tags[KFP_RUN_ID_TAG] = str(self.kfp_run_id)
        if run_key:
            all_tags[RUN_KEY_TAG] = str(run_key)
        existing = self._run_with_key(client, exp_id, run_key) if run_key else None
        flat = _flatten(params)
        if existing is not None:
            run_id = existing.info.run_id
            differ = {
                k: (existing.data.params[k], v)
                for k, v in flat.items()
                if existing.data.params.get(k, v) != v
            }
            changed = {k: d for k, d in differ.items() if not is_operational(k)}
            if changed:
                raise TrackingError(
                    f"MLflow run {run_id} of {run_key} was started with other parameters ("
                    + "; ".join(
                        f"{k}: {old!r} then, {new!r} now" for k, (old, new) in sorted(changed.items())
                    )
                    + "): a run continues only with its own configuration"
                )
            client.update_run(run_id, status="RUNNING")
            log.info("continuing MLflow run %s of %s on %s", run_id, run_key, uri)
            if differ:  # parameters cannot change: the restart's operational settings go into a tag
                all_tags[f"fedmedclip.restarted.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"] = (
                    json.dumps({k: {"before": old, "now": new} for k, (old, new) in sorted(differ.items())})[
                        :5000
                    ]
                )
                flat = {k: v for k, v in flat.items() if k not in differ}
        else:
            run_id = client.create_run(
                exp_id,
                run_name=run_name,
                tags=all_tags,
                start_time=int(start_time * 1000) if start_time is not None else None,
            ).info.run_id
        self._client, self.run_id = client, run_id
        self.site_names = [str(s) for s in site_names or []]
        try:
            client.log_batch(run_id, params=[Param(k, v) for k, v in flat.items()])  # MLflow splits it
            if existing is not None:
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items()])
            elif partition:
                client.log_inputs(run_id, datasets=dataset_inputs(partition, data_source or ""))
        except MlflowException as e:
            client.set_terminated(run_id, "FAILED")
            self._finished = True
            raise TrackingError(f"MLflow refused the start of run {run_id}: {e.message}") from e
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            self._finished = True
            raise
        log.info("MLflow run %s in experiment %r on %s", run_id, self.experiment, uri)
        return run_id

    @staticmethod
    def _run_with_key(client, exp_id: str, run_key: str):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", str(run_key)):
            raise TrackingError(f"run key {run_key!r}: use letters, digits, '.', '_' or '-'")
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1
        )
        return found[0] if found else None

    # -- rounds
    def log_round(self, record: dict) -> None:
        """One finished round (a results.json `history` entry), step = its round, stamped now."""
        self.log_rounds([record])

    def log_rounds(self, records: list[dict]) -> None:
        from mlflow.entities import Metric

        if self.run_id is None or self._finished:
            raise TrackingError("log_round needs a started, unfinished run: call start() first")
        now = int(time.time() * 1000)
        for rec in records:
            if not isinstance(rec, dict) or not isinstance(rec.get("round"), int):
                raise TrackingError(f"a round record needs an integer `round`, got {str(rec)[:200]}")
            # The round's own time when the record has it (a finished run logged afterwards), else now.
            finished = _num(rec.get("finished_at"))
            stamp = int(finished * 1000) if finished is not None else now
            metrics = [
                Metric(k, v, stamp, rec["round"]) for k, v in round_metrics(rec, self.site_names).items()
            ]
            if not self.background:
                self._client.log_batch(self.run_id, metrics=metrics)
            else:
                self._batches.append(_Batch(rec["round"], metrics))
        self._settle(0.0)
        self._send_failed()

    def _send_failed(self) -> None:
        """Hand MLflow's queue every batch not in flight: new ones, and those it gave up."""
        for batch in self._batches:
            if batch.sent is None:
                batch.sent = self._client.log_batch(self.run_id, metrics=batch.metrics, synchronous=False)

    def _settle(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the batches in flight: drop those MLflow has, mark those it gave up for
        sending again. True when none is left."""
        futures = [f for b in self._batches if b.sent is not None for f in operation_futures(b.sent)]
        concurrent.futures.wait(futures, timeout=timeout)
        for batch in [b for b in self._batches if b.sent is not None]:
            done = operation_futures(batch.sent)
            if not all(f.done() for f in done):
                continue
            errors = [f.exception() for f in done if f.exception() is not None]
            if errors:
                if self._last_error is None:
                    log.warning(
                        "MLflow run %s: round %s not logged yet (%s); sending it again",
                        self.run_id,
                        batch.round,
                        errors[0],
                    )
                self._last_error, batch.sent = errors[0], None
            else:
                self._batches.remove(batch)
        return not self._batches

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every round logged so far is in MLflow (or `timeout` seconds); True when it is."""
        deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
        while True:
            self._send_failed()
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

    # -- finish
    def finish(
        self, run_dir: str | Path | None = None, status: str = "FINISHED", end_time: float | None = None
    ) -> None:
        """End the run with `status` (FINISHED, FAILED or KILLED). The rounds already logged stay whatever
        the status. From `run_dir`: results.json, config/partition/provenance, plots/, rounds/ and model/
        (less the sites' private heads unless `include_site_models`) and the final metrics; a FINISHED run
        whose directory is complete gets the lineage tags that registration needs. A directory that is not
        complete ends the run FAILED and raises RunDirError."""
        from mlflow.entities import Metric, RunTag

        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, not {status!r}")
        if self.run_id is None:
            raise TrackingError("finish needs a started run: call start() first")
        if self._finished:
            return
        self._finished = True
        client, run_id = self._client, self.run_id
        sent = self.flush()
        tags: dict[str, str] = {}
        if not sent:
            missing = ",".join(str(r) for r in self.unsent_rounds)
            tags["fedmedclip.unlogged_rounds"] = missing
            log.warning(
                "MLflow run %s: metrics of rounds %s could not be logged (%s)",
                run_id,
                missing,
                self._last_error,
            )
        final_status, problem = status, None
        try:
            run_path = Path(run_dir) if run_dir is not None else None
            if run_path is not None and run_path.is_dir():
                withheld = _log_run_files(client, run_id, run_path, self.include_site_models)
                if withheld:
                    tags["fedmedclip.site_models"] = (
                        "withheld (kept on the sites' own storage): " + ", ".join(withheld)
                    )
                try:
                    results = json.loads((run_path / "results.json").read_text())
                except (OSError, ValueError):
                    results = None
                if isinstance(results, dict):
                    now = int((end_time or time.time()) * 1000)
                    final = [Metric(k, v, now, 0) for k, v in final_metrics(results).items()]
                    if final:
                        client.log_batch(run_id, metrics=final)
                    if self.description:
                        tags["mlflow.note.content"] = f"{self.description}\n\n{outcome_line(results)}"
                if status == "FINISHED":
                    try:
                        tags.update(_lineage_tags(read_run_dir(run_path), self.record_run_dir))
                        tags[COMPLETE_TAG] = "complete"
                    except RunDirError as e:
                        final_status, problem = "FAILED", e
            elif status == "FINISHED" and run_dir is not None:
                final_status, problem = "FAILED", RunDirError(f"run directory {run_path} does not exist")
            if tags:
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
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


@dataclass
class _Batch:
    round: int
    metrics: list
    sent: object = None  # MLflow's RunOperations while in flight; None: to be sent (again)

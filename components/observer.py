"""The federation's observer that logs a run to MLflow while it goes on (components.tracking's
`LiveRunLogger`), so the core never imports mlflow. ONE mechanism for every way a run is made:

- `fedmedclip server run --track`: the server calls it (entry point `fedmedclip.observers`, name `mlflow`);
- `fedmedclip train --track`: the in-process engine calls it the same way, round by round as they finish;
- the pipeline's server worker builds it directly;
- `fedmedclip track RUN_DIR` logs a finished directory through the same `LiveRunLogger`, each round at the
  time the run recorded for it (`finished_at`), so the history looks the same as if it had been live.

Protocol (what the core calls): `start(manifest, resumed=bool)` once the run's manifest exists, `round(record)`
after each round (a results.json `history` entry), and `finish(results, None)` at the end or
`finish(None, message)` when the run fails.

Tracking never stops the federation: an MLflow that cannot be reached at the start, or refuses something later,
is logged as a warning and the run goes on (the pipeline's register task then logs the finished run directory
after the fact). The MLflow run is keyed on the federation's run id (a restarted server continues the same
MLflow run; `train --resume` continues the MLflow run recorded in its run directory), tagged with the KFP run
id; the sites' private heads are not logged.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

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


class MlflowObserver:
    def __init__(
        self,
        cfg,
        run_id: str,
        experiment: str = "fedmedclip",
        *,
        tracking_uri: str | None = None,
        kfp_run_id: str | None = None,
        run_dir: str | Path | None = None,
        include_site_models: bool = False,
        tags: dict[str, str] | None = None,
        options: dict | None = None,
        run_key: str | None = None,
        run_name: str | None = None,
        source: str = "fedmedclip server run",
        record_run_dir: bool = True,
        key_file: str | Path | None = None,
    ):
        from components.tracking import LiveRunLogger

        self.cfg, self.run_id = cfg, run_id
        self.run_dir = Path(run_dir if run_dir is not None else cfg.out)
        self.tags = dict(tags or {})
        self.options = dict(options or {})
        self.run_key = run_key or run_id
        self.run_name = run_name or run_id
        self.source = source
        self.kfp_run_id = kfp_run_id
        self.key_file = Path(key_file) if key_file is not None else None
        # The run starts when its command does (data preparation and feature extraction included), not when
        # its manifest is out: the MLflow run's duration is the run's.
        self.created = time.time()
        self.logger = LiveRunLogger(
            experiment,
            tracking_uri,
            kfp_run_id=kfp_run_id,
            include_site_models=include_site_models,
            record_run_dir=record_run_dir,
        )
        self.enabled = True

    @property
    def mlflow_run_id(self) -> str | None:
        return self.logger.run_id if self.enabled else None

    def params(self, manifest: dict) -> dict:
        """Every resolved setting of the run (components.tracking.run_parameters): the configuration, the
        method's options with their defaults, the preprocessing, the run's sites and the server's options
        (quorum, timeouts, norm factor: `server.*`, operational, so a restart may change them)."""
        from components.tracking import run_parameters

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
        from components.tracking import context_tags, describe_run

        if self.key_file is not None:
            self.run_key = self._recorded_key()

        partition_file = self.run_dir / "partition.json"
        partition = json.loads(partition_file.read_text()) if partition_file.is_file() else None
        names = [s["name"] for s in manifest.get("sites", [])]
        cfg = self.cfg
        scheme = f"{cfg.partition}" + (f" (alpha {cfg.alpha})" if cfg.alpha else "") + f", seed {cfg.seed}"
        where = (
            f"Kubeflow Pipelines run `{self.kfp_run_id}`: the server's worker logged it live."
            if self.kfp_run_id
            else f"`{self.source}`, logged live as the rounds finished."
        )
        tags = {
            **context_tags(self.source, "JOB" if self.kfp_run_id else "LOCAL"),
            "orchestrator": "kubeflow-pipelines" if self.kfp_run_id else "federation-runtime",
            **self.tags,
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

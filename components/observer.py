"""The federation server's observer that logs the run to MLflow while it goes on (components.tracking's
`LiveRunLogger`), so the core never imports mlflow.

`FederationServer` calls `observer.start(manifest, resumed=bool)` once its manifest is out, `observer.round(record)`
after each round (a results.json `history` entry), and `observer.finish(results, None)` at the end or
`observer.finish(None, message)` when the run fails. `fedmedclip server run --track` finds this class through
the entry-point group `fedmedclip.observers` (name `mlflow`, `mlflow_observer(cfg=..., run_id=..., experiment=...)`);
the pipeline's server worker builds it directly.

Tracking never stops the federation: an MLflow that cannot be reached at the start, or refuses something later,
is logged as a warning and the run goes on (the pipeline's register task then logs the finished run directory
after the fact). The MLflow run is named after the federation's run, keyed on its run id (a restarted server
continues the same MLflow run) and tagged with the KFP run id; the sites' private heads are not logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("fedmedclip.tracking")


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
    ):
        from components.tracking import LiveRunLogger

        self.cfg, self.run_id = cfg, run_id
        self.run_dir = Path(run_dir if run_dir is not None else cfg.out)
        self.tags = dict(tags or {})
        self.logger = LiveRunLogger(
            experiment, tracking_uri, kfp_run_id=kfp_run_id, include_site_models=include_site_models
        )
        self.enabled = True

    @property
    def mlflow_run_id(self) -> str | None:
        return self.logger.run_id if self.enabled else None

    def params(self, manifest: dict) -> dict:
        """What defines the run (a restarted server must log the same): the configuration's resume key and
        the run's sites. Paths, threads and the operational settings (quorum, timeouts) are left out."""
        names = [s["name"] for s in manifest.get("sites", [])]
        return {
            **self.cfg.resume_key(),
            "federation_run_id": self.run_id,
            "site_names": ",".join(names),
            "codec_up": manifest.get("codec_up"),
            "codec_down": manifest.get("codec_down"),
        }

    def start(self, manifest: dict, resumed: bool = False) -> None:
        partition_file = self.run_dir / "partition.json"
        partition = json.loads(partition_file.read_text()) if partition_file.is_file() else None
        tags = {"orchestrator": "federation-runtime", **self.tags}
        try:
            self.logger.start(
                self.params(manifest),
                tags,
                run_name=self.run_id,
                site_names=[s["name"] for s in manifest.get("sites", [])],
                partition=partition,
                data_source=str(self.cfg.data),
                run_key=self.run_id,
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
    """The entry point `fedmedclip.observers:mlflow` (`fedmedclip server run --track`): the tracking server
    from --tracking-uri's environment ($MLFLOW_TRACKING_URI, else the local stack), the run directory cfg.out."""
    return MlflowObserver(cfg, run_id, experiment, **kwargs)

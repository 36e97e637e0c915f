"""register: a model version from the run's MLflow run, promoted when at least as good (mlops/registry.py)."""

import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

from kfp.dsl import Artifact, Input, Model

from components.kfp_components import pipeline_mlflow_run
from mlops.promotion import PromotionPolicy

log = logging.getLogger("fedmedclip.pipeline")

PROMOTED, REFUSED, NOT_PROMOTED = "promoted", "refused", "not promoted"


def register_step(
    run_dir: str,
    onnx_dir: str,
    mlflow_run_id: str,
    tracking_uri: str,
    experiment: str,
    model_name: str,
    policy: PromotionPolicy,
    kfp_run_id: str = "",
    fail_if_not_promoted: bool = False,
) -> tuple[str, str]:
    """Register a model version from the run's MLflow run (the one the server logged live; logged now from the
    run directory if the live logging could not reach MLflow), with the ONNX file when there is one, and
    promote it. Returns (model URI, '' without a tracking server; `promoted`, `refused: <why>` or `not promoted
    (...)`). Idempotent (KFP retries this task): keyed on the MLflow run and the ONNX file, a retry finds its
    own version. A refused promotion leaves the version registered, logs an error line, and fails the task
    when `fail_if_not_promoted` (the operator's choice: the run then ends red in the KFP UI)."""
    from fedmedclip.errors import FedMedClipError

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        log.warning("registration skipped: no tracking_uri parameter and no MLFLOW_TRACKING_URI")
        return "", f"{NOT_PROMOTED} (no tracking server)"
    from mlops.registry import PromotionRefused, promote, register_model
    from mlops.rundir import log_run_dir

    if not mlflow_run_id:
        from fedmedclip.config import TrainConfig

        cfg = TrainConfig.from_json(json.loads((Path(run_dir) / "config.json").read_text()))
        tags = {"orchestrator": "kubeflow-pipelines"}
        run = pipeline_mlflow_run(cfg, kfp_run_id)
        mlflow_run_id = log_run_dir(run_dir, experiment, tracking_uri=uri, tags=tags, **run)
    onnx = Path(onnx_dir) / "model.onnx"
    version = register_model(mlflow_run_id, model_name, onnx if onnx.exists() else None, tracking_uri=uri)
    verb = "already registered:" if version.existing else "registered"
    log.info("%s %s from MLflow run %s", verb, version.uri, mlflow_run_id)
    alias = policy.promote_alias
    if not alias:
        return version.uri, f"{NOT_PROMOTED} (no alias asked for)"
    try:
        done = promote(model_name, version.version, policy, uri)
    except PromotionRefused as e:
        # The version stays registered; promoting a worse model, or one trained on other data, is a human
        # decision (allow_worse, allow_different_data).
        log.error(
            f"PROMOTION REFUSED: {model_name} version {version.version} stays registered, not @{alias}: {e}"
        )
        if fail_if_not_promoted:
            raise FedMedClipError(
                f"promotion refused (fail_if_not_promoted is set): {e}; {version.uri} stays registered"
            ) from e
        return version.uri, f"{REFUSED}: {e}"
    log.info(done.describe())
    return f"models:/{model_name}@{alias}", PROMOTED


def register_component(
    run_dir: Input[Artifact],
    onnx: Input[Model],
    mlflow_run_id: str,
    tracking_uri: str,
    experiment: str,
    model_name: str,
    promote_alias: str,
    allow_worse: bool,
    allow_different_data: bool,
    fail_if_not_promoted: bool,
    max_epsilon: float,
    max_delta: float,
    kfp_run_id: str,
) -> NamedTuple("RegisterOutputs", [("model_uri", str), ("promotion", str)]):  # noqa: F821
    from components.register.component import register_step
    from mlops.promotion import PromotionPolicy

    return register_step(  # a plain tuple: KFP reads it field by field
        run_dir.path,
        onnx.path,
        mlflow_run_id,
        tracking_uri,
        experiment,
        model_name,
        # max_epsilon 0: no budget
        PromotionPolicy(promote_alias, allow_worse, allow_different_data, max_epsilon, max_delta),
        kfp_run_id,
        fail_if_not_promoted,
    )

"""Model cards in MLflow (the core builds them: fedmedclip/model_card.py). At registration
(mlops.registry.register_model) the card is built from the run's logged files, downloaded once, with what the
registry adds (name, version, tags, the MLflow and KFP run ids), and logged into the run under
`model_cards/<name>/v<version>/`, which the version's tag `model_card` names; `fedmedclip card` reads it back.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from fedmedclip.digests import META_SITE
from fedmedclip.jsonfiles import read_json
from fedmedclip.model_card import CardError, build_card, ood_facts, write_card
from fedmedclip.privacy.report import privacy_summary

from .rundir import REQUIRED_FILES as REQUIRED
from .tracking import KFP_RUN_ID_TAG, TrackingError, registered_version

CARD_TAG = "model_card"
CARD_FILES = {"md": "model_card.md", "json": "model_card.json"}
# The run's logged files a card is built from: the run directory's required files, and these when logged.
OPTIONAL = ("model/model.json", "plots/reliability.png")


def download_run_files(
    client, run, dest: Path, required=REQUIRED, optional=OPTIONAL, purpose: str = "to build a model card from"
) -> Path:
    """The files a card needs (or `required` and `optional` ones, for `purpose`) from MLflow `run` (an mlflow
    Run) into `dest`, through one artifact repository (a `runs:/` download per file would resolve the run
    again and look for logged models)."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=client.tracking_uri)
    for rel in (*required, *optional):
        try:
            repo.download_artifacts(rel, str(dest))  # into dest/rel
        except (MlflowException, OSError) as exc:
            if rel in required:
                raise TrackingError(f"MLflow run {run.info.run_id} has no {rel} {purpose}: {exc}") from exc
    return dest


def check_card(run_dir: Path, source: str) -> dict[str, str]:
    """Build the card once without a version, as write_card will write it: a run (`source`, for the message)
    whose card cannot be built or written is not registered, and no version is left behind. Returns the run's
    privacy facts (privacy_summary), which the version's tags carry."""
    try:
        json.dumps(build_card(run_dir), allow_nan=False)
        return privacy_summary(read_json(run_dir / "results.json"))
    except (CardError, ValueError) as exc:  # ValueError: a card with NaN (json), a privacy figure
        raise TrackingError(f"{source}: {exc}") from exc


def log_model_card(client, run, run_dir: Path, name: str, version: str, tags: dict, contract=None) -> str:
    """Log the card of `name` version `version` into MLflow `run` and tag the version; returns the folder.
    `contract`: the registered ONNX file's (onnx_contract.ModelContract), None for a model folder."""
    registry = {
        "name": name,
        "version": str(version),
        "tags": dict(tags),
        "site": contract.metadata.get(META_SITE) if contract else None,
        "ood": ood_facts(contract.ood) if contract else None,
        "mlflow_run_id": run.info.run_id,
        "kfp_run_id": run.data.tags.get(KFP_RUN_ID_TAG),
        # git_commit and onnx_sha256: the card reads them from the version's `tags` (the run's lineage).
        "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    folder = f"model_cards/{name}/v{version}"
    with tempfile.TemporaryDirectory() as tmp:
        write_card(run_dir, Path(tmp) / "card", registry)
        client.log_artifacts(run.info.run_id, str(Path(tmp) / "card"), artifact_path=folder)
    client.set_model_version_tag(name, str(version), CARD_TAG, folder)
    return folder


def read_model_card(ref: str, fmt: str = "md", tracking_uri: str | None = None) -> str:
    """The card of a registered version (NAME@ALIAS or NAME/VERSION) as Markdown or JSON text."""
    client, mv = registered_version(ref, tracking_uri)
    folder = mv.tags.get(CARD_TAG)
    if not folder:
        raise TrackingError(
            f"{mv.name} version {mv.version} has no model card (registered before cards were generated); "
            "register its run again to get one"
        )
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(mv.run_id, f"{folder}/{CARD_FILES[fmt]}", tmp)).read_text()

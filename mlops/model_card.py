"""Model cards in MLflow (the core builds them: fedmedclip/model_card.py).

`log_model_card` runs at registration (mlops.registry.register_model), on the run's logged files downloaded
once (`download_run_files`: results.json, config.json, partition.json, provenance.json, model/model.json, the
reliability plot); it builds the card with what the registry adds (name, version, tags, the MLflow and KFP run ids), and logs
`model_card.md`, `model_card.json` and the plot into the run beside the registered model, under
`model_cards/<name>/v<version>/`; the version's tag `model_card` names that folder. `read_model_card` is what
`fedmedclip card NAME@ALIAS` prints. mlflow is imported inside the functions.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from fedmedclip.digests import parse_model_reference
from fedmedclip.errors import ConfigError
from fedmedclip.model_card import CardError, build_card, write_card

from .rundir import REQUIRED_FILES as REQUIRED

CARD_TAG = "model_card"
CARD_FILES = {"md": "model_card.md", "json": "model_card.json"}
# The run's logged files a card is built from: the run directory's required files (mlops/rundir.py), and these
# when the run logged them.
OPTIONAL = ("model/model.json", "plots/reliability.png")


def card_folder(name: str, version: str) -> str:
    return f"model_cards/{name}/v{version}"


def download_run_files(client, run, dest: Path) -> Path:
    """The run directory's files a card needs, as logged in MLflow `run` (an mlflow Run), into `dest`: through
    one artifact repository of the run (a `runs:/` download per file resolves the run again and looks for logged
    models)."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from .tracking import TrackingError

    run_id = run.info.run_id
    repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=client.tracking_uri)
    for rel in REQUIRED + OPTIONAL:
        try:
            repo.download_artifacts(rel, str(dest))  # into dest/rel
        except (MlflowException, OSError) as exc:
            if rel in REQUIRED:
                raise TrackingError(
                    f"MLflow run {run_id} has no {rel} to build a model card from: {exc}"
                ) from exc
    return dest


def check_card(run_dir: Path) -> dict:
    """Build the card of a run's downloaded files once without a version (before registering: a run whose card
    cannot be built is not registered). Returns the run's results.json."""
    import json

    from .tracking import TrackingError

    try:
        build_card(run_dir)
    except CardError as exc:
        raise TrackingError(str(exc)) from exc
    return json.loads((run_dir / "results.json").read_text())


def log_model_card(
    client, run, run_dir: Path, name: str, version: str, tags: dict, site: str | None = None
) -> str:
    """Build the card of `name` version `version` from MLflow `run`'s downloaded files (`download_run_files`),
    log it into the run and tag the version; returns the artifact folder."""
    from .tracking import KFP_RUN_ID_TAG

    run_id, run_tags = run.info.run_id, run.data.tags
    registry = {
        "name": name,
        "version": str(version),
        "tags": dict(tags),
        "site": site,
        "mlflow_run_id": run_id,
        "kfp_run_id": run_tags.get(KFP_RUN_ID_TAG),
        "git_commit": tags.get("git_commit") or run_tags.get("git_commit"),
        "onnx_sha256": tags.get("onnx_sha256"),
        "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    folder = card_folder(name, str(version))
    with tempfile.TemporaryDirectory() as tmp:
        write_card(run_dir, Path(tmp) / "card", registry)
        client.log_artifacts(run_id, str(Path(tmp) / "card"), artifact_path=folder)
    client.set_model_version_tag(name, str(version), CARD_TAG, folder)
    return folder


def read_model_card(ref: str, fmt: str = "md", tracking_uri: str | None = None) -> str:
    """The card of a registered version (NAME@ALIAS or NAME/VERSION) as Markdown or JSON text."""
    from mlflow.exceptions import MlflowException

    from .tracking import TrackingError, _client, registered_version

    parsed = parse_model_reference(ref)
    if parsed is None:
        raise ConfigError(f"{ref!r} is not a registered model reference: use NAME@ALIAS or NAME/VERSION")
    name, alias, version = parsed
    client, _ = _client(tracking_uri)
    try:
        mv = registered_version(client, name, alias, version)
    except MlflowException as exc:
        raise TrackingError(f"no registered version {ref!r}: {exc.message}") from exc
    folder = (mv.tags or {}).get(CARD_TAG)
    if not folder:
        raise TrackingError(
            f"{name} version {mv.version} has no model card (registered before cards were generated); register "
            "its run again to get one"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(mv.run_id, f"{folder}/{CARD_FILES[fmt]}", tmp)
        return Path(path).read_text()

"""report: the run directory the server worker published to its private area of the mailbox, downloaded with
the server's credentials into the `run_dir` artifact, every file checked against the manifest's sha256.
"""

import json
from pathlib import Path

from kfp.dsl import Artifact, Metrics, Output

from components.kfp_components import SERVER_ROLE
from components.worker.component import RUN_DIR, RUN_DIR_MANIFEST, read_run_dir_manifest


def report_step(mailbox: str, run_id: str, run_dir: str) -> tuple[dict, str]:
    """Returns results.json and the MLflow run id of the live tracking ('' without)."""
    from fedmedclip.errors import FedMedClipError
    from fedmedclip.federation.mailbox import Mailbox
    from fedmedclip.federation.storage import StoreError, open_store
    from mlops.tree import fetch_tree

    mb = Mailbox(open_store(mailbox), run_id)
    published = mb.server_private().sub(RUN_DIR)
    try:
        manifest = read_run_dir_manifest(published, run_id)
    except ValueError as exc:
        raise FedMedClipError(str(exc)) from None
    if manifest is None:
        status = mb.status(SERVER_ROLE)
        said = f"{status.state} {status.message}" if status is not None else "none"
        raise FedMedClipError(
            f"run {run_id}: the server worker published no run directory ({published.where(RUN_DIR_MANIFEST)} "
            f"is missing; server status: {said})"
        )
    try:  # the file list checked there
        fetch_tree(published, manifest["files"], run_dir)
    except StoreError as exc:
        raise FedMedClipError(f"the run directory the server published is damaged: {exc}") from None
    return json.loads((Path(run_dir) / "results.json").read_text()), str(manifest.get("mlflow_run_id") or "")


def report_component(
    mailbox: str,
    settings: dict,
    run_id: str,
    local_stack: str,
    run_dir: Output[Artifact],
    metrics: Output[Metrics],
) -> str:
    from components.kfp_components import SERVER_ROLE, act_as, resolve_mailbox
    from components.report.component import report_step

    act_as(SERVER_ROLE, local_stack)
    # The mailbox as the prepare task resolved it, without fedmedclip.config (it imports torch: seconds of CPU on
    # the critical path): the declared default of `data` (synthetic) names no bucket, as '' does not.
    mailbox = resolve_mailbox(mailbox, str(settings.get("data") or ""))
    results, mlflow_run_id = report_step(mailbox, run_id, run_dir.path)
    m = results["metrics"]
    metrics.log_metric("best_round", m["best_round"])
    for k in ("acc", "bacc", "f1", "ece"):
        for name, value in ((f"global_{k}", m["global"].get(k)), (f"site_mean_{k}", m["site_mean"].get(k))):
            if value is not None:
                metrics.log_metric(name, value)
    return mlflow_run_id

"""worker: one party of the federation, long-lived, until the run ends: the server (`fedmedclip server run`:
aggregates, evaluates, writes the run directory, then publishes it to its private area of the mailbox) or a site
(`fedmedclip site run`: trains on its own data). Started again after a failure (a KFP retry), it continues from
its last checkpoint in storage, never from the pod's disk.

No `from __future__ import annotations`: KFP reads the component's annotations as types.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from kfp.dsl import Artifact, Input

from components.kfp_components import SITE_ROLE, WORKER_TRACKING_ENV, pipeline_run_name

RUN_DIR = "rundir"  # under the server's private area of the run: runs/<run>/server/rundir/
RUN_DIR_MANIFEST = "manifest.json"  # in RUN_DIR, written last: every file's sha256 and size (mlops/tree.py)
RUN_DIR_FORMAT = 2


def copy_store_into_cache(features_dir: str, cache_dir: str) -> None:
    """The extraction task's feature store, where the worker's own preparation looks it up (cache_dir/features/
    <digest[:24]>, the core's layout): the worker then reuses it instead of encoding again."""
    src = Path(features_dir)
    prov = src / "provenance.json"
    if not prov.is_file():
        return
    dst = Path(cache_dir) / "features" / json.loads(prov.read_text())["digest"][:24]
    if (dst / "provenance.json").exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".store-", dir=dst.parent))
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    try:
        os.replace(tmp, dst)
    except OSError:  # another task of this machine put it there first
        shutil.rmtree(tmp, ignore_errors=True)


def site_state_url(mailbox: str, index: int, run_id: str) -> str:
    """Where site k keeps its private state: its own prefix of the mailbox root (`sites/<k>/private/<run>`),
    which only its role may read (mlops/policies.py)."""
    return f"{mailbox.rstrip('/')}/sites/{int(index)}/private/{run_id}"


def worker_step(
    config_json: str,
    role: str,
    party: str,
    index: int,
    run_id: str,
    mailbox: str,
    features_dir: str | None,
    server_json: str = "{}",
    experiment: str = "fedmedclip",
    tracking_uri: str = "",
    kfp_run_id: str = "",
) -> str:
    """Runs party `party` until the federation ends. Returns the MLflow run id of the server's live tracking
    ('' for a site or without tracking)."""
    from dataclasses import asdict

    from fedmedclip.config import TrainConfig
    from fedmedclip.errors import FedMedClipError
    from fedmedclip.federation.mailbox import Mailbox
    from fedmedclip.federation.runner import run_server, run_site
    from fedmedclip.federation.server import ServerOptions
    from fedmedclip.federation.storage import open_store
    from fedmedclip.observer import NO_OBSERVER
    from mlops.tree import publish_tree, tree_files

    cfg = TrainConfig.from_json(json.loads(config_json)).validate()
    options = ServerOptions(**json.loads(server_json))
    if features_dir:
        copy_store_into_cache(features_dir, cfg.cache_dir)
    if role == SITE_ROLE:
        state = site_state_url(mailbox, index, run_id)
        # Secure aggregation: the site's identity key is generated in its own private prefix (kept across runs)
        # and registered through the mailbox; the server takes the registered keys (docs/secure-aggregation.md).
        run_site(
            mailbox,
            run_id,
            party,
            data=cfg.data,
            cache_dir=cfg.cache_dir,
            state_url=state,
            threads=cfg.threads,
            join_timeout=options.join_timeout,
            progress=False,
            identity=f"{mailbox.rstrip('/')}/sites/{int(index)}/private/identity.pem",
            register_identity=cfg.secure_aggregation,
        )
        return ""
    published = Mailbox(open_store(mailbox), run_id).server_private().sub(RUN_DIR)
    done = published.get(RUN_DIR_MANIFEST)
    if done is not None:  # a retry after the run directory was published: nothing left to do
        return json.loads(done).get("mlflow_run_id", "")
    out = Path(tempfile.mkdtemp(prefix="fedmedclip-server-")) / "run"
    cfg.out = str(out)
    observer = NO_OBSERVER
    uri = tracking_uri or os.environ.get(WORKER_TRACKING_ENV) or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        from mlops.live import MlflowObserver

        kfp_id = kfp_run_id or run_id
        observer = MlflowObserver(
            cfg,
            run_id,
            experiment,
            tracking_uri=uri,
            kfp_run_id=kfp_id,
            options=asdict(options),
            run_name=pipeline_run_name(cfg, kfp_id),
            source="kubeflow pipeline fedmedclip",
            record_run_dir=False,  # the pod's temporary directory means nothing to a reader
        )
    site_keys = "mailbox" if cfg.secure_aggregation else None
    if (
        run_server(cfg, mailbox, run_id, out, None, options, observer, progress=False, site_keys=site_keys)
        is None
    ):
        raise FedMedClipError(
            f"the server's state in {published.url} says run {run_id} is done, but its run directory was never "
            "published (the worker stopped in between); the run's results are in its checkpoint: start the "
            "run again under a new run id, or publish them from the checkpoint"
        )
    mlflow_run_id = observer.tracked_run_id or ""
    # Every file of the run directory, then its manifest: the report task reads it back, checked file by file.
    manifest = {
        "format": RUN_DIR_FORMAT,
        "run_id": run_id,
        "files": tree_files(out),
        "mlflow_run_id": mlflow_run_id,
    }
    publish_tree(published, out, RUN_DIR_MANIFEST, manifest)
    return mlflow_run_id


def worker_component(
    config: str,
    server: str,
    role: str,
    party: str,
    index: int,
    run_id: str,
    mailbox: str,
    features: Input[Artifact],
    experiment: str,
    tracking_uri: str,
    local_stack: str,
) -> str:
    import logging

    from components.kfp_components import act_as
    from components.worker.component import worker_step

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    act_as(party, local_stack)
    return worker_step(
        config,
        role,
        party,
        index,
        run_id,
        mailbox,
        features.path,
        server,
        experiment,
        tracking_uri,
        run_id,
    )

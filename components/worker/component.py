"""worker: one party of the federation, from its features to the end of the run, in ONE task process (each
task is a cold start of the KFP executor, torch and transformers, and the worker's imports are the extraction's).

First its own images encoded by the frozen CLIP, as the runtime's own preparation would, and published to the
party's private area of the run; then its long-lived worker (`fedmedclip server run` or `site run`). A retried
task fetches the features it published and the worker continues from its last checkpoint in storage."""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from components.kfp_components import SERVER_ROLE, SITE_ROLE, WORKER_TRACKING_ENV, pipeline_mlflow_run
from fedmedclip.tracking_server import DEFAULT_EXPERIMENT

RUN_DIR = "rundir"  # under the server's private area of the run: runs/<run>/server/rundir/
RUN_DIR_MANIFEST = "manifest.json"  # in RUN_DIR, written last: every file's sha256 and size (mlops/tree.py)
RUN_DIR_FORMAT = 2
MAX_RUN_DIR_MANIFEST_BYTES = 16 << 20
# The party's feature store, under its private area of the run (the server's runs/<run>/server/features/, a
# site's sites/<k>/private/<run>/features/): the store's files, then its manifest, written last.
FEATURES = "features"
FEATURES_MANIFEST = "manifest.json"
FEATURES_FORMAT = 1
MAX_FEATURES_MANIFEST_BYTES = 1 << 20

log = logging.getLogger("fedmedclip.pipeline")


def read_published_manifest(area, key: str, max_bytes: int, what: str, **expected) -> dict | None:
    """mlops.tree.read_manifest, what is wrong a ValueError saying the manifest is not `what` one."""
    from mlops.tree import read_manifest

    try:
        return read_manifest(area, key, max_bytes, **expected)
    except ValueError as exc:
        raise ValueError(f"{area.where(key)} is not {what} manifest ({exc})") from None


def read_run_dir_manifest(published, run_id: str) -> dict | None:
    """The manifest of run `run_id`'s directory in `published` (the server's private area of the mailbox)."""
    what, limit = f"run {run_id}'s run directory", MAX_RUN_DIR_MANIFEST_BYTES
    return read_published_manifest(
        published, RUN_DIR_MANIFEST, limit, what, run_id=run_id, format=RUN_DIR_FORMAT
    )


def extract_step(extraction_json: str, role: str, holder: str, index: int, features_dir: str) -> dict:
    """The holder's feature store in `features_dir`; returns its provenance."""
    from fedmedclip.backbone import load_backbone, make_preprocessing
    from fedmedclip.config import TrainConfig
    from fedmedclip.federation.runner import site_images
    from fedmedclip.preparation import SERVER, extract_features, prepare

    # A published backbone (s3://, models:/) is fetched into the cache and hash-checked by load_backbone,
    # before any image is read: a missing or mismatching one fails here, saying how to publish it.
    cfg = TrainConfig(**json.loads(extraction_json), out="").validate()
    if role == SERVER_ROLE:
        store = prepare(cfg, progress=False, holders=[SERVER]).stores[SERVER]
    else:
        # The site's own images only (its own prefix with its own credentials, for published data).
        images, split, _ = site_images(cfg, holder, index)
        backbone = load_backbone(cfg.backbone, cache_dir=cfg.cache_dir)
        prep = make_preprocessing(cfg.preprocessing, backbone)
        ids = split["train"] + split["val"] + split["test"]
        store = extract_features(images, ids, backbone, prep, cfg, holder, progress=False)
    shutil.copytree(store.path, Path(features_dir), dirs_exist_ok=True)
    return store.provenance


def features_step(
    extraction_json: str, role: str, party: str, index: int, run_id: str, mailbox: str, features_dir: str
) -> bool:
    """The party's feature store in `features_dir`: the one it published to its private area of the run (a
    retried task: fetched, every file checked against the manifest's sha256), else extracted now and published
    there, the files first and the manifest last. Returns True when it was extracted now."""
    from fedmedclip.federation.mailbox import Mailbox
    from fedmedclip.federation.storage import StoreError, open_store
    from mlops.tree import fetch_tree, publish_tree, tree_files

    # The party's private area of the run, which only its own role may read: a site's under its own prefix.
    if role == SITE_ROLE:
        area = open_store(site_state_url(mailbox, index, run_id)).sub(FEATURES)
    else:
        area = Mailbox(open_store(mailbox), run_id).server_private().sub(FEATURES)
    key = hashlib.sha256(f"{party}\n{extraction_json}".encode()).hexdigest()
    try:  # the files are the party's own: whatever is wrong with them, it extracts again
        what, limit = "this extraction's features", MAX_FEATURES_MANIFEST_BYTES
        manifest = read_published_manifest(
            area, FEATURES_MANIFEST, limit, what, format=FEATURES_FORMAT, extraction=key
        )
        if manifest is not None:
            fetch_tree(area, manifest["files"], features_dir)  # its file list checked there
            return False
    except (StoreError, ValueError) as exc:
        log.warning("%s; extracting the features again", exc)
        shutil.rmtree(features_dir, ignore_errors=True)
    extract_step(extraction_json, role, party, index, features_dir)
    manifest = {"format": FEATURES_FORMAT, "extraction": key, "files": tree_files(features_dir)}
    publish_tree(area, features_dir, FEATURES_MANIFEST, manifest)
    return True


def copy_store_into_cache(features_dir: str, cache_dir: str) -> None:
    """The extraction task's feature store, where the worker's own preparation looks it up (the core's
    `cached_store`): the worker then reuses it instead of encoding again."""
    from fedmedclip.features import FeatureStore, cached_store

    store = FeatureStore.load(Path(features_dir))
    dst = cached_store(cache_dir, store.provenance["digest"])
    if not (dst / "provenance.json").exists():  # else this task extracted it there, or another task did
        store.save(dst)  # written aside, then renamed into place


def site_state_url(mailbox: str, index: int, name: str) -> str:
    """Where site k keeps its private state `name` (a run's: the run id; its identity key): its own prefix of
    the mailbox root (`sites/<k>/private/`), which only its role may read (mlops/policies.py)."""
    from mlops.policies import SITE_PRIVATE

    return f"{mailbox.rstrip('/')}/{SITE_PRIVATE.format(k=int(index)).removesuffix('*')}{name}"


def worker_step(
    config_json: str,
    role: str,
    party: str,
    index: int,
    run_id: str,
    mailbox: str,
    features_dir: str | None,
    server_json: str = "{}",
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str = "",
) -> str:
    """Runs party `party` until the federation ends. Returns the MLflow run id of the server's live tracking
    ('' for a site or without tracking); the MLflow run is tagged with `run_id`, the KFP run's."""
    from dataclasses import asdict

    from fedmedclip.config import TrainConfig
    from fedmedclip.errors import FedMedClipError
    from fedmedclip.federation.mailbox import Mailbox
    from fedmedclip.federation.runner import SiteOptions, run_server, run_site
    from fedmedclip.federation.server import ServerOptions
    from fedmedclip.federation.storage import open_store
    from fedmedclip.observer import NO_OBSERVER
    from mlops.tree import publish_tree, tree_files

    cfg = TrainConfig.from_json(json.loads(config_json)).validate()
    options = ServerOptions(**json.loads(server_json))
    if features_dir:
        copy_store_into_cache(features_dir, cfg.cache_dir)
    if role == SITE_ROLE:
        # Secure aggregation: the site's identity key is generated in its own private prefix (kept across runs)
        # and registered through the mailbox; the server takes the registered keys (docs/secure-aggregation.md).
        run_site(
            mailbox,
            run_id,
            party,
            **asdict(SiteOptions.of_run(cfg, options)),
            state_url=site_state_url(mailbox, index, run_id),
            progress=False,
            identity=site_state_url(mailbox, index, "identity.pem"),
            register_identity=cfg.secure_aggregation,
        )
        return ""
    published = Mailbox(open_store(mailbox), run_id).server_private().sub(RUN_DIR)
    try:
        done = read_run_dir_manifest(published, run_id)
    except ValueError as exc:  # never trusted: the run (finished, from its checkpoints) publishes it again
        log.warning("%s; publishing the run directory again", exc)
        done = None
    if done is not None:  # a retry after the run directory was published: nothing left to do
        return str(done.get("mlflow_run_id") or "")
    out = Path(tempfile.mkdtemp(prefix="fedmedclip-server-")) / "run"
    cfg.out = str(out)
    observer = NO_OBSERVER
    uri = tracking_uri or os.environ.get(WORKER_TRACKING_ENV) or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        from mlops.live import MlflowObserver

        run = pipeline_mlflow_run(cfg, run_id)
        observer = MlflowObserver(cfg, run_id, experiment, tracking_uri=uri, options=asdict(options), **run)
    site_keys = "mailbox" if cfg.secure_aggregation else None
    results = run_server(
        cfg, mailbox, run_id, out, None, options, observer, progress=False, site_keys=site_keys
    )
    if results is None:
        raise FedMedClipError(
            f"the server's state in {published.url} says run {run_id} is done, but its run directory was never "
            "published (the worker stopped in between); the run's results are in its checkpoint: start the "
            "run again under a new run id, or publish them from the checkpoint"
        )
    mlflow_run_id = observer.tracked_run_id or ""
    # Every file of the run directory, then its manifest: the report task reads it back, checked file by file.
    manifest = dict(format=RUN_DIR_FORMAT, run_id=run_id, files=tree_files(out), mlflow_run_id=mlflow_run_id)
    publish_tree(published, out, RUN_DIR_MANIFEST, manifest)
    return mlflow_run_id


def worker_component(
    extraction: str,
    config: str,
    server: str,
    role: str,
    party: str,
    index: int,
    run_id: str,
    mailbox: str,
    experiment: str,
    tracking_uri: str,
    local_stack: str,
) -> str:
    import logging
    import tempfile

    from components.kfp_components import act_as
    from components.worker.component import features_step, worker_step
    from fedmedclip.startup import resume_collection

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    act_as(party, local_stack)
    features = tempfile.mkdtemp(prefix="fedmedclip-features-")
    features_step(extraction, role, party, index, run_id, mailbox, features)
    resume_collection()  # the imports are done (components/__init__.py); the worker may run for days
    return worker_step(
        config, role, party, index, run_id, mailbox, features, server, experiment, tracking_uri
    )

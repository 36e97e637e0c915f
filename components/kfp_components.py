"""Kubeflow Pipelines v2 lightweight components: the federation runtime (fedmedclip.federation) as pipeline tasks.

The pipeline (pipelines/pipeline.py) is one graph for any number of sites and rounds:

    prepare ──► ParallelFor over the parties [server, site_0, site_1, ...]:
                    extract features (GPU, the party's own Secret) ──► federation worker (CPU, same Secret)
            ──► report (server's Secret) ──► export ONNX ──► register + promote (MLflow)

The workers of one run are long-lived and run at the same time: the server worker is `fedmedclip server run`
(`run_server`), each site worker is `fedmedclip site run` (`run_site`); they exchange codec payloads through the
mailbox (docs/contracts.md, "Federation runtime: the mailbox") under the run id = the KFP run id, so a retried
worker continues the run from its checkpoints in storage (the server's in the mailbox, a site's under its own
prefix `sites/<k>/private/<run>/`), never from the pod's disk. Rounds are a loop inside the workers, not tasks.

Two halves, in one module so that the image needs only this package:
- `*_step` functions: the work, plain Python on local paths (tests/test_pipeline_steps.py runs them in sequence).
- `*_component` functions: the KFP signatures. KFP ships only a component function's own source into the pod,
  so each body imports its step from this module (the image has the package). `components_for(base_image)`
  wraps them with `@dsl.component(base_image=..., install_kfp_package=False)`: no pip install at pod start.

Nothing here computes a round, selects a round or writes results.json: the server worker's FederationServer does
(fedmedclip/federation/records.py). The server worker uploads the run directory it wrote to its private area of the
mailbox (`runs/<run>/server/rundir/`, a manifest with every file's sha256 written last); the report task
downloads it with the server's credentials into the `run_dir` artifact.

No `from __future__ import annotations` here: KFP reads the component signatures' annotations as types.
"""

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

log = logging.getLogger("fedmedclip.pipeline")

DEFAULT_BASE_IMAGE = "ghcr.io/fedmedclip/train:0.1.0"
SERVER_ROLE = "server"
SITE_ROLE = "site"
RUN_DIR_PREFIX = "rundir"  # under the server's private area of the run: runs/<run>/server/rundir/
RUN_DIR_MANIFEST = f"{RUN_DIR_PREFIX}/manifest.json"
RUN_DIR_FORMAT = 1
# The Secret holding the MLflow user the pipeline logs and registers as (infra/training/mlflow-clients).
MLFLOW_SECRET_NAME = "fedmedclip-mlflow-pipeline"
MLFLOW_SECRET_KEYS = {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"}
# Where a worker pod finds the tracking server (from the endpoints ConfigMap): only the server role uses it.
WORKER_TRACKING_ENV = "FEDMEDCLIP_TRACKING_URI"

# ------------------------------------------------------------------------------- configuration <-> parameters
# Every TrainConfig field the pipeline takes, as a KFP parameter: (parameter, field, type). KFP parameters
# cannot be None, lists of floats or objects, so: alpha 0 = unset, preprocessing '' = the method's recipe,
# classes '' = inferred (else comma-separated), split "0.8,0.1,0.1", method options and the synthetic
# generator's arguments as JSON objects. `federation` (the pipeline trains federated) and `out` (the run
# directory is the task's artifact) are not parameters.
CONFIG_PARAMETERS = (
    ("data", "data", str),
    ("method", "method", str),
    ("partition", "partition", str),
    ("alpha", "alpha", float),
    ("sites", "sites", int),
    ("rounds", "rounds", int),
    ("backbone", "backbone", str),
    ("preprocessing", "preprocessing", str),
    ("seed", "seed", int),
    ("batch_size", "batch_size", int),
    ("codec_up", "codec_up", str),
    ("codec_down", "codec_down", str),
    ("split", "split_ratio", str),
    ("reference_fraction", "reference_fraction", float),
    ("transductive", "transductive", bool),
    ("prompt_template", "prompt_template", str),
    ("cache_dir", "cache_dir", str),
    ("skip_bad_images", "skip_bad_images", bool),
    ("classes", "classes", str),
    ("min_class_images", "min_class_images", int),
    ("allow_outside_root", "allow_outside_root", bool),
    ("threads", "threads", int),
    ("method_options", "method_options", str),
    ("synthetic", "synthetic", str),
    ("privacy", "privacy", str),
    ("secure_aggregation", "secure_aggregation", bool),
    ("secagg_threshold", "secagg_threshold", int),
)
# TrainConfig fields the pipeline sets itself; `aggregator` and `duplicates` are not parameters yet, so the
# pipeline's runs use their defaults (the method's mean; exact duplicates dropped).
NOT_PARAMETERS = ("federation", "out", "aggregator", "duplicates")
# What a holder's feature extraction depends on; its task's cache key is made of these alone (plus the
# holder), so a sweep over methods, learning rates, codecs or rounds reuses the extracted features.
EXTRACTION_FIELDS = (
    "data",
    "partition",
    "alpha",
    "sites",
    "seed",
    "split_ratio",
    "reference_fraction",
    "synthetic",
    "classes",
    "min_class_images",
    "allow_outside_root",
    "skip_bad_images",
    "backbone",
    "preprocessing",
    "prompt_template",
    "cache_dir",
)


def config_to_parameters(cfg) -> dict:
    """The pipeline parameters of a validated TrainConfig (what `pipeline run|submit` passes)."""
    params = {}
    for name, field, _ in CONFIG_PARAMETERS:
        value = getattr(cfg, field)
        if field == "alpha":
            value = float(value or 0.0)
        elif field == "preprocessing":
            value = value or ""
        elif field == "classes":
            value = ",".join(value) if value else ""
        elif field == "split_ratio":
            value = ",".join(repr(float(x)) for x in value)
        elif field in ("method_options", "synthetic", "privacy"):
            value = json.dumps(value or {}, sort_keys=True)
        elif field == "secagg_threshold":
            value = int(value or 0)
        params[name] = value
    return params


def config_from_parameters(params: dict):
    """The validated TrainConfig of the pipeline parameters (the prepare task; ConfigError names the problem)."""
    from fedmedclip.config import TrainConfig
    from fedmedclip.errors import ConfigError
    from fedmedclip.flags import parse_split

    values = {"federation": "federated", "out": ""}
    for name, field, _ in CONFIG_PARAMETERS:
        if name not in params:
            continue
        value = params[name]
        if field == "alpha":
            value = float(value) or None
        elif field == "preprocessing":
            value = value or None
        elif field == "classes":
            value = [c.strip() for c in str(value).split(",") if c.strip()] or None
        elif field == "secagg_threshold":
            value = int(value) or None
        elif field == "split_ratio":
            value = parse_split(value)
        elif field in ("method_options", "synthetic", "privacy"):
            try:
                value = json.loads(value or "{}")
            except ValueError as exc:
                raise ConfigError(f"{name} {params[name]!r} is not JSON: {exc}") from None
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a JSON object, got {params[name]!r}")
        values[field] = value
    return TrainConfig(**values).validate()


# ------------------------------------------------------------------------------------------- helpers
def act_as(role: str, local_stack: str) -> None:
    """Local runs only: take `role`'s S3 credentials from the local stack recorded in `local_stack` (each task
    its own role, as each pod in a cluster gets only its own Secret). With '' the environment is kept."""
    if not local_stack:
        return
    from components.stack import read_state

    info = read_state(local_stack)
    if info is None:
        from fedmedclip.errors import ConfigError

        raise ConfigError(
            f"local_stack {local_stack!r}: no local stack is recorded there (`fedmedclip stack up`)"
        )
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL"):
        os.environ.pop(key, None)
    if role != SERVER_ROLE:
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # nothing of a site goes to the central MLflow
    os.environ.update(info.role_env(role))


def _copy_store_into_cache(features_dir: str, cache_dir: str) -> None:
    """The extraction task's feature store, where the worker's own preparation looks it up (cache_dir/features/
    <digest[:24]>, the core's layout): the worker then reuses it instead of encoding again."""
    src = Path(features_dir)
    prov = src / "provenance.json"
    if not prov.is_file():
        return
    digest = json.loads(prov.read_text())["digest"]
    dst = Path(cache_dir) / "features" / digest[:24]
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
    which only its role may read (components/policies.py)."""
    return f"{mailbox.rstrip('/')}/sites/{int(index)}/private/{run_id}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------- steps
def resolve_mailbox(mailbox: str, data: str) -> str:
    """The mailbox parameter, '' meaning the data's bucket (s3:// data); ConfigError when there is none, or when
    a local directory would have to be shared by pods."""
    from fedmedclip.errors import ConfigError

    mailbox = mailbox or (data.rstrip("/") if data.startswith("s3://") else "")
    if not mailbox:
        raise ConfigError(
            "no mailbox: pass mailbox=s3://BUCKET[/PREFIX] (the parties exchange their modules there; with "
            "data=s3://BUCKET it defaults to the data's bucket)"
        )
    if "://" not in mailbox and os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise ConfigError(
            f"mailbox {mailbox!r} is a local directory, which pods do not share: use s3://BUCKET[/PREFIX]"
        )
    return mailbox


def prepare_step(params: dict, site_names: str, mailbox: str) -> list:
    """Validate the configuration and draw the partition (as the server's holder would); returns the parties of
    the federation, each item carrying what its extraction and its worker need (kfp.local iterates only over a
    task's single `Output`, so the loop's items carry the resolved configuration too)."""
    from components.sites import SERVER_SECRET_NAME, site_secret_name
    from fedmedclip.errors import ConfigError
    from fedmedclip.methods import METHODS
    from fedmedclip.preparation import load_image_set, partition_for
    from fedmedclip.sources import is_remote, remote_source

    cfg = config_from_parameters(params)
    image_set = load_image_set(cfg)
    part = partition_for(cfg, image_set)
    if is_remote(cfg.data):
        remote_source(cfg.data).check_partition(cfg, part)
    names = [s.strip() for s in site_names.split(",") if s.strip()]
    if names and names != part.site_names:
        raise ConfigError(
            f"site_names {names} are not the partition's sites {part.site_names} (the data's site column for "
            "--partition natural, site_0, site_1, ... otherwise)"
        )
    mailbox = resolve_mailbox(mailbox, cfg.data)
    resolved = cfg.to_json()
    resolved["preprocessing"] = cfg.preprocessing or METHODS[cfg.method].default_preprocessing
    extraction = {k: resolved[k] for k in EXTRACTION_FIELDS}
    parties = [{"role": SERVER_ROLE, "party": SERVER_ROLE, "index": -1, "secret": SERVER_SECRET_NAME}] + [
        {"role": SITE_ROLE, "party": s, "index": k, "secret": site_secret_name(k)}
        for k, s in enumerate(part.site_names)
    ]
    config, extraction = json.dumps(resolved, sort_keys=True), json.dumps(extraction, sort_keys=True)
    for p in parties:
        # A site reads no MLflow credentials: its "tracking secret" is its own S3 Secret, which holds no
        # username/password keys (mounted optional: the variables stay unset). Only the server logs centrally.
        p["tracking_secret"] = MLFLOW_SECRET_NAME if p["role"] == SERVER_ROLE else p["secret"]
        p.update(config=config, extraction=extraction, mailbox=mailbox)
    return parties


def extract_step(extraction_json: str, role: str, holder: str, index: int, features_dir: str) -> dict:
    """Encode one holder's own images (the server: global test + reference sets; a site: its train/val/test)
    into a feature store, exactly as the worker's preparation would; returns its provenance."""
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
    out = Path(features_dir)
    shutil.copytree(store.path, out, dirs_exist_ok=True)
    return store.provenance


def _server_options(quorum: int, round_timeout: float, join_timeout: float):
    from fedmedclip.federation.server import ServerOptions

    return ServerOptions(quorum=quorum or None, round_timeout=round_timeout, join_timeout=join_timeout)


def pipeline_run_name(cfg, kfp_run_id: str) -> str:
    """The MLflow run's name for a pipeline run: what it is, then the KFP run it belongs to."""
    return f"{cfg.method}-{cfg.sites}sites-{cfg.rounds}r-kfp-{kfp_run_id[:8]}"


def worker_step(
    config_json: str,
    role: str,
    party: str,
    index: int,
    run_id: str,
    mailbox: str,
    features_dir: str | None,
    quorum: int = 0,
    round_timeout: float = 600.0,
    join_timeout: float = 3600.0,
    experiment: str = "fedmedclip",
    tracking_uri: str = "",
    kfp_run_id: str = "",
) -> str:
    """One party of the federation, until the run ends: the server (aggregates, evaluates, writes the run
    directory, then uploads it to its private area of the mailbox) or site `party` (trains on its own data).
    Started again after a failure (a KFP retry), it continues from its last checkpoint. Returns the MLflow
    run id of the server's live tracking ('' for a site or without tracking)."""
    from fedmedclip.config import TrainConfig
    from fedmedclip.federation.runner import run_server, run_site

    cfg = TrainConfig.from_json(json.loads(config_json)).validate()
    if features_dir:
        _copy_store_into_cache(features_dir, cfg.cache_dir)
    if role == SITE_ROLE:
        # Secure aggregation: the site's identity key is generated in its own private prefix (kept across runs)
        # and registered through the mailbox; the server takes the registered keys (docs/secure-aggregation.md).
        run_site(
            mailbox,
            run_id,
            party,
            data=cfg.data,
            cache_dir=cfg.cache_dir,
            state_url=site_state_url(mailbox, index, run_id),
            threads=cfg.threads,
            join_timeout=join_timeout,
            progress=False,
            identity=f"{mailbox.rstrip('/')}/sites/{int(index)}/private/identity.pem",
            register_identity=cfg.secure_aggregation,
        )
        return ""
    from fedmedclip.federation.mailbox import Mailbox
    from fedmedclip.federation.storage import open_store

    private = Mailbox(open_store(mailbox), run_id).server_private()
    done = private.get(RUN_DIR_MANIFEST)
    if done is not None:  # a retry after the run directory was published: nothing left to do
        return json.loads(done).get("mlflow_run_id", "")
    out = Path(tempfile.mkdtemp(prefix="fedmedclip-server-")) / "run"
    cfg.out = str(out)
    observer = None
    options = _server_options(quorum, round_timeout, join_timeout)
    uri = tracking_uri or os.environ.get(WORKER_TRACKING_ENV) or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        from dataclasses import asdict

        from components.observer import MlflowObserver

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
    results = run_server(
        cfg, mailbox, run_id, out, None, options, observer, progress=False, site_keys=site_keys
    )
    if results is None:
        from fedmedclip.errors import FedMedClipError

        raise FedMedClipError(
            f"the server's state in {private.url} says run {run_id} is done, but its run directory was never "
            "published (the worker stopped in between); the run's results are in its checkpoint: start the "
            "run again under a new run id, or publish them from the checkpoint"
        )
    _complete_run_dir(out, cfg, Mailbox(open_store(mailbox), run_id))
    mlflow_run_id = (observer.mlflow_run_id or "") if observer is not None else ""
    publish_run_dir(out, private, run_id, mlflow_run_id)
    return mlflow_run_id


def _complete_run_dir(out: Path, cfg, mailbox) -> None:
    """A server worker restarted in a fresh pod holds only what it wrote since: the files written at the run's
    start and the global modules of earlier rounds come back from the configuration and the mailbox (the very
    bytes the run directory keeps, docs/contracts.md)."""
    from fedmedclip.federation.records import atomic_write_bytes, atomic_write_json

    if not (out / "config.json").exists():
        atomic_write_json(out / "config.json", cfg.to_json())
    if not (out / "partition.json").exists():
        from fedmedclip.preparation import load_image_set, partition_for

        partition_for(cfg, load_image_set(cfg)).save(out / "partition.json")
    for r in range(1, int(cfg.rounds) + 1):
        path = out / "rounds" / f"global_round_{r:03d}.bin"
        if not path.exists():
            payload = mailbox.store.get(mailbox.global_key(r))
            if payload is not None:
                atomic_write_bytes(path, payload)


def publish_run_dir(out: Path, store, run_id: str, mlflow_run_id: str = "") -> dict:
    """Upload the run directory under `rundir/` of the server's private store, then its manifest (every file's
    sha256 and size): a reader that finds the manifest finds every file. No listing is needed to read it back."""
    files = {}
    for path in sorted(p for p in Path(out).rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # an interrupted atomic write's leftovers
        data = path.read_bytes()
        store.put(f"{RUN_DIR_PREFIX}/{rel}", data)
        files[rel] = {"sha256": _sha256(data), "bytes": len(data)}
    manifest = {"format": RUN_DIR_FORMAT, "run_id": run_id, "files": files, "mlflow_run_id": mlflow_run_id}
    store.put(RUN_DIR_MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def report_step(mailbox: str, run_id: str, run_dir: str) -> tuple[dict, str]:
    """Download the run directory the server worker published (checked against its manifest) into `run_dir`;
    returns results.json and the MLflow run id of the live tracking ('' without)."""
    from fedmedclip.errors import FedMedClipError
    from fedmedclip.federation.mailbox import Mailbox
    from fedmedclip.federation.storage import check_key, open_store

    mb = Mailbox(open_store(mailbox), run_id)
    private = mb.server_private()
    raw = private.get(RUN_DIR_MANIFEST)
    if raw is None:
        status = mb.status(SERVER_ROLE) or {}
        raise FedMedClipError(
            f"run {run_id}: the server worker published no run directory ({private.where(RUN_DIR_MANIFEST)} is "
            f"missing; server status: {status.get('state', 'none')} {status.get('message', '')})"
        )
    manifest = json.loads(raw)
    if manifest.get("run_id") != run_id or manifest.get("format") != RUN_DIR_FORMAT:
        raise FedMedClipError(
            f"{private.where(RUN_DIR_MANIFEST)} is not run {run_id}'s run directory manifest"
        )
    out = Path(run_dir)
    for rel, meta in sorted(manifest["files"].items()):
        key = check_key(f"{RUN_DIR_PREFIX}/{rel}")  # confined: no '..', no absolute path
        data = private.get(key)
        if data is None or _sha256(data) != meta["sha256"]:
            raise FedMedClipError(
                f"{private.where(key)} is {'missing' if data is None else 'not the file the server published'}"
            )
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    results = json.loads((out / "results.json").read_text())
    return results, manifest.get("mlflow_run_id", "")


def export_step(run_dir: str, site: str, onnx_dir: str) -> str:
    """ONNX export of `site` ("global" or a site name) of the run; '' skips. Returns the file or ''."""
    out = Path(onnx_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not site:
        log.info("export skipped: export_site is empty")
        return ""
    from fedmedclip.export import export_onnx

    return str(export_onnx(run_dir, site, out / "model.onnx"))


PROMOTED, REFUSED, NOT_PROMOTED = "promoted", "refused", "not promoted"


def register_step(
    run_dir: str,
    onnx_dir: str,
    mlflow_run_id: str,
    tracking_uri: str,
    experiment: str,
    model_name: str,
    alias: str,
    allow_worse: bool,
    allow_different_data: bool = False,
    kfp_run_id: str = "",
    fail_if_not_promoted: bool = False,
) -> tuple[str, str]:
    """Register a model version from the run's MLflow run (the one the server logged live; logged now from the
    run directory if the live logging could not reach MLflow), with the ONNX file when there is one, and
    promote it. Returns (model URI, promotion outcome): the URI is '' when no tracking server is configured
    (registration skipped); the outcome is `promoted`, `refused: <why>` or `not promoted (...)`.

    Idempotent (KFP retries this task): the registration is keyed on the MLflow run and the ONNX file, so a
    retry finds its own version; promoting a version that already holds the alias changes nothing. A refused
    promotion leaves the version registered, is logged as an error line and returned as the outcome, and fails
    the task when `fail_if_not_promoted` (the operator's choice: the run then ends red in the KFP UI)."""
    from fedmedclip.errors import FedMedClipError

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        log.warning("registration skipped: no tracking_uri parameter and no MLFLOW_TRACKING_URI")
        return "", f"{NOT_PROMOTED} (no tracking server)"
    from components.tracking import PromotionRefused, log_run_dir, promote, register_model

    if not mlflow_run_id:
        from fedmedclip.config import TrainConfig

        cfg = TrainConfig.from_json(json.loads((Path(run_dir) / "config.json").read_text()))
        mlflow_run_id = log_run_dir(
            run_dir,
            experiment,
            tracking_uri=uri,
            run_name=pipeline_run_name(cfg, kfp_run_id) if kfp_run_id else None,
            tags={"orchestrator": "kubeflow-pipelines"},
            kfp_run_id=kfp_run_id or None,
            record_run_dir=False,
            source="kubeflow pipeline fedmedclip",
        )
    onnx = Path(onnx_dir) / "model.onnx"
    version = register_model(mlflow_run_id, model_name, onnx if onnx.exists() else None, tracking_uri=uri)
    log.info(
        "%s %s from MLflow run %s",
        "already registered:" if version.existing else "registered",
        version.uri,
        mlflow_run_id,
    )
    if not alias:
        return version.uri, f"{NOT_PROMOTED} (no alias asked for)"
    try:
        done = promote(
            model_name,
            version.version,
            alias,
            allow_worse,
            tracking_uri=uri,
            allow_different_data=allow_different_data,
        )
    except PromotionRefused as e:
        # The version stays registered; promoting a worse model, or one trained on other data, is a human
        # decision (allow_worse, allow_different_data).
        outcome = f"{REFUSED}: {e}"
        log.error(
            "PROMOTION REFUSED: %s version %s stays registered, not @%s: %s",
            model_name,
            version.version,
            alias,
            e,
        )
        if fail_if_not_promoted:
            raise FedMedClipError(
                f"promotion refused (fail_if_not_promoted is set): {e}; {version.uri} stays registered"
            ) from e
        return version.uri, outcome
    log.info(done.describe())
    return f"models:/{model_name}@{alias}", PROMOTED


# ------------------------------------------------------------------------------------------- KFP components
# Bodies import their step: KFP serialises only the function's source into the pod.
def prepare_component(
    data: str,
    method: str,
    partition: str,
    alpha: float,
    sites: int,
    rounds: int,
    backbone: str,
    preprocessing: str,
    seed: int,
    batch_size: int,
    codec_up: str,
    codec_down: str,
    split: str,
    reference_fraction: float,
    transductive: bool,
    prompt_template: str,
    cache_dir: str,
    skip_bad_images: bool,
    classes: str,
    min_class_images: int,
    allow_outside_root: bool,
    threads: int,
    method_options: str,
    synthetic: str,
    privacy: str,
    secure_aggregation: bool,
    secagg_threshold: int,
    site_names: str,
    mailbox: str,
    local_stack: str,
) -> list:
    from components.kfp_components import CONFIG_PARAMETERS, SERVER_ROLE, act_as, prepare_step

    act_as(SERVER_ROLE, local_stack)  # s3:// data: the server reads server/published.json
    values = locals()
    return prepare_step({name: values[name] for name, _, _ in CONFIG_PARAMETERS}, site_names, mailbox)


def extract_component(
    extraction: str, role: str, party: str, index: int, local_stack: str, features: Output[Artifact]
):
    from components.kfp_components import act_as, extract_step

    act_as(party, local_stack)
    prov = extract_step(extraction, role, party, index, features.path)
    features.metadata.update({"holder": party, "digest": prov["digest"], "images": prov["n_images"]})


def worker_component(
    config: str,
    role: str,
    party: str,
    index: int,
    run_id: str,
    mailbox: str,
    features: Input[Artifact],
    quorum: int,
    round_timeout: float,
    join_timeout: float,
    experiment: str,
    tracking_uri: str,
    local_stack: str,
) -> str:
    import logging

    from components.kfp_components import act_as, worker_step

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
        quorum,
        round_timeout,
        join_timeout,
        experiment,
        tracking_uri,
        run_id,
    )


def report_component(
    mailbox: str,
    data: str,
    run_id: str,
    local_stack: str,
    run_dir: Output[Artifact],
    metrics: Output[Metrics],
) -> str:
    from components.kfp_components import SERVER_ROLE, act_as, report_step, resolve_mailbox

    act_as(SERVER_ROLE, local_stack)
    results, mlflow_run_id = report_step(resolve_mailbox(mailbox, data), run_id, run_dir.path)
    m = results["metrics"]
    metrics.log_metric("best_round", m["best_round"])
    for k in ("acc", "bacc", "f1", "ece"):
        for name, value in ((f"global_{k}", m["global"].get(k)), (f"site_mean_{k}", m["site_mean"].get(k))):
            if value is not None:
                metrics.log_metric(name, value)
    return mlflow_run_id


def export_component(run_dir: Input[Artifact], site: str, onnx: Output[Model]) -> str:
    from components.kfp_components import export_step

    path = export_step(run_dir.path, site, onnx.path)
    if path:
        from fedmedclip.digests import read_sha256_sidecar

        onnx.metadata.update({"framework": "onnx", "file": "model.onnx", "sha256": read_sha256_sidecar(path)})
    return path


def register_component(
    run_dir: Input[Artifact],
    onnx: Input[Model],
    mlflow_run_id: str,
    tracking_uri: str,
    experiment: str,
    model_name: str,
    alias: str,
    allow_worse: bool,
    allow_different_data: bool,
    fail_if_not_promoted: bool,
    kfp_run_id: str,
) -> NamedTuple("RegisterOutputs", [("model_uri", str), ("promotion", str)]):  # noqa: F821
    from typing import NamedTuple

    from components.kfp_components import register_step

    model_uri, promotion = register_step(
        run_dir.path,
        onnx.path,
        mlflow_run_id,
        tracking_uri,
        experiment,
        model_name,
        alias,
        allow_worse,
        allow_different_data,
        kfp_run_id,
        fail_if_not_promoted,
    )
    # the functional form: this body runs in the pod without this module's names
    outputs = NamedTuple("RegisterOutputs", [("model_uri", str), ("promotion", str)])  # noqa: UP014
    return outputs(model_uri, promotion)


# What every input and output of the pipeline and its components means: ONE table, from which the pipeline's
# and each component's docstring `Args:` / `Returns:` sections are written (KFP shows them in its UI).
PARAMETER_DOCS = {
    # the run's configuration (fedmedclip/flags.py: the same as `fedmedclip train`)
    "data": "Images: s3://BUCKET published per site by `fedmedclip data publish` (each party reads only its own "
    "prefix), or synthetic, an image folder or a CSV manifest readable in the pods.",
    "method": "The method (`fedmedclip methods` lists them and their options).",
    "partition": "iid, dirichlet (with alpha) or natural (the manifest's site column).",
    "alpha": "Dirichlet concentration (smaller = more label skew); 0 = unset.",
    "sites": "Number of sites (the partition's; any number: each is one iteration of the workers' loop).",
    "site_names": "Comma-separated site names to check against the partition's ('' = the partition's).",
    "rounds": "Federated rounds (a loop inside the workers: any number).",
    "backbone": "tiny | random-vit-b32 | random-vit-b16 | s3://BUCKET/PREFIX or models:/NAME/VERSION published by "
    "`fedmedclip backbone push` (downloaded once per pod, hash-checked).",
    "preprocessing": "squash or clip; '' = the method's recipe.",
    "seed": "Seed of the partition and of every random draw.",
    "batch_size": "Training batch size.",
    "codec_up": "How a site's update travels to the server.",
    "codec_down": "How the global module travels to the sites.",
    "split": "Per-site train,val,test shares, e.g. 0.8,0.1,0.1.",
    "reference_fraction": "Share of the training pool held out, unlabelled, as FACMIC's adaptation target.",
    "transductive": "FACMIC adapts toward the global test images (only to match the paper).",
    "prompt_template": "Class prompt; {} is the class name.",
    "cache_dir": "Feature stores, downloads and backbones inside each pod.",
    "skip_bad_images": "Skip unreadable images (counted, ids recorded) instead of failing.",
    "classes": "Comma-separated class list ('' = inferred from the data).",
    "min_class_images": "With an inferred class list, the fewest training images a class may have.",
    "allow_outside_root": "Allow manifest rows that resolve outside the manifest's folder.",
    "threads": "Torch threads of each worker.",
    "method_options": 'Method options as a JSON object, e.g. {"lr_fam": 5e-4} (`fedmedclip methods`).',
    "synthetic": "Arguments of the synthetic data generator as a JSON object.",
    "privacy": "Differential privacy settings as a JSON object (the --dp-* flags, docs/privacy.md), e.g. "
    '{"target_epsilon": 8}; {} = none.',
    "secure_aggregation": "Secure aggregation (docs/secure-aggregation.md): the server sees only the sum of the "
    "sites' updates; each site's identity key is generated in its private state and registered through the "
    "mailbox.",
    "secagg_threshold": "Secure aggregation's threshold t (above half the sites); 0 = floor(sites/2) + 1.",
    # the federation
    "mailbox": "Where the parties exchange modules: s3://BUCKET[/PREFIX]; '' = the data's bucket.",
    "quorum": "Fewest sites a round may aggregate once it times out; 0 = every site.",
    "round_timeout": "Seconds a round waits for the sites' updates.",
    "join_timeout": "Seconds round 1 waits while the sites prepare (a site whose pod never starts fails the "
    "run after this, naming it).",
    "run_id": "The federation's run id in the mailbox: the KFP run id, so a retried worker resumes.",
    "role": "The party's role: server or site.",
    "party": "The party's name: server, or the site's name in the partition.",
    "index": "The site's data index k (its prefix sites/<k>/); -1 for the server.",
    "secret": "The Kubernetes Secret with this party's own S3 key (fedmedclip-site-<k>-s3, fedmedclip-server-s3).",
    "tracking_secret": "The Secret with the MLflow user (the server's item); a site's names its own S3 Secret, "
    "which has no MLflow keys, so no site pod holds MLflow credentials.",
    "extraction": "The extraction settings as JSON (data, partition, backbone, preprocessing, prompt, cache): "
    "the extraction task's cache key, so a sweep over methods or rounds reuses the features.",
    "config": "The run's resolved configuration as JSON (fedmedclip.config.TrainConfig).",
    "features": "The party's feature store (its own images encoded once by the frozen CLIP).",
    # export, tracking, registry
    "export_site": "Model exported to ONNX: global, a site name, or '' (no export).",
    "site": "Model exported to ONNX: global, a site name, or '' (no export).",
    "tracking_uri": "MLflow server; '' = the endpoints ConfigMap's MLFLOW_TRACKING_URI (none: no tracking).",
    "experiment": "MLflow experiment of the run.",
    "model_name": "Registered model name.",
    "promote_alias": "Alias the new version is promoted to ('' registers only).",
    "alias": "Alias the new version is promoted to ('' registers only).",
    "allow_worse": "Promote even when its global balanced accuracy is below the alias holder's.",
    "allow_different_data": "Promote even when the alias holder was trained on other data or partition.",
    "fail_if_not_promoted": "Fail the run (red in the KFP UI) when the promotion is refused; by default the "
    "version stays registered, the refusal is the register task's `promotion` output and an error line.",
    "mlflow_run_id": "The MLflow run the server logged live ('' = log the run directory now).",
    "kfp_run_id": "The KFP run id, recorded on the MLflow run (tag kfp.run_id).",
    "local_stack": "Local runs only: the local stack directory whose per-role keys each task takes ('' in a "
    "cluster, where each task gets its own Secret).",
    # outputs
    "Output": "",
    "run_dir": "The run directory the server worker wrote (docs/contracts.md): results.json, plots, model/.",
    "metrics": "The selected round's global and site-mean metrics.",
    "onnx": "The exported ONNX model (model.onnx, uint8 images in, probabilities and class index out).",
    "model_uri": "The registered model: models:/NAME@ALIAS when promoted, models:/NAME/VERSION otherwise, '' "
    "without a tracking server.",
    "promotion": "promoted, refused: <why> (the version stays registered), or not promoted (<why>).",
}
_RETURNS = {
    "prepare": "The parties [server, site_0, ...], each item carrying its role, name, Secret and settings.",
    "worker": "The MLflow run id of the server's live tracking ('' for a site or without tracking).",
    "report": "The MLflow run id of the server's live tracking ('' without).",
    "export": "The ONNX file's path inside the artifact ('' when skipped).",
}
_SUMMARIES = {
    "prepare": "Validate the configuration, draw the partition and list the federation's parties.",
    "extract": "Encode one party's own images once with the frozen CLIP (the only GPU task).",
    "worker": "One party's long-lived federation worker: the server (aggregates) or a site (trains on its own "
    "data); runs until the federation ends, resumes after a retry.",
    "report": "Download the run directory the server worker published, checked file by file.",
    "export": "Export the run's global or a site's predictor to one ONNX file.",
    "register": "Register the run's model in MLflow (keyed on the run: a retry finds its version) and promote "
    "it to the alias when it is at least as good as the holder.",
}


def documented(func, summary: str, returns: str = ""):
    """`func` with a docstring whose Args (inputs) and Returns (outputs) sections come from PARAMETER_DOCS:
    what KFP shows for each input and output. A name missing from the table is an error (tested)."""
    import inspect

    inputs, outputs = [], []
    for name, param in inspect.signature(func).parameters.items():
        annotation = str(param.annotation)
        (outputs if "Output" in annotation else inputs).append(name)
    ret = inspect.signature(func).return_annotation
    fields = getattr(ret, "_fields", None)
    if fields:
        outputs += list(fields)
    lines = [summary, "", "Args:"]
    lines += [f"    {n}: {PARAMETER_DOCS[n]}" for n in inputs]
    described = [(n, PARAMETER_DOCS[n]) for n in outputs] + ([("Output", returns)] if returns else [])
    if described:
        lines += ["", "Returns:"] + [f"    {n}: {d}" for n, d in described]
    func.__doc__ = "\n".join(lines) + "\n"
    return func


_COMPONENT_FUNCS = {
    "prepare": prepare_component,
    "extract": extract_component,
    "worker": worker_component,
    "report": report_component,
    "export": export_component,
    "register": register_component,
}
for _name, _func in _COMPONENT_FUNCS.items():
    documented(_func, _SUMMARIES[_name], _RETURNS.get(_name, ""))


@functools.cache
def components_for(base_image: str = DEFAULT_BASE_IMAGE) -> SimpleNamespace:
    """The components built on `base_image` (our training image; compile option --base-image)."""
    return SimpleNamespace(
        **{
            name: dsl.component(fn, base_image=base_image, install_kfp_package=False)
            for name, fn in _COMPONENT_FUNCS.items()
        }
    )

"""What the Kubeflow Pipelines v2 lightweight components share: the federation runtime (fedmedclip.federation)
as pipeline tasks, one folder per component (components/<name>/: component.py, README.md, its tests).

The pipeline (pipelines/pipeline.py) is one graph for any number of sites and rounds:

    prepare ──► ParallelFor over the parties [server, site_0, site_1, ...]:
                    extract features (GPU, the party's own Secret) ──► federation worker (CPU, same Secret)
            ──► report (server's Secret) ──► export ONNX ──► register + promote (MLflow)

The workers of one run are long-lived and run at the same time: the server worker is `fedmedclip server run`
(`run_server`), each site worker is `fedmedclip site run` (`run_site`); they exchange codec payloads through the
mailbox (docs/contracts.md, "Federation runtime: the mailbox") under the run id = the KFP run id, so a retried
worker continues the run from its checkpoints in storage (the server's in the mailbox, a site's under its own
prefix `sites/<k>/private/<run>/`), never from the pod's disk. Rounds are a loop inside the workers, not tasks.

Each component.py has two halves:
- `<name>_step`: the work, plain Python on local paths (tests/test_pipeline_steps.py runs them in sequence);
- `<name>_component`: the KFP signature. KFP ships only a component function's own source into the pod, so
  each body imports its step (the image has the package). `components_for(base_image)` builds them.
This module holds what they share: the roles and Secrets, the configuration <-> parameters mapping, `act_as`
(local runs: each task its own role's key), and the one table documenting every input and output.

Nothing here computes a round, selects a round or writes results.json: the server worker's FederationServer does
(fedmedclip/federation/records.py). The server worker uploads the run directory it wrote to its private area of the
mailbox (`runs/<run>/server/rundir/`, a manifest with every file's sha256 written last: mlops/tree.py); the
report task downloads it with the server's credentials into the `run_dir` artifact.

No `from __future__ import annotations` here: KFP reads the component signatures' annotations as types.
"""

import functools
import json
import os
from types import SimpleNamespace

from kfp import dsl

DEFAULT_BASE_IMAGE = "ghcr.io/fedmedclip/train:0.1.0"
SERVER_ROLE = "server"
SITE_ROLE = "site"
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
# TrainConfig fields the pipeline sets itself; `aggregator`, `duplicates` and `encoder_engine` are not
# parameters yet, so the pipeline's runs use their defaults (the method's mean; exact duplicates dropped; the
# image encoder on ONNX Runtime for a CLIP-sized backbone, which gives the features PyTorch gives to 1e-4).
NOT_PARAMETERS = ("federation", "out", "aggregator", "duplicates", "encoder_engine")
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
    from devstack.stack import read_state

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


def pipeline_run_name(cfg, kfp_run_id: str) -> str:
    """The MLflow run's name for a pipeline run: what it is, then the KFP run it belongs to."""
    return f"{cfg.method}-{cfg.sites}sites-{cfg.rounds}r-kfp-{kfp_run_id[:8]}"


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


NAMES = (
    "prepare",
    "extract",
    "worker",
    "report",
    "export",
    "register",
)  # one folder each: components/<name>/


def component_functions() -> dict:
    """Each component's KFP function (components/<name>/component.py), documented from PARAMETER_DOCS."""
    import importlib

    funcs = {
        n: getattr(importlib.import_module(f"components.{n}.component"), f"{n}_component") for n in NAMES
    }
    for name, func in funcs.items():
        documented(func, _SUMMARIES[name], _RETURNS.get(name, ""))
    return funcs


@functools.cache
def components_for(base_image: str = DEFAULT_BASE_IMAGE) -> SimpleNamespace:
    """The components built on `base_image` (our training image; compile option --base-image):
    `@dsl.component(base_image=..., install_kfp_package=False)`, so no pip install at pod start."""
    return SimpleNamespace(
        **{
            name: dsl.component(fn, base_image=base_image, install_kfp_package=False)
            for name, fn in component_functions().items()
        }
    )

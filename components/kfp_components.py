"""What the components (components/<name>/component.py: `<name>_step`, the work on local paths, and
`<name>_component`, the KFP signature) share: the roles and Secrets, the pipeline's `settings` <-> the
configuration, `act_as` and the one table documenting every input and output."""

import functools
import os
from types import SimpleNamespace

from components import run_parameters
from fedmedclip import __version__

DEFAULT_BASE_IMAGE = f"ghcr.io/fedmedclip/train:{__version__}"
SERVER_ROLE = "server"
SITE_ROLE = "site"
# The Secret holding the MLflow user the pipeline logs and registers as (infra/training/mlflow-clients).
MLFLOW_SECRET_NAME = "fedmedclip-mlflow-pipeline"
MLFLOW_SECRET_KEYS = {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"}
# Where a worker pod finds the tracking server (from the endpoints ConfigMap): only the server role uses it.
WORKER_TRACKING_ENV = "FEDMEDCLIP_TRACKING_URI"
POD_CACHE_DIR = "/tmp/fedmedclip-cache"  # inside each pod: under the training image's HOME, /tmp


def pipeline_settings(cfg, options=None) -> dict:
    """The pipeline's `settings` parameter of a TrainConfig and ServerOptions (default: the declared options)."""
    from fedmedclip.federation.server import ServerOptions
    from fedmedclip.flags import to_parameters

    return {**to_parameters(cfg), **to_parameters(options or ServerOptions())}


def settings_from_parameters(settings: dict, config_cls=None):
    """(validated TrainConfig, ServerOptions) of the pipeline's `settings`; ConfigError names the problem.
    Without a `cache_dir`, the pod's own (POD_CACHE_DIR)."""
    from fedmedclip.config import TrainConfig
    from fedmedclip.federation.server import ServerOptions
    from fedmedclip.flags import PIPELINE, check_declared, from_parameters

    settings = {"cache_dir": POD_CACHE_DIR, **settings} if isinstance(settings, dict) else settings
    cfg, options = from_parameters(settings, config_cls or TrainConfig, ServerOptions, command=PIPELINE)
    cfg.federation, cfg.out = "federated", ""
    check_declared(options)
    return cfg.validate(), options


def resolved_config(cfg) -> tuple[dict, dict]:
    """The run's configuration as the parties get it (the method's preprocessing filled in), and the fields its
    feature extraction depends on (declared `extraction=True`: the key of the features a party publishes)."""
    from fedmedclip.flags import declared
    from fedmedclip.methods import resolved_preprocessing

    resolved = cfg.to_json()
    resolved["preprocessing"] = resolved_preprocessing(cfg)
    fields = declared(type(cfg), nested=False)
    return resolved, {d.name: resolved[d.name] for d in fields if d.meta["extraction"]}


def act_as(role: str, local_stack: str) -> None:
    """Local runs only: take `role`'s S3 credentials from the local stack recorded in `local_stack` (each task
    its own role, as each pod in a cluster gets only its own Secret). With '' the environment is kept."""
    if not local_stack:
        return
    from devstack.stack import read_state
    from fedmedclip.errors import ConfigError

    info = read_state(local_stack)
    if info is None:
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


def pipeline_mlflow_run(cfg, kfp_run_id: str) -> dict:
    """How a pipeline run's MLflow run is logged, live by the server worker or afterwards by register: named for
    what it is, then the KFP run it belongs to, and without the pod's temporary run directory, which means
    nothing to a reader."""
    return dict(
        run_name=f"{cfg.method}-{cfg.sites}sites-{cfg.rounds}r-kfp-{kfp_run_id[:8]}" if kfp_run_id else None,
        kfp_run_id=kfp_run_id or None,
        source="kubeflow pipeline fedmedclip",
        record_run_dir=False,
    )


# What every input and output of the pipeline and its components means: ONE table, from which the pipeline's
# and each component's docstring `Args:` / `Returns:` sections are written (KFP shows them in its UI).
PARAMETER_DOCS = {
    "settings": "The run's settings as one object, keyed by field name: the fields of `fedmedclip train` (all "
    "but federation and out; `--split` is split_ratio, the `--dp-*` flags are entries of privacy) and the server's "
    'options (tests/config_schema.json lists them), e.g. {"data": "s3://BUCKET", "method": "facmic", '
    '"sites": 5, "rounds": 20, "method_options": {"lr_fam": 5e-4}, "privacy": {"target_epsilon": 8}, '
    '"round_timeout": 600}; a key left out takes its default.',
    "run_id": "The federation's run id in the mailbox: the KFP run id, so a retried worker resumes.",
    "role": "The party's role: server or site.",
    "party": "The party's name: server, or the site's name in the partition.",
    "index": "The site's data index k (its prefix sites/<k>/); -1 for the server.",
    "secret": "The Kubernetes Secret with this party's own S3 key (fedmedclip-site-<k>-s3, fedmedclip-server-s3).",
    "tracking_secret": "The Secret with the MLflow user (the server's item); a site's names its own S3 Secret, "
    "which has no MLflow keys, so no site pod holds MLflow credentials.",
    "extraction": "The extraction settings as JSON (data, partition, backbone, preprocessing, prompt, cache): "
    "what the party's features depend on; a retried worker fetches the features it published for them.",
    "config": "The run's resolved configuration as JSON (fedmedclip.config.TrainConfig).",
    "server": "The server's options as JSON (fedmedclip.federation.server.ServerOptions).",
    # the pipeline's own parameters are described by their declarations (components/run_parameters.py)
    **run_parameters.descriptions(),
    "mlflow_run_id": "The MLflow run the server logged live ('' = log the run directory now).",
    "kfp_run_id": "The KFP run id, recorded on the MLflow run (tag kfp.run_id).",
    "local_stack": "Local runs only: the local stack directory whose per-role keys each task takes ('' in a "
    "cluster, where each task gets its own Secret).",
    # outputs
    "Output": "",
    "run_dir": "The run directory the server worker wrote (docs/contracts.md): results.json, plots, model/.",
    "metrics": "The selected round's global and site-mean metrics.",
    "onnx": "The exported ONNX model (model.onnx: uint8 images in; probabilities and class index out, and with the OOD score ood_score and drift_embedding).",
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
    "worker": "One party of the federation in one task: its own images encoded once with the frozen CLIP (the "
    "only GPU work), then its long-lived worker, the server (aggregates) or a site (trains on its own data), "
    "until the federation ends; a retry fetches the features it published and resumes.",
    "report": "Download the run directory the server worker published, checked file by file.",
    "export": "Export the run's global or a site's predictor to one ONNX file.",
    "register": "Register the run's model in MLflow (keyed on the run: a retry finds its version) and promote "
    "it to the alias when it is at least as good as the holder.",
}
NAMES = tuple(_SUMMARIES)  # one folder each: components/<name>/


def documented(func, summary: str, returns: str = ""):
    """`func` with a docstring whose Args (inputs) and Returns (outputs) sections come from PARAMETER_DOCS:
    what KFP shows for each input and output. A name missing from the table is an error (tested)."""
    import inspect

    inputs, outputs = [], []
    signature = inspect.signature(func)
    for name, param in signature.parameters.items():
        (outputs if "Output" in str(param.annotation) else inputs).append(name)
    outputs += getattr(signature.return_annotation, "_fields", ())
    lines = [summary, "", "Args:"]
    lines += [f"    {n}: {PARAMETER_DOCS[n]}" for n in inputs]
    described = [(n, PARAMETER_DOCS[n]) for n in outputs] + ([("Output", returns)] if returns else [])
    if described:
        lines += ["", "Returns:"] + [f"    {n}: {d}" for n, d in described]
    func.__doc__ = "\n".join(lines) + "\n"
    return func


def component_functions() -> dict:
    """Each component's KFP function (components/<name>/component.py), documented from PARAMETER_DOCS."""
    import importlib

    def load(n):
        return getattr(importlib.import_module(f"components.{n}.component"), f"{n}_component")

    return {n: documented(load(n), _SUMMARIES[n], _RETURNS.get(n, "")) for n in NAMES}


@functools.cache
def components_for(base_image: str = DEFAULT_BASE_IMAGE) -> SimpleNamespace:
    """The components built on `base_image` (our training image; compile option --base-image):
    `@dsl.component(base_image=..., install_kfp_package=False)`, so no pip install at pod start."""
    from kfp import dsl

    build = functools.partial(dsl.component, base_image=base_image, install_kfp_package=False)
    return SimpleNamespace(**{name: build(fn) for name, fn in component_functions().items()})

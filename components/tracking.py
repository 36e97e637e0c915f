"""MLflow tracking and model registry (docs/contracts.md, "Run directory").

- `LiveRunLogger`: one MLflow run logged while a federated run goes on: parameters and inputs (the data set
  and the partition) at start, each round's metrics as the round finishes (step = round, the round's real
  time), then the run directory's files and final metrics. The federation server calls it through three
  methods, so the core never imports mlflow.
- `log_run_dir(run_dir, experiment)`: the same MLflow run from a finished run directory, after the fact.
- `register_model(run_id, name, onnx_path=...)`: a new registered model version with lineage tags, the
  sha256 of the stored ONNX file (tag `onnx_sha256`, which the server verifies), a signature and an input
  example.
- `promote(name, version, alias="champion")`: moves the alias, refusing a candidate trained on another data
  set or partition than the current holder unless `allow_different_data`, and one whose global balanced
  accuracy (`PROMOTION_METRIC` of its run) is below the holder's unless `allow_worse`.

A site's private head (`model/site_*.safetensors`: FedMedCLIP's MLP) stays out of the central MLflow unless
the operator asks for it (`include_site_models`).

Artifacts go through the tracking server (`mlflow server --serve-artifacts`, `mlflow-artifacts:` URIs), so
clients need no S3 credentials; the server writes them to the versioned bucket.
mlflow is imported inside the functions: `components.cli` must stay light.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmedclip.digests import (
    FORMAT_VERSION,
    META_BACKBONE_SHA256,
    META_CLASS_NAMES,
    META_FORMAT_VERSION,
    META_IMAGE_SIZE,
    META_PREPROCESSING,
    META_SITE,
    OOD_OUTPUTS,
    canonical_digest,
    sha256_file,
)
from fedmedclip.errors import FedMedClipError
from fedmedclip.model_card import dataset_digest
from fedmedclip.privacy.report import privacy_summary
from fedmedclip.tracking_server import require_tracking_uri

log = logging.getLogger("fedmedclip.tracking")

# The run metric that promotion compares: global balanced accuracy of the reported (selected-round) model.
SUMMARY = "summary"  # the metric group of the run's reported model, traffic and times (`summary/...`)
PROMOTION_METRIC = f"{SUMMARY}/global_bacc"
LEGACY_PROMOTION_METRICS = ("final_global_bacc",)  # its name before metrics were grouped (older versions)
DEFAULT_ALIAS = "champion"
ONNX_MODEL_NAME = "onnx_model"  # name of the logged ONNX model inside the run
ONNX_FILE = "model.onnx"  # file name MLflow's onnx flavour stores the graph under
REQUIRED_FILES = ("results.json", "config.json", "partition.json", "provenance.json")
REQUIRED_DIRS = ("model",)
OPTIONAL_DIRS = ("plots", "rounds")
# protobuf cannot serialise a single message above 2 GiB.
_MAX_INLINE_ONNX = 2**31 - 2**20
# What registration needs from an exported model's metadata (docs/contracts.md, "Exported model").
_ONNX_REQUIRED_METADATA = (
    META_CLASS_NAMES,
    META_IMAGE_SIZE,
    META_PREPROCESSING,
    META_BACKBONE_SHA256,
    META_FORMAT_VERSION,
)
# The digests that say which data a version was trained on; promotion compares only like with like.
DATA_DIGEST_TAGS = ("dataset_digest", "partition_digest")
# A site's private part of the model (FedMedCLIP's MLP): never sent to the central MLflow by default.
SITE_MODEL_GLOB = "site_*.safetensors"
KFP_RUN_ID_TAG = "kfp.run_id"
RUN_KEY_TAG = "fedmedclip.run_key"  # the federation's run id: a restarted server continues its MLflow run
COMPLETE_TAG = "fedmedclip.logged"  # "complete" once a whole run directory is logged: registrable
LINEAGE_TAGS = (
    "method",
    "partition_digest",
    "dataset_digest",
    "backbone",
    "backbone_sha256",
    "feature_provenance_digest",
    "git_commit",
)


class TrackingError(FedMedClipError):
    """MLflow tracking or registry cannot do what was asked (server down, unknown run/model, ...)."""


class RunDirError(TrackingError):
    """A run directory that does not follow docs/contracts.md."""


class PromotionRefused(TrackingError):
    """The candidate is worse than the current alias holder and the override was not given."""


class DifferentDataRefused(PromotionRefused):
    """The candidate and the current alias holder were trained on different data sets or partitions."""


class PrivacyRefused(PromotionRefused):
    """The candidate's record-level epsilon is above `max_epsilon`, or it was trained without DP."""


# ------------------------------------------------------------------------------------------- run dir


@dataclass
class RunDir:
    path: Path
    config: dict
    results: dict
    partition: dict
    provenance: dict
    model_info: dict

    @property
    def method(self) -> str:
        return str(self.results["method"])

    @property
    def site_names(self) -> list[str]:
        names = self.results.get("site_names")
        if names:
            return [str(n) for n in names]
        return [str(s["site"]) for s in self.results["metrics"].get("sites", [])]

    @property
    def global_bacc(self) -> float:
        return float(self.results["metrics"]["global"]["bacc"])

    def lineage(self) -> dict[str, str]:
        backbone = self.results.get("backbone") or self.model_info.get("backbone") or {}
        # Dataset identity: which images (and labels) each holder's feature store was built from.
        stores = {h: p.get("digest", "") for h, p in sorted(self.provenance.items())}
        return {
            "method": self.method,
            "partition_digest": str(self.partition.get("digest", "")),
            "dataset_digest": dataset_digest(self.provenance),
            "backbone": str(backbone.get("name", "unknown")),
            "backbone_sha256": str(backbone.get("weights_sha256", "unknown")),
            "feature_provenance_digest": canonical_digest(stores),
            "git_commit": _git_commit(self),
        }


def _read_json(run_dir: Path, name: str) -> Any:
    path = run_dir / name
    if not path.is_file():
        raise RunDirError(
            f"{run_dir} is not a complete run directory: {name} is missing "
            f"(expected the output of `fedmedclip train --out {run_dir}`, see docs/contracts.md)"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise RunDirError(f"{path} is not valid JSON: {e}") from e


def _require(obj: dict, dotted: str, where: Path) -> Any:
    cur: Any = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise RunDirError(
                f"{where} has no `{dotted}` (see docs/contracts.md for the results.json format)"
            )
        cur = cur[part]
    return cur


def read_run_dir(run_dir: str | Path) -> RunDir:
    """Load and check a run directory; RunDirError names the first missing piece."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"run directory {path} does not exist or is not a directory")
    data = {name: _read_json(path, name) for name in REQUIRED_FILES}
    for d in REQUIRED_DIRS:
        if not (path / d).is_dir():
            raise RunDirError(f"{path} is not a complete run directory: {d}/ is missing")
    model_json = path / "model" / "model.json"
    model_info = _read_json(path, "model/model.json") if model_json.exists() else {}
    results = data["results.json"]
    where = path / "results.json"
    for key in ("method", "metrics.global.acc", "metrics.global.bacc", "history"):
        _require(results, key, where)
    if not isinstance(results["history"], list):
        raise RunDirError(f"{where}: `history` must be a list of per-round records")
    for i, rec in enumerate(results["history"]):
        if not isinstance(rec, dict) or "round" not in rec:
            raise RunDirError(f"{where}: history[{i}] has no `round`")
    partition, provenance = data["partition.json"], data["provenance.json"]
    if not isinstance(provenance, dict):
        raise RunDirError(f"{path / 'provenance.json'} must map each holder to its feature-store provenance")
    # Two digests of one partition that disagree mean files from different runs were mixed.
    declared = (results.get("partition") or {}).get("digest")
    if declared and partition.get("digest") and declared != partition["digest"]:
        raise RunDirError(
            f"{path}: results.json names partition {declared[:12]} but partition.json is "
            f"{partition['digest'][:12]}; the run directory mixes files from different runs"
        )
    return RunDir(path, data["config.json"], results, partition, provenance, model_info)


def _git_commit(run: RunDir | None = None) -> str:
    """The commit of the code that made the run: recorded in the run dir if the core wrote it, else the
    image's build argument (no .git inside containers), else this checkout."""
    if run is not None:
        for source in (run.results, run.config):
            value = source.get("git_commit") if isinstance(source, dict) else None
            if value:
                return str(value)
    env = os.environ.get("FEDMEDCLIP_GIT_COMMIT")
    if env:
        return env
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------------- MLflow plumbing


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The answering tracking server by the one rule of fedmedclip.tracking_server (--tracking-uri, else
    $MLFLOW_TRACKING_URI, else the local stack); TrackingError when there is none or it does not answer.
    Never MLflow's silent default of a ./mlflow.db or ./mlruns store in the working directory."""
    return require_tracking_uri(tracking_uri, error=TrackingError)


def _client(tracking_uri: str | None):
    import mlflow
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    # Downloads stream through the tracking server, as uploads do: MLflow 3 otherwise fetches presigned S3
    # URLs itself, which needs a route to the bucket (a hospital's pod has none) and is refused by the
    # local stack's S3, which accepts only requests signed with a role's key.
    os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    # The fluent API (log_model, register_model, load_model) reads the global URIs.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_key(*parts: str) -> str:
    """A valid MLflow metric key `part/part/...` (site names may hold any character)."""
    return _KEY_BAD.sub("_", "/".join(p for p in parts if p))[:250]


def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(obj, dict) and not obj and not prefix:
        return out
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    value = obj if isinstance(obj, str) else json.dumps(obj)
    if len(value) > 6000:  # MLflow's parameter value limit
        value = value[:5980] + "...(truncated)"
    out[_KEY_BAD.sub("_", prefix)[:250]] = value
    return out


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None  # a NaN or infinite metric is never logged


def round_metrics(record: dict, site_names: list[str] | None = None) -> dict[str, float]:
    """One round record (an entry of results.json's `history`) as MLflow metrics, named so that the MLflow UI
    groups them (it groups by the part before the first `/`): `global/acc`, `global/bacc`; per site
    `<site>/acc`, `<site>/bacc`, `<site>/val_acc`, `<site>/bytes_up`, `<site>/bytes_down`; `sites/present`,
    `sites/rejected`, `sites/val_acc_mean`, `sites/train_loss`; `comm/bytes_up`, `comm/bytes_down` (summed
    over the sites); `time/round_seconds`; under DP `privacy/epsilon_max` (the sites' largest epsilon so far),
    `privacy/client_epsilon` (client-level DP) and `<site>/epsilon`. Missing or non-finite values are left out."""
    out: dict[str, float] = {}

    def add(key: str, value: Any) -> None:
        v = _num(value)
        if v is not None:
            out[key] = v

    g = record.get("global") or {}
    add("global/acc", g.get("acc"))
    add("global/bacc", g.get("bacc"))
    rows = [s for s in record.get("sites") or [] if isinstance(s, dict)]
    for s in rows:
        for k in ("acc", "bacc", "val_acc", "epsilon"):
            add(metric_key(str(s.get("site")), k), s.get(k))
    add("sites/val_acc_mean", record.get("val_acc_mean"))
    add("sites/train_loss", record.get("train_loss"))
    # Differential privacy (fedmedclip.privacy): the sites' largest epsilon so far, and client-level DP's.
    add("privacy/epsilon_max", record.get("epsilon_max"))
    add("privacy/client_epsilon", (record.get("client_dp") or {}).get("epsilon"))
    add("time/round_seconds", record.get("seconds"))
    present = record.get("sites_present")
    add("sites/present", len(present) if isinstance(present, list) else present)
    if isinstance(record.get("rejected"), dict):
        add("sites/rejected", len(record["rejected"]))
    # Per-site lists follow the order of the record's site rows (the run's site names).
    names = [str(s.get("site")) for s in rows] or [str(n) for n in site_names or []]
    for direction in ("bytes_up", "bytes_down"):
        per_site = record.get(direction)
        if isinstance(per_site, list):
            add(f"comm/{direction}", sum(_num(b) or 0.0 for b in per_site))
            if len(per_site) == len(names):
                for name, b in zip(names, per_site, strict=True):
                    add(metric_key(name, direction), b)
        else:
            add(f"comm/{direction}", per_site)
    return out


def final_metrics(results: dict) -> dict[str, float]:
    """The run's summary from results.json, under `summary/`: the reported (selected-round) model's metrics
    (`summary/global_bacc` is what promotion compares), the last round's, traffic and times. One group that
    the MLflow UI lists after the per-round curves (it orders groups by name)."""
    final: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        v = _num(value)
        if v is not None:
            final[key] = v

    m = results.get("metrics") or {}
    for k, v in (m.get("global") or {}).items():
        put(f"{SUMMARY}/global_{k}", v)
    for s in m.get("sites") or []:
        for k in ("acc", "bacc", "f1", "ece", "n"):
            put(metric_key(SUMMARY, f"{s.get('site')}_{k}"), s.get(k))
    for k, v in (m.get("site_mean") or {}).items():
        put(f"{SUMMARY}/site_mean_{k}", v)
    put(f"{SUMMARY}/best_round", m.get("best_round"))
    last = m.get("last_round") or {}
    for k, v in (last.get("global") or {}).items():
        put(f"{SUMMARY}/last_round_global_{k}", v)
    comm = results.get("comm") or {}
    for k in ("bytes_up_per_site_per_round", "bytes_down_per_site_per_round", "total_bytes"):
        put(f"{SUMMARY}/{k}", comm.get(k))
    timing = results.get("timing") or {}
    for k, v in timing.items():
        put(f"{SUMMARY}/{k}", v)
    return final


def experiment_ui_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment (or a run) in its model-training view: MLflow 3's UI opens on
    its GenAI pages unless the link asks for `workflowType=machine_learning`."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{tracking_uri.rstrip('/')}/{page}?workflowType=machine_learning"


# Settings that may change when a run is continued (a restarted server with another quorum, threads or cache):
# logged as parameters at the start; a change on restart is recorded in a tag, never refused.
OPERATIONAL_PARAMS = ("threads", "cache_dir", "min_class_images", "allow_outside_root", "server.")


def is_operational(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in OPERATIONAL_PARAMS)


def run_parameters(
    config: dict,
    method_options: dict | None = None,
    preprocessing: str | None = None,
    extra: dict | None = None,
) -> dict[str, str]:
    """Every resolved setting of a run as MLflow parameters, one key per setting (nested dicts as dotted
    keys): the configuration (config.json, `out` left out), the method's options with their defaults
    resolved (`method_options.lr_fam`, ...), the resolved preprocessing, and `extra` (the runtime's: site
    names, quorum, timeouts, norm factor, ... under `server.`). The live logger and `track RUN_DIR` both log
    through this, so one run gives the same keys however it is logged."""
    settings = {k: v for k, v in config.items() if k != "out"}
    if method_options is not None:
        settings["method_options"] = {**(settings.get("method_options") or {}), **method_options}
    if preprocessing:
        settings["preprocessing"] = preprocessing
    params = _flatten(settings)
    params.update(_flatten({k: v for k, v in (extra or {}).items() if v is not None}))
    return params


def run_params(run: RunDir) -> dict[str, str]:
    """run_parameters of a run directory: the config, and what results.json resolved."""
    res = run.results
    part = res.get("partition") or {}
    preprocessing = res.get("preprocessing")
    # Facts from results.json that a search or comparison wants as params; the config wins on clashes.
    extra = {
        "method": res.get("method"),
        "sites": res.get("sites"),
        "site_names": ",".join(run.site_names) or None,
        "rounds": res.get("rounds"),
        "partition.scheme": part.get("scheme"),
        "partition.alpha": part.get("alpha"),
        "partition.seed": part.get("seed"),
        "comm.codec": (res.get("comm") or {}).get("codec"),
        "metrics.selection": (res.get("metrics") or {}).get("selection"),
        "federation_run_id": res.get("run_id"),
    }
    params = run_parameters(
        run.config,
        res.get("method_options") if isinstance(res.get("method_options"), dict) else None,
        preprocessing.get("name") if isinstance(preprocessing, dict) else None,
    )
    for k, v in _flatten({k: v for k, v in extra.items() if v is not None}).items():
        params.setdefault(k, v)
    return params


def context_tags(source: str, source_type: str = "LOCAL") -> dict[str, str]:
    """Who logged the run and from where (MLflow's system tags, shown in the UI): the user (the MLflow user
    the client signs in as, else the login), the command or pipeline as the source, the code's commit."""
    import getpass

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if not user:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # a container's uid without a passwd entry
            user = "unknown"
    return {
        "mlflow.user": user,
        "mlflow.source.name": source,
        "mlflow.source.type": source_type,
        "mlflow.source.git.commit": _git_commit(),
    }


def describe_run(
    method: str, site_names: list[str], rounds: Any, data: str, partition: str = "", orchestrator: str = ""
) -> str:
    """The run's description (MLflow's `mlflow.note.content`, shown on top of the run page), in Markdown."""
    sites = ", ".join(site_names[:8]) + (f", ... ({len(site_names)} in all)" if len(site_names) > 8 else "")
    lines = [
        f"**{method}** federated over {len(site_names)} sites ({sites}), {rounds} rounds.",
        f"Data: `{data}`" + (f", partition {partition}." if partition else "."),
    ]
    if orchestrator:
        lines.append(orchestrator)
    lines.append(
        "Metrics: `global/*` on the server's global test set, `<site>/*` on each site's own test split "
        "(per round), `summary/*` at the selected round (the model that is registered), traffic and times."
    )
    return "\n\n".join(lines)


def outcome_line(results: dict) -> str:
    m = results.get("metrics") or {}
    g, mean = m.get("global") or {}, m.get("site_mean") or {}

    def f(x):
        return f"{x:.3f}" if isinstance(x, (int, float)) else "-"

    return (
        f"**Result**: selected round {m.get('best_round')} ({m.get('selection', '')}): global acc "
        f"{f(g.get('acc'))}, bacc {f(g.get('bacc'))}; sites' mean acc {f(mean.get('acc'))}, bacc "
        f"{f(mean.get('bacc'))}."
    )


def _data_name(source: str) -> str:
    """A readable name for a data source: `synthetic`, the bucket, the folder or `folder/manifest.csv`."""
    if source.startswith("s3://"):
        return source[len("s3://") :].strip("/") or source
    path = Path(source)
    if source == "synthetic" or not path.name:
        return source
    return f"{path.parent.name}/{path.name}" if path.suffix else path.name


def _data_source_type(source: str) -> str:
    if source.startswith("s3://"):
        return "s3"
    return "synthetic" if source == "synthetic" else "local"


def dataset_inputs(partition: dict, data_source: str = "") -> list:
    """The MLflow inputs of a run, from its partition manifest (docs/contracts.md, partition.json): the data
    set (every image id and the class names, whoever holds them) and the partition (which holder holds
    which image; its own digest). MLflow keeps 36 characters of a digest; the full sha256 is an input tag."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    source = str(data_source or partition.get("source") or "unknown")
    ids = [i for split in (partition.get("sites") or {}).values() for ids in split.values() for i in ids]
    ids += list(partition.get("reference") or []) + list(partition.get("global_test") or [])
    images_digest = canonical_digest({"class_names": partition.get("class_names"), "images": sorted(ids)})
    data_profile = {"images": len(ids), "class_names": partition.get("class_names")}
    scheme = str(partition.get("scheme", "unknown"))
    alpha = partition.get("alpha")
    partition_name = f"{_data_name(source)}:{scheme}" + (f"(alpha={alpha})" if alpha else "")
    partition_name += f":seed={partition.get('seed')}:{len(partition.get('sites') or {})} sites"
    partition_digest = str(partition.get("digest") or canonical_digest(partition))

    def entry(name: str, digest: str, profile: dict, context: str) -> DatasetInput:
        dataset = Dataset(
            name=name,
            digest=digest[:32],
            source_type=_data_source_type(source),
            source=json.dumps({"uri": source}),
            profile=json.dumps(profile),
        )
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("fedmedclip.digest", digest)]
        return DatasetInput(dataset, tags)

    return [
        entry(_data_name(source), images_digest, data_profile, "training"),
        entry(partition_name, partition_digest, {"counts": partition.get("counts")}, "partition"),
    ]


# ------------------------------------------------------------------------------------------ logging


# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment says it is model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
EXPERIMENT_DESCRIPTION = (
    "Federated runs of fedmedclip (frozen CLIP adapted across hospitals). Each run: one federation; its "
    "parameters are every resolved setting, its metrics are grouped per party (`global/`, one group per site, "
    "`sites/`, `comm/`, `time/`, and `summary/` for the selected round). Registered models carry the run's "
    "lineage tags. Open it in the UI's Model training view."
)


def get_or_create_experiment(client, name: str) -> str:
    """The experiment's id, created if missing; it is marked as model training (not GenAI) and described."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp_id = client.create_experiment(
            name,
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, "mlflow.note.content": EXPERIMENT_DESCRIPTION},
        )
        return exp_id
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {name!r} exists but is deleted; restore it in the MLflow UI or choose another name"
        )
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def _log_run_files(client, run_id: str, run_path: Path, include_site_models: bool) -> list[str]:
    """The run directory's files into the run's artifacts (never checkpoint/: resume state only).
    Returns the site model files left out."""
    for name in REQUIRED_FILES:
        if (run_path / name).is_file():
            client.log_artifact(run_id, str(run_path / name))
    for d in OPTIONAL_DIRS:
        if (run_path / d).is_dir():
            client.log_artifacts(run_id, str(run_path / d), artifact_path=d)
    withheld = []
    model_dir = run_path / "model"
    for f in sorted(model_dir.rglob("*")) if model_dir.is_dir() else []:
        if not f.is_file():
            continue
        if f.parent == model_dir and f.match(SITE_MODEL_GLOB) and not include_site_models:
            withheld.append(f.name)
            continue
        where = Path("model") / f.parent.relative_to(model_dir)
        client.log_artifact(run_id, str(f), artifact_path=where.as_posix())
    return withheld


def _lineage_tags(run: RunDir, record_path: bool = True) -> dict[str, str]:
    """Registration's lineage; the run directory's path only where it means something to a reader (not a
    pod's temporary directory: `record_path=False`)."""
    lineage = run.lineage()
    tags = {
        **lineage,
        **privacy_summary(run.results),
        "mlflow.source.git.commit": lineage["git_commit"],
        "fedmedclip.sites": ",".join(run.site_names),
    }
    if record_path:
        tags["fedmedclip.run_dir"] = str(run.path.resolve())
    return tags


class LiveRunLogger:
    """One MLflow run logged while the federated run it describes goes on.

        logger = LiveRunLogger("fedmedclip", kfp_run_id=...)
        logger.start(params, tags, run_name, partition=manifest, data_source="s3://bucket")
        for each finished round: logger.log_round(record)      # never waits for MLflow
        logger.finish(run_dir, "FINISHED")                       # or "FAILED": the rounds logged stay

    `log_round` stamps the metrics with the time it is called and hands them to a sender thread, so a slow or
    unreachable tracking server never holds up a round; what it could not send yet it retries every
    `retry_seconds`, and `finish` waits up to `flush_timeout` for the rest. With `background=False` metrics
    are sent in the caller's thread and errors raise (after-the-fact logging: `log_run_dir`).
    Used as a context manager, an exception ends the run as FAILED.
    """

    def __init__(
        self,
        experiment: str = "fedmedclip",
        tracking_uri: str | None = None,
        *,
        kfp_run_id: str | None = None,
        include_site_models: bool = False,
        background: bool = True,
        retry_seconds: float = 5.0,
        flush_timeout: float = 120.0,
        record_run_dir: bool = True,
    ):
        self.experiment = experiment
        self.record_run_dir = record_run_dir
        self.description = ""
        self.tracking_uri = tracking_uri
        self.kfp_run_id = kfp_run_id or None
        self.include_site_models = include_site_models
        self.background = background
        self.retry_seconds = retry_seconds
        self.flush_timeout = flush_timeout
        self.run_id: str | None = None
        self.site_names: list[str] = []
        self._client = None
        self._pending: collections.deque = collections.deque()  # lists of Metric, each one log_batch
        self._unsent_rounds: dict[int, int] = {}  # round -> batches of it still pending
        self._cond = threading.Condition()
        self._closing = False
        self._sender: threading.Thread | None = None
        self._last_error: Exception | None = None
        self._finished = False

    # -- start
    def start(
        self,
        params: dict,
        tags: dict[str, str] | None = None,
        run_name: str | None = None,
        *,
        site_names: list[str] | None = None,
        partition: dict | None = None,
        data_source: str | None = None,
        run_key: str | None = None,
        description: str | None = None,
        start_time: float | None = None,
    ) -> str:
        """Create the MLflow run (named `run_name`, tagged with the KFP run id when given, `description` as
        its note, started at `start_time` (unix seconds; default now)), log `params` (nested dicts are
        flattened to dotted keys) and, with the partition manifest, the data set and the partition as inputs.
        With `run_key` (the federation's run id), a run already logged under that key is continued instead: a
        restarted server keeps one MLflow run; its defining parameters must be the same, and operational
        ones (OPERATIONAL_PARAMS) that changed are recorded in a tag. Returns the MLflow run id."""
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        if self.run_id is not None:
            raise TrackingError(f"this logger already started MLflow run {self.run_id}")
        client, uri = _client(self.tracking_uri)
        exp_id = get_or_create_experiment(client, self.experiment)
        all_tags = {**context_tags("fedmedclip"), **(tags or {})}
        if description:
            self.description = description
            all_tags["mlflow.note.content"] = description
        if self.kfp_run_id:
            all_tags[KFP_RUN_ID_TAG] = str(self.kfp_run_id)
        if run_key:
            all_tags[RUN_KEY_TAG] = str(run_key)
        existing = self._run_with_key(client, exp_id, run_key) if run_key else None
        flat = _flatten(params)
        if existing is not None:
            run_id = existing.info.run_id
            differ = {
                k: (existing.data.params[k], v)
                for k, v in flat.items()
                if existing.data.params.get(k, v) != v
            }
            changed = {k: d for k, d in differ.items() if not is_operational(k)}
            if changed:
                raise TrackingError(
                    f"MLflow run {run_id} of {run_key} was started with other parameters ("
                    + "; ".join(
                        f"{k}: {old!r} then, {new!r} now" for k, (old, new) in sorted(changed.items())
                    )
                    + "): a run continues only with its own configuration"
                )
            client.update_run(run_id, status="RUNNING")
            log.info("continuing MLflow run %s of %s on %s", run_id, run_key, uri)
            if differ:  # parameters cannot change: the restart's operational settings go into a tag
                all_tags[f"fedmedclip.restarted.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"] = (
                    json.dumps({k: {"before": old, "now": new} for k, (old, new) in sorted(differ.items())})[
                        :5000
                    ]
                )
                flat = {k: v for k, v in flat.items() if k not in differ}
        else:
            run_id = client.create_run(
                exp_id,
                run_name=run_name,
                tags=all_tags,
                start_time=int(start_time * 1000) if start_time is not None else None,
            ).info.run_id
        self._client, self.run_id = client, run_id
        self.site_names = [str(s) for s in site_names or []]
        try:
            logged = [Param(k, v) for k, v in flat.items()]
            for i in range(0, len(logged), MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(run_id, params=logged[i : i + MAX_PARAMS_TAGS_PER_BATCH])
            if existing is not None:
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items()])
            elif partition:
                client.log_inputs(run_id, datasets=dataset_inputs(partition, data_source or ""))
        except MlflowException as e:
            client.set_terminated(run_id, "FAILED")
            self._finished = True
            raise TrackingError(f"MLflow refused the start of run {run_id}: {e.message}") from e
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            self._finished = True
            raise
        if self.background:
            self._sender = threading.Thread(target=self._send_loop, name="mlflow-live-logger", daemon=True)
            self._sender.start()
        log.info("MLflow run %s in experiment %r on %s", run_id, self.experiment, uri)
        return run_id

    @staticmethod
    def _run_with_key(client, exp_id: str, run_key: str):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", str(run_key)):
            raise TrackingError(f"run key {run_key!r}: use letters, digits, '.', '_' or '-'")
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1
        )
        return found[0] if found else None

    # -- rounds
    def log_round(self, record: dict) -> None:
        """One finished round (a results.json `history` entry), step = its round, stamped now."""
        self.log_rounds([record])

    def log_rounds(self, records: list[dict]) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        if self.run_id is None or self._finished:
            raise TrackingError("log_round needs a started, unfinished run: call start() first")
        now = int(time.time() * 1000)
        metrics, steps = [], []
        for rec in records:
            if not isinstance(rec, dict) or not isinstance(rec.get("round"), int):
                raise TrackingError(f"a round record needs an integer `round`, got {str(rec)[:200]}")
            r = rec["round"]
            steps.append(r)
            # The round's own time when the record has it (a finished run logged afterwards), else now.
            finished = _num(rec.get("finished_at"))
            stamp = int(finished * 1000) if finished is not None else now
            metrics += [(r, Metric(k, v, stamp, r)) for k, v in round_metrics(rec, self.site_names).items()]
        with self._cond:
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                chunk = metrics[i : i + MAX_METRICS_PER_BATCH]
                rounds = sorted({r for r, _ in chunk})
                self._pending.append((rounds, [m for _, m in chunk]))
                for r in rounds:
                    self._unsent_rounds[r] = self._unsent_rounds.get(r, 0) + 1
            self._cond.notify_all()
        if not self.background:
            self._send_pending()

    def _send_one(self) -> bool:
        """Send the oldest pending batch; False when there is none."""
        with self._cond:
            if not self._pending:
                return False
            rounds, batch = self._pending[0]
        self._client.log_batch(self.run_id, metrics=batch)
        with self._cond:
            self._pending.popleft()
            for r in rounds:
                self._unsent_rounds[r] -= 1
                if not self._unsent_rounds[r]:
                    del self._unsent_rounds[r]
            self._cond.notify_all()
        return True

    def _send_pending(self) -> None:
        while self._send_one():
            pass

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
            try:
                self._send_one()
                self._last_error = None
            except Exception as e:  # the server is down or refuses: keep the batch, try again later
                if self._last_error is None:
                    log.warning(
                        "MLflow run %s: could not log round metrics (%s); retrying every %.0f s",
                        self.run_id,
                        getattr(e, "message", e),
                        self.retry_seconds,
                    )
                self._last_error = e
                with self._cond:
                    if self._closing:
                        return
                    self._cond.wait(self.retry_seconds)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every round logged so far is in MLflow (or `timeout` seconds); True when it is."""
        if not self.background:
            try:
                self._send_pending()
            except Exception as e:  # log_round already raised it to the caller
                self._last_error = e
                return False
            return True
        deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or self._sender is None or not self._sender.is_alive():
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    @property
    def unsent_rounds(self) -> list[int]:
        with self._cond:
            return sorted(self._unsent_rounds)

    # -- finish
    def finish(
        self, run_dir: str | Path | None = None, status: str = "FINISHED", end_time: float | None = None
    ) -> None:
        """End the run with `status` (FINISHED, FAILED or KILLED). The rounds already logged stay whatever
        the status. From `run_dir`: results.json, config/partition/provenance, plots/, rounds/ and model/
        (less the sites' private heads unless `include_site_models`) and the final metrics; a FINISHED run
        whose directory is complete gets the lineage tags that registration needs. A directory that is not
        complete ends the run FAILED and raises RunDirError."""
        from mlflow.entities import Metric, RunTag

        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, not {status!r}")
        if self.run_id is None:
            raise TrackingError("finish needs a started run: call start() first")
        if self._finished:
            return
        self._finished = True
        client, run_id = self._client, self.run_id
        sent = self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        tags: dict[str, str] = {}
        if not sent:
            missing = ",".join(str(r) for r in self.unsent_rounds)
            tags["fedmedclip.unlogged_rounds"] = missing
            log.warning(
                "MLflow run %s: metrics of rounds %s could not be logged (%s)",
                run_id,
                missing,
                self._last_error,
            )
        final_status, problem = status, None
        try:
            run_path = Path(run_dir) if run_dir is not None else None
            if run_path is not None and run_path.is_dir():
                withheld = _log_run_files(client, run_id, run_path, self.include_site_models)
                if withheld:
                    tags["fedmedclip.site_models"] = (
                        "withheld (kept on the sites' own storage): " + ", ".join(withheld)
                    )
                try:
                    results = json.loads((run_path / "results.json").read_text())
                except (OSError, ValueError):
                    results = None
                if isinstance(results, dict):
                    now = int((end_time or time.time()) * 1000)
                    final = [Metric(k, v, now, 0) for k, v in final_metrics(results).items()]
                    if final:
                        client.log_batch(run_id, metrics=final)
                    if self.description:
                        tags["mlflow.note.content"] = f"{self.description}\n\n{outcome_line(results)}"
                if status == "FINISHED":
                    try:
                        tags.update(_lineage_tags(read_run_dir(run_path), self.record_run_dir))
                        tags[COMPLETE_TAG] = "complete"
                    except RunDirError as e:
                        final_status, problem = "FAILED", e
            elif status == "FINISHED" and run_dir is not None:
                final_status, problem = "FAILED", RunDirError(f"run directory {run_path} does not exist")
            if tags:
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(
            run_id, final_status, end_time=int(end_time * 1000) if end_time is not None else None
        )
        if problem is not None:
            raise problem

    def __enter__(self) -> LiveRunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is not None and not self._finished:
            self.finish(None, "FAILED" if exc_type is not None else "FINISHED")


def recorded_times(results: dict) -> tuple[float | None, float | None]:
    """(start, end) of a finished run in unix seconds, from what results.json records: each round's
    `finished_at` and the run's total seconds; (None, None) for a run directory written before rounds had
    their time."""
    ends = [_num(r.get("finished_at")) for r in results.get("history") or [] if isinstance(r, dict)]
    ends = [t for t in ends if t is not None]
    if not ends:
        return None, None
    end = max(ends)
    timing = results.get("timing") or {}
    total = _num(timing.get("total_seconds"))
    if total is None:
        first = min(results["history"], key=lambda r: _num(r.get("finished_at")) or end)
        total = (end - min(ends)) + (_num(first.get("seconds")) or 0.0)
    return end - total, end


def log_run_dir(
    run_dir: str | Path,
    experiment: str,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    include_site_models: bool = False,
    kfp_run_id: str | None = None,
    record_run_dir: bool = True,
    source: str = "fedmedclip track",
) -> str:
    """Log a finished run directory as one MLflow run and return its run id: the same parameters, metrics,
    files and tags as live logging, each round at the time the run recorded for it (not now)."""
    run = read_run_dir(run_dir)  # before touching the server: a bad run dir makes no empty run
    logger = LiveRunLogger(
        experiment,
        tracking_uri,
        kfp_run_id=kfp_run_id,
        include_site_models=include_site_models,
        background=False,
        record_run_dir=record_run_dir,
    )
    start, end = recorded_times(run.results)
    part = run.results.get("partition") or {}
    run_id = logger.start(
        run_params(run),
        tags={
            **context_tags(source),
            **_lineage_tags(run, record_run_dir),
            "fedmedclip.times": "recorded" if start is not None else "logging time (none recorded)",
            **(tags or {}),
        },
        run_name=run_name or run.path.resolve().name,
        site_names=run.site_names,
        partition=run.partition,
        data_source=str(run.config.get("data") or ""),
        description=describe_run(
            run.method,
            run.site_names,
            run.results.get("rounds"),
            str(run.config.get("data") or part.get("source") or "?"),
            f"{part.get('scheme', '?')}" + (f" (alpha {part['alpha']})" if part.get("alpha") else ""),
            f"Logged from the run directory by `{source}`.",
        ),
        start_time=start,
    )
    with logger:
        logger.log_rounds(run.results["history"])
        logger.finish(run.path, "FINISHED", end_time=end)
    log.info("logged %s as run %s in experiment %r", run.path, run_id, experiment)
    return run_id


# ----------------------------------------------------------------------------------------- registry


@dataclass
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    existing: bool = False  # registered before (a retry): nothing new was created

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def check_onnx_contract(model) -> dict[str, str]:
    """The parts of the export contract the server relies on; returns metadata_props as a dict."""
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    outputs = [o.name for o in model.graph.output]
    meta = {p.key: p.value for p in model.metadata_props}
    problems = []
    if inputs != ["images"]:
        problems.append(f"inputs are {inputs}, expected ['images']")
    elif model.graph.input[0].type.tensor_type.elem_type != 2:  # TensorProto.UINT8
        problems.append("input `images` is not uint8")
    if set(outputs) not in ({"probabilities", "class_index"}, {"probabilities", "class_index", *OOD_OUTPUTS}):
        problems.append(
            f"outputs are {outputs}, expected probabilities and class_index (and all or none of {OOD_OUTPUTS})"
        )
    missing = [k for k in _ONNX_REQUIRED_METADATA if k not in meta]
    if missing:
        problems.append(f"metadata_props lack {', '.join(missing)}")
    elif meta[META_FORMAT_VERSION] != FORMAT_VERSION:
        problems.append(
            f"{META_FORMAT_VERSION} is {meta[META_FORMAT_VERSION]!r}; the server reads format {FORMAT_VERSION}"
        )
    if problems:
        raise TrackingError(
            "the ONNX file does not follow the export contract (docs/contracts.md): " + "; ".join(problems)
        )
    return meta


def _onnx_signature(meta: dict[str, str], ood: bool = False):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    size = int(meta[META_IMAGE_SIZE])
    n_classes = len(json.loads(meta[META_CLASS_NAMES]))
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3), "images")]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, n_classes), "probabilities"),
                TensorSpec(np.dtype(np.int64), (-1,), "class_index"),
            ]
            + (
                [
                    TensorSpec(np.dtype(np.float32), (-1,), "ood_score"),
                    TensorSpec(np.dtype(np.float32), (-1, -1), "drift_embedding"),
                ]
                if ood
                else []
            )
        ),
    )


def _onnx_input_example(meta: dict[str, str]) -> dict:
    """One black image, uint8 [1, S, S, 3]: the smallest valid request (stored as JSON with the model)."""
    import numpy as np

    size = int(meta[META_IMAGE_SIZE])
    return {"images": np.zeros((1, size, size, 3), dtype=np.uint8)}


def _onnx_requirements() -> list[str]:
    # Explicit requirements skip MLflow's inference (a subprocess that loads the model: seconds).
    # Written as the CPU `onnxruntime`; GPU images are built from constraints.txt, never from these.
    from importlib.metadata import PackageNotFoundError, version

    import onnx

    reqs = [f"onnx=={onnx.__version__}"]
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            reqs.append(f"onnxruntime=={version(dist)}")
            break
        except PackageNotFoundError:
            continue
    else:
        reqs.append("onnxruntime")
    return reqs


def _registered_model_exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException as e:
        if not _not_found(e):
            raise
        return False


REGISTRATION_KEY_TAG = "fedmedclip.registered_from"  # on a version: the sha256 of its ONNX file, or "model/"
LOGGED_ONNX_TAG_PREFIX = "fedmedclip.onnx_model."  # on a run: the URI of the ONNX model logged for a file


def _version_of_run(client, name: str, run_id: str, source_key: str):
    """The version of `name` registered from `run_id` with `source_key`, if there is one."""
    from mlflow.exceptions import MlflowException

    if not re.fullmatch(r"[A-Za-z0-9]+", run_id):
        return None
    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException as e:
        if _not_found(e):
            return None
        raise
    mine = [v for v in versions if (v.tags or {}).get(REGISTRATION_KEY_TAG) == source_key]
    return min(mine, key=lambda v: int(v.version)) if mine else None


def register_model(
    run_id: str,
    name: str,
    onnx_path: str | Path | None = None,
    tracking_uri: str | None = None,
) -> RegisteredVersion:
    """Register a version of `name` from a logged run.

    With `onnx_path`: the file is logged into the run as an MLflow ONNX model and that model is registered;
    the version carries `onnx_sha256`, the sha256 of the `model.onnx` stored in the registry. Without it:
    the run's `model/` artifacts are registered as they are (a plain artifact version, not loadable as a
    pyfunc). Lineage tags are copied from the run either way, and the privacy facts of its results.json
    (`dp.*`: epsilon, delta, clip, noise multiplier, secure aggregation on/off). Every version gets a model
    card (components/model_card.py), logged beside the model; a run whose card cannot be built is refused.

    Idempotent, keyed on the run and the file: a version of `name` already registered from this run with the
    same ONNX file (`onnx_source_sha256`; or, without a file, the run's model folder) is returned as it is
    (`existing=True`), and an ONNX model already logged into the run for this file is reused. So a retried
    registration task finds its own version instead of adding another."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from .model_card import check_card, log_model_card

    client, _ = _client(tracking_uri)
    try:
        mlrun = client.get_run(run_id)
    except MlflowException as e:
        if _not_found(e):
            raise TrackingError(f"no MLflow run {run_id!r} on {mlflow.get_tracking_uri()}") from e
        raise
    run_tags = mlrun.data.tags
    if run_tags.get(COMPLETE_TAG) != "complete":
        raise TrackingError(
            f"run {run_id} was not logged from a complete run directory (`fedmedclip track`); refusing to "
            "register a model without its lineage"
        )
    tags = {k: run_tags[k] for k in LINEAGE_TAGS if k in run_tags}
    tags.update(privacy_summary(check_card(client, run_id)))
    tags["source_run_id"] = run_id
    if onnx_path is not None and not Path(onnx_path).is_file():
        raise TrackingError(f"ONNX file {onnx_path} does not exist")
    source_key = sha256_file(Path(onnx_path)) if onnx_path is not None else "model/"
    tags[REGISTRATION_KEY_TAG] = source_key
    found = _version_of_run(client, name, run_id, source_key)
    if found is not None:
        log.info("%s version %s is already registered from run %s: reused", name, found.version, run_id)
        return RegisteredVersion(name, str(found.version), run_id, found.source, dict(found.tags), True)
    site = None
    bacc = mlrun.data.metrics.get(PROMOTION_METRIC)
    if bacc is not None:
        tags[PROMOTION_METRIC] = f"{bacc:.6f}"
    is_new = not _registered_model_exists(client, name)

    if onnx_path is not None:
        import onnx

        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise TrackingError(f"ONNX file {onnx_path} does not exist")
        try:
            model = onnx.load(str(onnx_path))
        except Exception as e:
            raise TrackingError(f"{onnx_path} is not a readable ONNX model: {e}") from e
        meta = check_onnx_contract(model)
        site = meta.get(META_SITE)
        if tags.get("backbone_sha256") not in (None, "unknown", meta[META_BACKBONE_SHA256]):
            raise TrackingError(
                f"{onnx_path} was exported from backbone {meta[META_BACKBONE_SHA256][:12]} but run "
                f"{run_id} trained on {tags['backbone_sha256'][:12]}: not the model of this run"
            )
        if model.ByteSize() > _MAX_INLINE_ONNX:
            raise TrackingError(
                f"{onnx_path} holds {model.ByteSize() / 2**30:.1f} GiB of graph and weights; registration stores "
                "the model as one self-contained file (protobuf's 2 GiB limit): export it in fp16"
            )
        with tempfile.TemporaryDirectory() as tmp:
            # Hash exactly the bytes MLflow will store: its flavour re-serialises the graph with
            # onnx.save_model, which need not reproduce the exporter's bytes.
            stored = Path(tmp) / ONNX_FILE
            onnx.save_model(model, str(stored), save_as_external_data=False)
            tags["onnx_sha256"] = sha256_file(stored)
        tags["onnx_source_sha256"] = sha256_file(onnx_path)
        tags["onnx_file"] = ONNX_FILE
        logged_tag = f"{LOGGED_ONNX_TAG_PREFIX}{source_key[:16]}"
        source = run_tags.get(logged_tag)  # logged by an earlier attempt that failed before registering
        if source is None:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.onnx.log_model(
                    model,
                    name=ONNX_MODEL_NAME,
                    signature=_onnx_signature(
                        meta, ood=OOD_OUTPUTS[0] in {o.name for o in model.graph.output}
                    ),
                    input_example=_onnx_input_example(meta),
                    pip_requirements=_onnx_requirements(),
                    metadata=dict(tags),
                    # one self-contained model.onnx: what the server downloads and checks against onnx_sha256
                    save_as_external_data=False,
                )
            source = info.model_uri
            client.set_tag(run_id, logged_tag, source)
        register = lambda: mlflow.register_model(source, name, tags=tags)  # noqa: E731
    else:
        # MLflow 3's register_model wants a logged model under runs:/ URIs; a plain folder is registered
        # by its artifact location instead (downloadable with models:/NAME/VERSION, not a pyfunc).
        source = f"{mlrun.info.artifact_uri.rstrip('/')}/model"

        def register():
            if is_new:
                client.create_registered_model(name)
            return client.create_model_version(name, source, run_id=run_id, tags=tags)

    try:
        mv = register()
    except MlflowException as e:
        raise TrackingError(f"registering {source} as {name!r} failed: {e.message}") from e
    if is_new:
        client.set_registered_model_tag(name, "project", "fedmedclip")
        client.update_registered_model(name, description="FedMedCLIP classifier (see docs/contracts.md)")
    metric = f", {PROMOTION_METRIC} {bacc:.4f}" if bacc is not None else ""
    privacy = (
        f", DP epsilon {tags['dp.epsilon']} (delta {tags['dp.delta']})"
        if tags.get("dp.epsilon")
        else ", no record-level DP"
    )
    client.update_model_version(
        name, mv.version, description=f"{tags.get('method', '?')} from run {run_id}{metric}{privacy}"
    )
    tags["model_card"] = log_model_card(client, run_id, name, str(mv.version), tags, site)
    log.info("registered %s version %s from %s", name, mv.version, source)
    return RegisteredVersion(name, str(mv.version), run_id, source, tags)


# ---------------------------------------------------------------------------------------- promotion


@dataclass
class Promotion:
    name: str
    version: str
    alias: str
    candidate_metric: float
    previous_version: str | None
    previous_metric: float | None
    overridden: bool
    different_data: dict[str, tuple[str, str]] = field(default_factory=dict)  # tag -> (candidate, holder)

    def describe(self) -> str:
        prev = (
            "no previous holder"
            if self.previous_version is None
            else f"previous: version {self.previous_version}, {PROMOTION_METRIC} {self.previous_metric:.4f}"
        )
        note = " (worse than the previous holder: promoted with --allow-worse)" if self.overridden else ""
        if self.different_data:
            note += (
                " (trained on other data than the previous holder: "
                + ", ".join(self.different_data)
                + " differ; promoted with --allow-different-data)"
            )
        return (
            f"{self.name} version {self.version} is now @{self.alias} ({PROMOTION_METRIC} "
            f"{self.candidate_metric:.4f}; {prev}){note}\nload it with models:/{self.name}@{self.alias}"
        )


def _version_metric(client, mv) -> float | None:
    from mlflow.exceptions import MlflowException

    names = (PROMOTION_METRIC, *LEGACY_PROMOTION_METRICS)
    if mv.run_id:
        try:
            metrics = client.get_run(mv.run_id).data.metrics
        except MlflowException as e:
            if not _not_found(e):
                raise
            metrics = {}
        for name in names:
            if metrics.get(name) is not None:
                return float(metrics[name])
    # The run may be gone (deleted experiment); registration copied the number onto the version.
    tags = mv.tags or {}
    return next((float(tags[n]) for n in names if tags.get(n) is not None), None)


def check_privacy_budget(name: str, version: str, tags: dict, max_epsilon: float) -> None:
    """PrivacyRefused unless the version was trained with record-level DP at epsilon <= max_epsilon."""
    mode = tags.get("dp.mode", "none")
    if "record" not in mode.split("+"):
        raise PrivacyRefused(
            f"refusing to promote {name} version {version} under --max-epsilon {max_epsilon:g}: it was trained "
            f"without record-level differential privacy (dp.mode {mode}); train with --dp-target-epsilon"
        )
    try:
        epsilon = float(tags.get("dp.epsilon", ""))
    except ValueError:
        epsilon = math.nan
    if not math.isfinite(epsilon) or epsilon > max_epsilon:
        raise PrivacyRefused(
            f"refusing to promote {name} version {version}: its epsilon {tags.get('dp.epsilon') or '(none)'} "
            f"(delta {tags.get('dp.delta', '?')}, largest over its sites) is above --max-epsilon {max_epsilon:g}"
        )


def data_differences(candidate_tags: dict, holder_tags: dict) -> dict[str, tuple[str, str]]:
    """The data digests (DATA_DIGEST_TAGS) on which two versions differ, as tag -> (candidate, holder).
    A digest missing on either side counts as different: nothing says the data are the same."""
    out = {}
    for tag in DATA_DIGEST_TAGS:
        a, b = (candidate_tags or {}).get(tag, ""), (holder_tags or {}).get(tag, "")
        if not a or not b or a != b:
            out[tag] = (a or "(none)", b or "(none)")
    return out


def promote(
    name: str,
    version: str | int,
    alias: str = DEFAULT_ALIAS,
    allow_worse: bool = False,
    tracking_uri: str | None = None,
    allow_different_data: bool = False,
    max_epsilon: float | None = None,
) -> Promotion:
    """Point `models:/NAME@ALIAS` at `version`.

    Balanced accuracies compare only on the same test data: the promotion is refused
    (DifferentDataRefused) when the candidate and the current holder differ in a data digest (data set or
    partition, version tags) unless `allow_different_data`, and (PromotionRefused) when the candidate's
    PROMOTION_METRIC is below the holder's unless `allow_worse`. Overrides are logged and recorded as tags
    on the promoted version. With `max_epsilon`, a version trained without record-level differential privacy,
    or whose epsilon (its `dp.epsilon` tag: the largest over its sites) is above it, is refused
    (PrivacyRefused); no override."""
    from mlflow.exceptions import MlflowException

    client, _ = _client(tracking_uri)
    version = str(version)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as e:
        if _not_found(e):
            raise TrackingError(f"registered model {name!r} has no version {version}") from e
        raise
    if max_epsilon is not None:
        check_privacy_budget(name, version, mv.tags or {}, max_epsilon)
    candidate = _version_metric(client, mv)
    if candidate is None:
        raise TrackingError(
            f"{name} version {version} has no {PROMOTION_METRIC} (neither on its run nor as a tag); "
            "only versions registered from a tracked run directory can be promoted"
        )
    # A missing alias is an INVALID_PARAMETER_VALUE error from the server: read the alias table instead.
    holder = (client.get_registered_model(name).aliases or {}).get(alias)
    current = client.get_model_version(name, str(holder)) if holder is not None else None
    previous_metric = None
    overridden = False
    different: dict[str, tuple[str, str]] = {}
    if current is not None and str(current.version) != version:
        different = data_differences(mv.tags, current.tags)
        if different and not allow_different_data:
            listed = "; ".join(
                f"{tag} {cand[:12]} (version {version}) vs {held[:12]} (version {current.version})"
                for tag, (cand, held) in different.items()
            )
            raise DifferentDataRefused(
                f"refusing to compare {name} version {version} with the current @{alias} (version "
                f"{current.version}): they were trained on different data ({listed}), so their balanced "
                "accuracies are not comparable; pass --allow-different-data to promote it anyway"
            )
        previous_metric = _version_metric(client, current)
        if previous_metric is None:
            if not allow_worse:
                raise PromotionRefused(
                    f"cannot compare: the current @{alias} ({name} version {current.version}) has no "
                    f"{PROMOTION_METRIC}; pass --allow-worse to promote version {version} anyway"
                )
            overridden = True
        elif candidate < previous_metric:
            if not allow_worse:
                raise PromotionRefused(
                    f"refusing to promote {name} version {version} to @{alias}: its global balanced accuracy "
                    f"{candidate:.4f} is below the current @{alias} (version {current.version}) at "
                    f"{previous_metric:.4f}; pass --allow-worse to override"
                )
            overridden = True
    result = Promotion(
        name,
        version,
        alias,
        candidate,
        None if current is None or str(current.version) == version else str(current.version),
        previous_metric,
        overridden,
        different,
    )
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if overridden:
        reason = (
            f"promoted to @{alias} with allow_worse at {stamp}: {PROMOTION_METRIC} {candidate:.4f} vs "
            f"version {current.version} "
            + ("(no metric)" if previous_metric is None else f"{previous_metric:.4f}")
        )
        client.set_model_version_tag(name, version, f"promotion_override.{alias}", reason)
        log.warning("%s version %s: %s", name, version, reason)
    if different:
        reason = f"promoted to @{alias} with allow_different_data at {stamp}: " + "; ".join(
            f"{tag} {cand} vs version {current.version} {held}" for tag, (cand, held) in different.items()
        )
        client.set_model_version_tag(name, version, f"promotion_different_data.{alias}", reason[:5000])
        log.warning("%s version %s: %s", name, version, reason)
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(
        name,
        version,
        f"promoted.{alias}",
        json.dumps(
            {
                "at": stamp,
                "previous_version": result.previous_version,
                "previous_metric": previous_metric,
                "metric": candidate,
                "allow_worse": overridden,
                "allow_different_data": sorted(different),
                "max_epsilon": max_epsilon,
            }
        ),
    )
    return result

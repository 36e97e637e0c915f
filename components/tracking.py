"""MLflow tracking and model registry, driven by a run directory (docs/contracts.md, "Run directory").

- `log_run_dir(run_dir, experiment)`: one MLflow run per run directory: parameters (config.json), per-round
  metrics (results.json `history`, step = round), final metrics, lineage tags, and the artifacts
  (results/partition/provenance/config JSON, plots/, rounds/, model/).
- `register_model(run_id, name, onnx_path=...)`: a new registered model version with lineage tags and the
  sha256 of the stored ONNX file (tag `onnx_sha256`, which the server verifies).
- `promote(name, version, alias="champion")`: moves the alias, refusing a candidate whose global balanced
  accuracy (`PROMOTION_METRIC` of its run) is below the current holder's unless `allow_worse`.

Artifacts go through the tracking server (`mlflow server --serve-artifacts`, `mlflow-artifacts:` URIs), so
clients need no S3 credentials; the server writes them to the versioned bucket.
mlflow is imported inside the functions: `components.cli` must stay light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmedclip.errors import FedMedClipError

log = logging.getLogger("fedmedclip.tracking")

# The run metric that promotion compares: global balanced accuracy of the reported (selected-round) model.
PROMOTION_METRIC = "final_global_bacc"
DEFAULT_ALIAS = "champion"
ONNX_MODEL_NAME = "onnx_model"  # name of the logged ONNX model inside the run
ONNX_FILE = "model.onnx"  # file name MLflow's onnx flavour stores the graph under
REQUIRED_FILES = ("results.json", "config.json", "partition.json", "provenance.json")
REQUIRED_DIRS = ("model",)
OPTIONAL_DIRS = ("plots", "rounds")
# protobuf cannot serialise a single message above 2 GiB.
_MAX_INLINE_ONNX = 2**31 - 2**20
_ONNX_REQUIRED_METADATA = (
    "fedmedclip.class_names",
    "fedmedclip.image_size",
    "fedmedclip.preprocessing",
    "fedmedclip.backbone_sha256",
    "fedmedclip.format_version",
)
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
        images = {h: p.get("image_list_sha256", "") for h, p in sorted(self.provenance.items())}
        stores = {h: p.get("digest", "") for h, p in sorted(self.provenance.items())}
        return {
            "method": self.method,
            "partition_digest": str(self.partition.get("digest", "")),
            "dataset_digest": _canonical_digest(images),
            "backbone": str(backbone.get("name", "unknown")),
            "backbone_sha256": str(backbone.get("weights_sha256", "unknown")),
            "feature_provenance_digest": _canonical_digest(stores),
            "git_commit": _git_commit(self),
        }


def _canonical_digest(obj: Any) -> str:
    # Same recipe as fedmedclip.features.canonical_digest (not imported: it pulls in torch).
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


def resolve_tracking_uri(tracking_uri: str | None = None, stack_dir: str | Path | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the local stack recorded in `stack_dir`
    ($FEDMEDCLIP_STACK_DIR or .stack/). Never MLflow's silent default of a local ./mlruns store."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from .stack import read_state, recorded_stack_dir

    stack_dir = stack_dir or recorded_stack_dir()
    info = read_state(stack_dir)
    if info is not None:
        return info.tracking_uri
    raise TrackingError(
        "no MLflow tracking server given: pass --tracking-uri, set MLFLOW_TRACKING_URI, or start the local "
        "stack with `fedmedclip stack up` (then `eval $(fedmedclip stack env)`)"
    )


def _check_reachable(tracking_uri: str) -> None:
    # The MLflow client retries a dead server for minutes; fail in seconds with the fix instead.
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=5):
            return
    except urllib.error.HTTPError:
        return  # it answers; auth proxies may guard /health
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise TrackingError(
            f"the MLflow tracking server at {tracking_uri} is not reachable ({getattr(e, 'reason', e)}); "
            "start the local one with `fedmedclip stack up` or check --tracking-uri / MLFLOW_TRACKING_URI"
        ) from e


def _client(tracking_uri: str | None):
    import mlflow
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    _check_reachable(uri)
    # The fluent API (log_model, register_model, load_model) reads the global URIs.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_key(*parts: str) -> str:
    """A valid MLflow metric/param key (site names may hold any character)."""
    return _KEY_BAD.sub("_", "_".join(p for p in parts if p))[:250]


def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
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
    return v if v == v else None  # NaN is not worth logging


def run_metrics(run: RunDir) -> tuple[list[tuple[str, float, int]], dict[str, float]]:
    """(per-round metrics as (key, value, step=round), final metrics) from results.json."""
    res = run.results
    names = run.site_names
    rounds: list[tuple[str, float, int]] = []

    def add(key: str, value: Any, step: int) -> None:
        v = _num(value)
        if v is not None:
            rounds.append((key, v, step))

    for rec in res["history"]:
        r = int(rec["round"])
        g = rec.get("global") or {}
        add("global_acc", g.get("acc"), r)
        add("global_bacc", g.get("bacc"), r)
        for s in rec.get("sites") or []:
            for k in ("acc", "bacc", "val_acc"):
                add(metric_key("site", str(s.get("site")), k), s.get(k), r)
        add("val_acc_mean", rec.get("val_acc_mean"), r)
        add("train_loss", rec.get("train_loss"), r)
        add("round_seconds", rec.get("seconds"), r)
        for direction in ("bytes_up", "bytes_down"):
            per_site = rec.get(direction)
            if isinstance(per_site, list):
                add(direction, sum(_num(b) or 0.0 for b in per_site), r)
                for name, b in zip(names, per_site, strict=False):
                    add(metric_key("site", name, direction), b, r)
            else:
                add(direction, per_site, r)

    final: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        v = _num(value)
        if v is not None:
            final[key] = v

    m = res["metrics"]
    for k, v in (m.get("global") or {}).items():
        put(f"final_global_{k}", v)
    for s in m.get("sites") or []:
        for k in ("acc", "bacc", "f1", "ece", "n"):
            put(metric_key("final_site", str(s.get("site")), k), s.get(k))
    for k, v in (m.get("site_mean") or {}).items():
        put(f"final_site_mean_{k}", v)
    put("best_round", m.get("best_round"))
    last = m.get("last_round") or {}
    for k, v in (last.get("global") or {}).items():
        put(f"last_round_global_{k}", v)
    comm = res.get("comm") or {}
    for k in ("bytes_up_per_site_per_round", "bytes_down_per_site_per_round", "total_bytes"):
        put(f"comm_{k}", comm.get(k))
    timing = res.get("timing") or {}
    for k, v in timing.items():
        put(f"timing_{k}", v)
    return rounds, final


def run_params(run: RunDir) -> dict[str, str]:
    params = _flatten(run.config)
    res = run.results
    part = res.get("partition") or {}
    # Facts from results.json that a search or comparison wants as params; the config wins on clashes.
    extra = {
        "method": res.get("method"),
        "sites": res.get("sites"),
        "rounds": res.get("rounds"),
        "partition.scheme": part.get("scheme"),
        "partition.alpha": part.get("alpha"),
        "partition.seed": part.get("seed"),
        "comm.codec": (res.get("comm") or {}).get("codec"),
        "metrics.selection": (res.get("metrics") or {}).get("selection"),
    }
    for k, v in extra.items():
        if v is not None and k not in params:
            params[k] = v if isinstance(v, str) else json.dumps(v)
    return params


# ------------------------------------------------------------------------------------------ logging


def get_or_create_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name)
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {name!r} exists but is deleted; restore it in the MLflow UI or choose another name"
        )
    return exp.experiment_id


def log_run_dir(
    run_dir: str | Path,
    experiment: str,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log a run directory as one MLflow run and return its run id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

    run = read_run_dir(run_dir)  # before touching the server: a bad run dir makes no empty run
    client, uri = _client(tracking_uri)
    exp_id = get_or_create_experiment(client, experiment)
    lineage = run.lineage()
    all_tags = {
        **lineage,
        "mlflow.source.git.commit": lineage["git_commit"],
        "fedmedclip.run_dir": str(run.path.resolve()),
        "fedmedclip.sites": ",".join(run.site_names),
        **(tags or {}),
    }
    mlrun = client.create_run(exp_id, run_name=run_name or run.path.resolve().name, tags=all_tags)
    run_id = mlrun.info.run_id
    try:
        now = int(time.time() * 1000)
        rounds, final = run_metrics(run)
        metrics = [Metric(k, v, now, step) for k, v, step in rounds]
        metrics += [Metric(k, v, now, 0) for k, v in final.items()]
        params = [Param(k, v) for k, v in run_params(run).items()]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
        for name in REQUIRED_FILES:
            client.log_artifact(run_id, str(run.path / name))
        for d in REQUIRED_DIRS + OPTIONAL_DIRS:
            if (run.path / d).is_dir():
                client.log_artifacts(run_id, str(run.path / d), artifact_path=d)
        client.log_batch(run_id, tags=[RunTag("fedmedclip.logged", "complete")])
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    log.info("logged %s as run %s in experiment %r on %s", run.path, run_id, experiment, uri)
    return run_id


# ----------------------------------------------------------------------------------------- registry


@dataclass
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    source: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    if set(outputs) != {"probabilities", "class_index"}:
        problems.append(f"outputs are {outputs}, expected probabilities and class_index")
    missing = [k for k in _ONNX_REQUIRED_METADATA if k not in meta]
    if missing:
        problems.append(f"metadata_props lack {', '.join(missing)}")
    if problems:
        raise TrackingError(
            "the ONNX file does not follow the export contract (docs/contracts.md): " + "; ".join(problems)
        )
    return meta


def _onnx_signature(meta: dict[str, str]):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    size = int(meta["fedmedclip.image_size"])
    n_classes = len(json.loads(meta["fedmedclip.class_names"]))
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3), "images")]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, n_classes), "probabilities"),
                TensorSpec(np.dtype(np.int64), (-1,), "class_index"),
            ]
        ),
    )


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


def register_model(
    run_id: str,
    name: str,
    onnx_path: str | Path | None = None,
    tracking_uri: str | None = None,
) -> RegisteredVersion:
    """Register a new version of `name` from a logged run.

    With `onnx_path`: the file is logged into the run as an MLflow ONNX model and that model is registered;
    the version carries `onnx_sha256`, the sha256 of the `model.onnx` stored in the registry. Without it:
    the run's `model/` artifacts are registered as they are (a plain artifact version, not loadable as a
    pyfunc). Lineage tags are copied from the run either way."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client, _ = _client(tracking_uri)
    try:
        mlrun = client.get_run(run_id)
    except MlflowException as e:
        if _not_found(e):
            raise TrackingError(f"no MLflow run {run_id!r} on {mlflow.get_tracking_uri()}") from e
        raise
    run_tags = mlrun.data.tags
    if run_tags.get("fedmedclip.logged") != "complete":
        raise TrackingError(
            f"run {run_id} was not logged from a complete run directory (`fedmedclip track`); refusing to "
            "register a model without its lineage"
        )
    tags = {k: run_tags[k] for k in LINEAGE_TAGS if k in run_tags}
    tags["source_run_id"] = run_id
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
        if tags.get("backbone_sha256") not in (None, "unknown", meta["fedmedclip.backbone_sha256"]):
            raise TrackingError(
                f"{onnx_path} was exported from backbone {meta['fedmedclip.backbone_sha256'][:12]} but run "
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
            tags["onnx_sha256"] = file_sha256(stored)
        tags["onnx_source_sha256"] = file_sha256(onnx_path)
        tags["onnx_file"] = ONNX_FILE
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                model,
                name=ONNX_MODEL_NAME,
                signature=_onnx_signature(meta),
                pip_requirements=_onnx_requirements(),
                metadata=dict(tags),
                # one self-contained model.onnx: what the server downloads and checks against onnx_sha256
                save_as_external_data=False,
            )
        source = info.model_uri
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
    client.update_model_version(
        name, mv.version, description=f"{tags.get('method', '?')} from run {run_id}{metric}"
    )
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

    def describe(self) -> str:
        prev = (
            "no previous holder"
            if self.previous_version is None
            else f"previous: version {self.previous_version}, {PROMOTION_METRIC} {self.previous_metric:.4f}"
        )
        note = " (worse than the previous holder: promoted with --allow-worse)" if self.overridden else ""
        return (
            f"{self.name} version {self.version} is now @{self.alias} ({PROMOTION_METRIC} "
            f"{self.candidate_metric:.4f}; {prev}){note}\nload it with models:/{self.name}@{self.alias}"
        )


def _version_metric(client, mv) -> float | None:
    from mlflow.exceptions import MlflowException

    if mv.run_id:
        try:
            value = client.get_run(mv.run_id).data.metrics.get(PROMOTION_METRIC)
            if value is not None:
                return float(value)
        except MlflowException as e:
            if not _not_found(e):
                raise
    # The run may be gone (deleted experiment); registration copied the number onto the version.
    tag = (mv.tags or {}).get(PROMOTION_METRIC)
    return float(tag) if tag is not None else None


def promote(
    name: str,
    version: str | int,
    alias: str = DEFAULT_ALIAS,
    allow_worse: bool = False,
    tracking_uri: str | None = None,
) -> Promotion:
    """Point `models:/NAME@ALIAS` at `version`. Refuses (PromotionRefused) when the candidate's
    PROMOTION_METRIC is below the current holder's unless `allow_worse`; an override is logged and
    recorded as tags on the promoted version."""
    from mlflow.exceptions import MlflowException

    client, _ = _client(tracking_uri)
    version = str(version)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as e:
        if _not_found(e):
            raise TrackingError(f"registered model {name!r} has no version {version}") from e
        raise
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
    if current is not None and str(current.version) != version:
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
            }
        ),
    )
    return result


def model_uri(name: str, alias: str = DEFAULT_ALIAS) -> str:
    return f"models:/{name}@{alias}"


def get_version(name: str, alias_or_version: str = DEFAULT_ALIAS, tracking_uri: str | None = None):
    """The MLflow ModelVersion behind an alias (or a version number): its tags hold `onnx_sha256`."""
    from mlflow.exceptions import MlflowException

    client, _ = _client(tracking_uri)
    try:
        if str(alias_or_version).isdigit():
            return client.get_model_version(name, str(alias_or_version))
        holder = (client.get_registered_model(name).aliases or {}).get(alias_or_version)
        if holder is not None:
            return client.get_model_version(name, str(holder))
    except MlflowException as e:
        if not _not_found(e):
            raise
    raise TrackingError(f"registered model {name!r} has no version or alias {alias_or_version!r}")

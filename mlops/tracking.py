"""MLflow plumbing shared by live logging, run-directory logging and the registry: the tracking server, the
client, the experiment, and how a run's records, settings and context become MLflow metrics, parameters, tags
and inputs (docs/contracts.md, "Run directory"). mlflow is imported inside the functions: `mlops.cli` must stay
light. Artifacts go through the tracking server (`--serve-artifacts`), so clients need no S3 credentials.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from fedmedclip.digests import canonical_digest, parse_model_reference
from fedmedclip.errors import FedMedClipError
from fedmedclip.tracking_server import require_tracking_uri

log = logging.getLogger("fedmedclip.tracking")

# The run metric that promotion compares: global balanced accuracy of the reported (selected-round) model.
SUMMARY = "summary"  # the metric group of the run's reported model, traffic and times (`summary/...`)
PROMOTION_METRIC = f"{SUMMARY}/global_bacc"
KFP_RUN_ID_TAG = "kfp.run_id"
RUN_KEY_TAG = "fedmedclip.run_key"  # the federation's run id: a restarted server continues its MLflow run
COMPLETE_TAG = "fedmedclip.logged"  # "complete" once a whole run directory is logged: registrable


class TrackingError(FedMedClipError):
    """MLflow tracking or registry cannot do what was asked (server down, unknown run/model, ...)."""


class RunDirError(TrackingError):
    """A run directory that does not follow docs/contracts.md."""


def git_commit(*recorded: dict) -> str:
    """The commit of the code that made the run: recorded in the run directory (results.json, config.json),
    else the image's build argument (no .git inside containers), else this checkout's."""
    env = os.environ.get("FEDMEDCLIP_GIT_COMMIT")
    for value in [*(r.get("git_commit") for r in recorded if isinstance(r, dict)), env]:
        if value:
            return str(value)
    return _checkout_commit()


@functools.cache
def _checkout_commit() -> str:
    """This checkout's commit, asked of git once per process (a registration asked it a dozen times)."""
    root = str(Path(__file__).resolve().parents[1])
    # The full hash, "-dirty" when tracked files changed (--exclude=*: never a tag's name).
    command = ["git", "-C", root, "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"]
    try:
        git = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return git.stdout.strip() if git.returncode == 0 else "unknown"


def _client(tracking_uri: str | None, purpose: str = "", error: type[FedMedClipError] = TrackingError):
    """The client of the answering tracking server by fedmedclip.tracking_server's rule, else `error` led by
    `purpose` (never MLflow's silent default of a ./mlruns store in the working directory), and its URI."""
    import mlflow
    from mlflow import MlflowClient

    uri = require_tracking_uri(tracking_uri, purpose, error)
    # Downloads stream through the tracking server, as uploads do: MLflow 3 otherwise fetches presigned S3
    # URLs itself, which needs a route to the bucket (a hospital's pod has none) and is refused by the
    # local stack's S3, which accepts only requests signed with a role's key.
    os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    # The fluent API (log_model, register_model, load_model) reads the global URIs.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _none_on(error_code: str, call, *args, **kwargs):
    """`call(*args, **kwargs)` on the MLflow client, or None when the server answers with `error_code`; every
    other failure raises."""
    from mlflow.exceptions import MlflowException

    try:
        return call(*args, **kwargs)
    except MlflowException as e:
        if e.error_code != error_code:
            raise
        return None


def if_found(call, *args):
    """`call(*args)`, or None when what it names (run, model, version) does not exist."""
    return _none_on("RESOURCE_DOES_NOT_EXIST", call, *args)


def unless_exists(call, *args, **kwargs):
    """`call(*args, **kwargs)` creating something (an experiment, a registered model), or None when it already
    exists: another process (a second command, a test worker) created it between this one's look-up and its
    create, and using it is what both meant."""
    return _none_on("RESOURCE_ALREADY_EXISTS", call, *args, **kwargs)


def registered_version(
    ref: str,
    tracking_uri: str | None = None,
    purpose: str = "",
    error: type[FedMedClipError] = TrackingError,
    not_found=None,
):
    """The client and the registered version `ref` names (NAME@ALIAS or NAME/VERSION, `models:/` in front or
    not), else `error`: a malformed reference before any server is asked, then `_client`'s, then MLflow's
    refusal (`not_found(MLflow's message)` words it when given)."""
    from mlflow.exceptions import MlflowException

    parsed = parse_model_reference(ref)
    if parsed is None:
        raise error(
            f"{ref!r} is not a registered model reference: use [models:/]NAME@ALIAS or [models:/]NAME/VERSION"
        )
    name, alias, version = parsed
    client, uri = _client(tracking_uri, purpose, error)
    try:
        get = client.get_model_version_by_alias if alias else client.get_model_version
        return client, get(name, alias or version)
    except MlflowException as exc:
        why = f"cannot resolve {ref} in the MLflow registry at {uri}: {exc.message}"
        raise error(not_found(exc.message) if not_found else why) from None


class ArtifactSizeError(TrackingError):
    """A registered version's file is missing from its artifact store, or listed or downloaded at another size
    than expected: `rel` (its path in the version's folder) and `why`, which each caller words for its party."""

    def __init__(self, rel: str, why: str):
        super().__init__(f"{rel} {why}")
        self.rel, self.why = rel, why


@contextlib.contextmanager
def artifact_problems(refused, failed):
    """`ListedArtifacts`' failures as each caller words them for its party: a file refused by its listed or
    downloaded size as `refused(ArtifactSizeError)`, a listing or download that failed as `failed(why)`
    (botocore/S3 and network errors are OSErrors or wrap them)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except ArtifactSizeError as exc:
        raise refused(exc) from None
    except (MlflowException, OSError) as exc:
        raise failed(str(getattr(exc, "message", exc))) from None


class ListedArtifacts:
    """A registered version's files as its artifact store lists them (`source`: the version's), with their sizes.
    Whoever can write the version's run may have replaced a file by a huge one: MLflow's download of the whole
    folder fetched it before any hash refused it. So each file is bounded by the listing first (`check`), then
    downloaded alone and measured again (`fetch`: it may have been replaced in between)."""

    def __init__(self, source: str):
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        self.repo = get_artifact_repository(source)
        self._top = self.repo.list_artifacts(None)
        self.sizes = self.walk_into(())

    def walk_into(self, files) -> dict[str, int | None]:
        """Each file listed (size None: listed without one), walked only into the folders holding `files`: any
        other folder is listed as `NAME/`, never walked, however deep it goes."""
        folders = {rel.rsplit("/", n)[0] for rel in files for n in range(1, rel.count("/") + 1)}
        self.sizes, pending = {}, list(self._top)
        while pending:
            info = pending.pop()
            if not info.is_dir:
                self.sizes[info.path] = info.file_size
            elif info.path in folders:
                pending += self.repo.list_artifacts(info.path)
            else:
                self.sizes[f"{info.path}/"] = None
        return self.sizes

    def check(self, rel: str, size: int, expected: str, at_most: bool = False) -> int:
        """The size `rel` is listed at, when it is `size` (`at_most`: no more), else ArtifactSizeError ending with
        `expected` ("not at the 5 bytes its manifest records"). A file listed without a size is refused too."""
        if rel not in self.sizes:
            raise ArtifactSizeError(rel, "is not in the artifact store")
        listed = self.sizes[rel]
        if listed is None or (listed > size if at_most else listed != size):
            at = "without a size" if listed is None else f"at {listed} bytes"
            raise ArtifactSizeError(rel, f"is listed {at}, {expected}")
        return listed

    def fetch(self, rel: str, folder: Path, size: int) -> Path:
        """`rel` downloaded alone into `folder` and measured: not `size` bytes (the listed), removed and refused."""
        path = Path(self.repo.download_artifacts(rel, str(folder)))
        if (got := path.stat().st_size) != size:
            path.unlink()
            raise ArtifactSizeError(rel, f"was {got} bytes when downloaded, not the {size} bytes listed")
        return path


_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_key(*parts: str) -> str:
    """A valid MLflow metric key `part/part/...` (site names may hold any character)."""
    return _KEY_BAD.sub("_", "/".join(p for p in parts if p))[:250]


def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys, each value a string (JSON unless it is one) within MLflow's limits."""
    if isinstance(obj, dict) and (obj or not prefix):
        dotted = {key: f"{prefix}.{key}" if prefix else str(key) for key in obj}
        return {k: v for key, sub in obj.items() for k, v in _flatten(sub, dotted[key]).items()}
    value = obj if isinstance(obj, str) else json.dumps(obj)
    if len(value) > 6000:  # MLflow's parameter value limit
        value = value[:5980] + "...(truncated)"
    return {metric_key(prefix): value}


def _num(x: Any) -> float | None:
    if isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None  # a NaN or infinite metric is never logged


def _finite(raw: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in ((k, _num(x)) for k, x in raw.items()) if v is not None}


def round_metrics(record: dict, site_names: list[str] | None = None) -> dict[str, float]:
    """One round record (an entry of results.json's `history`) as MLflow metrics, grouped by the part before the
    first `/` as the UI does (pipelines/README.md, "Tracking while it runs")."""
    g, present = record.get("global") or {}, record.get("sites_present")
    rows = [s for s in record.get("sites") or [] if isinstance(s, dict)]
    raw = {"global/acc": g.get("acc"), "global/bacc": g.get("bacc")}
    raw |= {
        metric_key(str(s.get("site")), k): s.get(k)
        for s in rows
        for k in ("acc", "bacc", "val_acc", "epsilon")
    }
    raw |= {
        "sites/val_acc_mean": record.get("val_acc_mean"),
        "sites/train_loss": record.get("train_loss"),
        # Differential privacy (fedmedclip.privacy): the sites' largest epsilon so far, and client-level DP's.
        "privacy/epsilon_max": record.get("epsilon_max"),
        "privacy/client_epsilon": (record.get("client_dp") or {}).get("epsilon"),
        "time/round_seconds": record.get("seconds"),
        "sites/present": len(present) if isinstance(present, list) else present,
        "sites/rejected": len(record["rejected"]) if isinstance(record.get("rejected"), dict) else None,
    }
    # Per-site lists follow the order of the record's site rows (the run's site names).
    names = [str(s.get("site")) for s in rows] or [str(n) for n in site_names or []]
    for direction in ("bytes_up", "bytes_down"):
        per_site = record.get(direction)
        listed = isinstance(per_site, list)
        raw[f"comm/{direction}"] = sum(_num(b) or 0.0 for b in per_site) if listed else per_site
        if listed and len(per_site) == len(names):
            raw |= {metric_key(name, direction): b for name, b in zip(names, per_site, strict=True)}
    return _finite(raw)


def final_metrics(results: dict) -> dict[str, float]:
    """The run's summary from results.json: the reported (selected-round) model's metrics, the last round's,
    traffic and times, under `summary/`, which the MLflow UI lists after the per-round curves."""
    m, comm = results.get("metrics") or {}, results.get("comm") or {}
    last = (m.get("last_round") or {}).get("global") or {}
    raw = {
        **{f"global_{k}": v for k, v in (m.get("global") or {}).items()},
        **{
            f"{s.get('site')}_{k}": s.get(k)
            for s in m.get("sites") or []
            for k in ("acc", "bacc", "f1", "ece", "n")
        },
        **{f"site_mean_{k}": v for k, v in (m.get("site_mean") or {}).items()},
        "best_round": m.get("best_round"),
        **{f"last_round_global_{k}": v for k, v in last.items()},
        **{
            k: comm.get(k)
            for k in ("bytes_up_per_site_per_round", "bytes_down_per_site_per_round", "total_bytes")
        },
        **(results.get("timing") or {}),
    }
    return _finite({metric_key(SUMMARY, k): v for k, v in raw.items()})


def experiment_ui_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment (or a run) in its model-training view: MLflow 3's UI opens on
    its GenAI pages unless the link asks for `workflowType=machine_learning`."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{tracking_uri.rstrip('/')}/{page}?workflowType=machine_learning"


def is_operational(key: str) -> bool:
    """Settings a continued run may change (the server's options, the fields declared resume="never"): a
    change on restart is recorded in a tag, never refused."""
    from fedmedclip.config import TrainConfig
    from fedmedclip.flags import declared

    never = {d.name for d in declared(TrainConfig, nested=False) if d.meta["resume"] == "never"}
    return key.startswith("server.") or key in never


def run_parameters(
    config: dict,
    method_options: dict | None = None,
    preprocessing: str | None = None,
    extra: dict | None = None,
) -> dict[str, str]:
    """Every resolved setting of a run as MLflow parameters (dotted keys): the configuration (`out` left out),
    the method's options with their defaults, the preprocessing and `extra` (the runtime's: sites, `server.*`)."""
    settings = {k: v for k, v in config.items() if k != "out"}
    if method_options is not None:
        settings["method_options"] = {**(settings.get("method_options") or {}), **method_options}
    if preprocessing:
        settings["preprocessing"] = preprocessing
    return _flatten(settings) | _flatten({k: v for k, v in (extra or {}).items() if v is not None})


def context_tags(source: str, source_type: str = "LOCAL") -> dict[str, str]:
    """MLflow's system tags (shown in the UI): the user (the MLflow user the client signs in as, else the
    login), the command or pipeline as the source, the code's commit."""
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
        "mlflow.source.git.commit": git_commit(),
    }


def describe_run(
    method: str, site_names: list[str], rounds: Any, data: str, partition: dict, orchestrator: str = ""
) -> str:
    """The run's description in Markdown (MLflow's `mlflow.note.content`, on top of the run page)."""
    sites = ", ".join(site_names[:8]) + (f", ... ({len(site_names)} in all)" if len(site_names) > 8 else "")
    alpha, seed = partition.get("alpha"), partition.get("seed")
    scheme = str(partition.get("scheme", "?")) + (f" (alpha {alpha})" if alpha else "")
    lines = [
        f"**{method}** federated over {len(site_names)} sites ({sites}), {rounds} rounds.",
        f"Data: `{data}`, partition {scheme}" + (f", seed {seed}." if seed is not None else "."),
        orchestrator,
        "Metrics: `global/*` on the server's global test set, `<site>/*` on each site's own test split "
        "(per round), `summary/*` at the selected round (the model that is registered), traffic and times.",
    ]
    return "\n\n".join(line for line in lines if line)


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
    source_type = "s3" if source.startswith("s3://") else "synthetic" if source == "synthetic" else "local"

    def entry(name: str, digest: str, profile: dict, context: str) -> DatasetInput:
        dataset = Dataset(
            name, digest[:32], source_type, json.dumps({"uri": source}), profile=json.dumps(profile)
        )
        return DatasetInput(
            dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("fedmedclip.digest", digest)]
        )

    return [
        entry(_data_name(source), images_digest, data_profile, "training"),
        entry(partition_name, partition_digest, {"counts": partition.get("counts")}, "partition"),
    ]


def log_dataset_inputs(client, run_id: str, partition: dict, data_source: str = "") -> None:
    """Log `dataset_inputs` to the run. Runs of one experiment starting together (two commands, the test
    workers) log the same new data set at once, and MLflow's store inserts it for each, refusing the later
    (BAD_REQUEST, 'UNIQUE constraint failed: datasets...'): the data set exists then, and a second call links
    it. A refusal of another kind is refused again, and raised."""
    from mlflow.exceptions import MlflowException

    datasets = dataset_inputs(partition, data_source)
    try:
        client.log_inputs(run_id, datasets=datasets)
    except MlflowException:
        client.log_inputs(run_id, datasets=datasets)


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
        tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, "mlflow.note.content": EXPERIMENT_DESCRIPTION}
        created = unless_exists(client.create_experiment, name, tags=tags)
        if created is not None:
            return created
        exp = client.get_experiment_by_name(name)  # created by another process since the look-up
        if exp is None:
            raise TrackingError(
                f"experiment {name!r} was created and removed again while this run created it"
            )
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {name!r} exists but is deleted; restore it in the MLflow UI or choose another name"
        )
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id

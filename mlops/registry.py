"""The model registry: a version registered from a tracked run (with its ONNX file, its lineage, its model card)
and promoted to an alias only when it is at least as good as the holder, on the same data.

- `register_model(run_id, name, onnx_path=...)`: a new registered model version with lineage tags, the
  sha256 of the stored ONNX file (tag `onnx_sha256`, which the server verifies), a signature and an input
  example; the file is checked against the export contract (fedmedclip/onnx_contract.py) as the server does.
- `promote(name, version, alias="champion")`: moves the alias, refusing a candidate trained on another data
  set or partition than the current holder unless `allow_different_data`, and one whose global balanced
  accuracy (`PROMOTION_METRIC` of its run) is below the holder's unless `allow_worse`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedmedclip.digests import META_BACKBONE_SHA256, META_SITE, sha256_file
from fedmedclip.privacy.report import privacy_summary

from .tracking import (
    COMPLETE_TAG,
    PROMOTION_METRIC,
    TrackingError,
    _client,
    if_found,
)

log = logging.getLogger("fedmedclip.tracking")


class PromotionRefused(TrackingError):
    """The candidate is worse than the current alias holder and the override was not given."""


class DifferentDataRefused(PromotionRefused):
    """The candidate and the current alias holder were trained on different data sets or partitions."""


class PrivacyRefused(PromotionRefused):
    """The candidate's record-level epsilon is above `max_epsilon`, or it was trained without DP."""


LEGACY_PROMOTION_METRICS = ("final_global_bacc",)  # its name before metrics were grouped (older versions)
DEFAULT_ALIAS = "champion"
ONNX_MODEL_NAME = "onnx_model"  # name of the logged ONNX model inside the run
ONNX_FILE = "model.onnx"  # file name MLflow's onnx flavour stores the graph under
# protobuf cannot serialise a single message above 2 GiB.
_MAX_INLINE_ONNX = 2**31 - 2**20
# The digests that say which data a version was trained on; promotion compares only like with like.
DATA_DIGEST_TAGS = ("dataset_digest", "partition_digest")
LINEAGE_TAGS = (
    "method",
    "partition_digest",
    "dataset_digest",
    "backbone",
    "backbone_sha256",
    "feature_provenance_digest",
    "git_commit",
)

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


def check_onnx_contract(model, source: str = "the ONNX file"):
    """The export contract (fedmedclip.onnx_contract, as the server checks it) plus what registration needs:
    the backbone's hash, which must be the run's."""
    from fedmedclip.onnx_contract import ContractError, contract_of_model

    try:
        contract = contract_of_model(model, source)
    except ContractError as exc:
        raise TrackingError(f'{exc} (docs/contracts.md, "Exported model")') from None
    if not contract.metadata.get(META_BACKBONE_SHA256):
        raise TrackingError(f"{source}: metadata_props lack {META_BACKBONE_SHA256} (docs/contracts.md)")
    return contract


def _onnx_signature(contract):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    inputs, outputs = contract.signature()
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(t), shape, name) for name, t, shape in inputs]),
        outputs=Schema([TensorSpec(np.dtype(t), shape, name) for name, t, shape in outputs]),
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
    return if_found(client.get_registered_model, name) is not None


REGISTRATION_KEY_TAG = "fedmedclip.registered_from"  # on a version: the sha256 of its ONNX file, or "model/"
LOGGED_ONNX_TAG_PREFIX = "fedmedclip.onnx_model."  # on a run: the URI of the ONNX model logged for a file


def _version_of_run(client, name: str, run_id: str, source_key: str):
    """The version of `name` registered from `run_id` with `source_key`, if there is one."""
    if not re.fullmatch(r"[A-Za-z0-9]+", run_id):
        return None
    versions = if_found(client.search_model_versions, f"name = '{name}' and run_id = '{run_id}'", default=[])
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
    card (mlops/model_card.py), logged beside the model; a run whose card cannot be built is refused.

    Idempotent, keyed on the run and the file: a version of `name` already registered from this run with the
    same ONNX file (`onnx_source_sha256`; or, without a file, the run's model folder) is returned as it is
    (`existing=True`), and an ONNX model already logged into the run for this file is reused. So a retried
    registration task finds its own version instead of adding another."""
    import mlflow

    from .model_card import download_run_files

    client, _ = _client(tracking_uri)
    mlrun = if_found(client.get_run, run_id)
    if mlrun is None:
        raise TrackingError(f"no MLflow run {run_id!r} on {mlflow.get_tracking_uri()}")
    run_tags = mlrun.data.tags
    if run_tags.get(COMPLETE_TAG) != "complete":
        raise TrackingError(
            f"run {run_id} was not logged from a complete run directory (`fedmedclip track`); refusing to "
            "register a model without its lineage"
        )
    with tempfile.TemporaryDirectory() as tmp:
        # The run's files a model card is built from, downloaded once: checked before registering, the card
        # logged after.
        run_dir = download_run_files(client, mlrun, Path(tmp))
        return _register(client, mlrun, run_dir, name, onnx_path)


def _register(client, mlrun, run_dir: Path, name: str, onnx_path) -> RegisteredVersion:
    import mlflow
    import numpy as np
    from mlflow.exceptions import MlflowException

    from .model_card import check_card, log_model_card

    run_id, run_tags = mlrun.info.run_id, mlrun.data.tags
    tags = {k: run_tags[k] for k in LINEAGE_TAGS if k in run_tags}
    tags.update(privacy_summary(check_card(run_dir)))
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
        try:
            model = onnx.load(str(onnx_path))
        except Exception as e:
            raise TrackingError(f"{onnx_path} is not a readable ONNX model: {e}") from e
        contract = check_onnx_contract(model, str(onnx_path))
        meta = contract.metadata
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
                    signature=_onnx_signature(contract),
                    # one black image, uint8 [1, S, S, 3]: the smallest valid request
                    input_example={
                        "images": np.zeros((1, contract.image_size, contract.image_size, 3), np.uint8)
                    },
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
    tags["model_card"] = log_model_card(client, mlrun, run_dir, name, str(mv.version), tags, site)
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
    names = (PROMOTION_METRIC, *LEGACY_PROMOTION_METRICS)
    if mv.run_id:
        run = if_found(client.get_run, mv.run_id)
        metrics = run.data.metrics if run is not None else {}
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
    client, _ = _client(tracking_uri)
    version = str(version)
    mv = if_found(client.get_model_version, name, version)
    if mv is None:
        raise TrackingError(f"registered model {name!r} has no version {version}")
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

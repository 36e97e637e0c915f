"""The model registry: a version registered from a tracked run (`register_model`: its ONNX file, lineage and
model card), and promoted to an alias only when it is at least as good as the holder, on the same data
(`promote`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedmedclip.digests import (
    META_BACKBONE_SHA256,
    META_MODEL_DIGEST,
    META_RUN_ID,
    MODEL_DIGEST_FILES,
    ONNX_SHA256_TAG,
    model_dir_digest,
    sha256_file,
)
from fedmedclip.errors import shown

from .promotion import PromotionPolicy
from .tracking import COMPLETE_TAG, PROMOTION_METRIC, TrackingError, _client, _num, if_found, unless_exists

log = logging.getLogger("fedmedclip.tracking")


class PromotionRefused(TrackingError):
    """The candidate is worse than the current alias holder and the override was not given."""


class DifferentDataRefused(PromotionRefused):
    """The candidate and the current alias holder were trained on different data sets or partitions."""


class PrivacyRefused(PromotionRefused):
    """The candidate's record-level epsilon is above `max_epsilon`, or it was trained without DP."""


class NoOnnxRefused(PromotionRefused):
    """The candidate holds no ONNX model (registered from a run's model/ folder): the alias would not serve."""


LEGACY_PROMOTION_METRICS = ("final_global_bacc",)  # its name before metrics were grouped (older versions)
ONNX_MODEL_NAME = "onnx_model"  # name of the logged ONNX model inside the run
ONNX_FILE = "model.onnx"  # file name MLflow's onnx flavour stores the graph under
# On a version beside onnx_sha256 (fedmedclip.digests): its model.onnx's size, which the server compares with
# the artifact store's listing before downloading it (a file replaced by a huge one never reaches its disk).
ONNX_BYTES_TAG = "onnx_bytes"
# protobuf cannot serialise a single message above 2 GiB.
_MAX_INLINE_ONNX = 2**31 - 2**20
# The digests that say which data a version was trained on; promotion compares only like with like.
DATA_DIGEST_TAGS = ("dataset_digest", "partition_digest")
LINEAGE_TAGS = (
    "method",
    *DATA_DIGEST_TAGS,
    "backbone",
    "backbone_sha256",
    "feature_provenance_digest",
    "git_commit",
)
REGISTRATION_KEY_TAG = "fedmedclip.registered_from"  # on a version: the sha256 of its ONNX file, or "model/"
# On a version from an ONNX file: the run's model digest (digests.model_digest), which the file records.
MODEL_DIGEST_TAG = "model_digest"
LOGGED_ONNX_TAG_PREFIX = "fedmedclip.onnx_model."  # on a run: the URI of the ONNX model logged for a file


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


def _onnx_signature(contract):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    specs = [[TensorSpec(np.dtype(t), shape, name) for name, t, shape in io] for io in contract.signature()]
    return ModelSignature(*map(Schema, specs))


def _onnx_requirements() -> list[str]:
    # Explicit requirements skip MLflow's inference (a subprocess that loads the model: seconds). Written as the
    # CPU `onnxruntime` whichever build is installed; GPU images are built from constraints.txt, never from these.
    # Read from the installed distributions: importing onnxruntime to ask would load it for a version string.
    from importlib.metadata import PackageNotFoundError, version

    import onnx

    onnx_pin = f"onnx=={onnx.__version__}"
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(PackageNotFoundError):
            return [onnx_pin, f"onnxruntime=={version(dist)}"]
    return [onnx_pin, "onnxruntime"]


def _version_of_run(client, name: str, run_id: str, source_key: str):
    """The version of `name` registered from `run_id` with `source_key`, if there is one."""
    if not re.fullmatch(r"[A-Za-z0-9]+", run_id):
        return None
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    mine = [v for v in versions if v.tags.get(REGISTRATION_KEY_TAG) == source_key]
    return min(mine, key=lambda v: int(v.version)) if mine else None


def register_model(
    run_id: str, name: str, onnx_path: str | Path | None = None, tracking_uri: str | None = None
) -> RegisteredVersion:
    """Register a version of `name` from a logged run: with `onnx_path`, the file logged into the run as an
    MLflow ONNX model (`onnx_sha256`: the sha256 of the `model.onnx` the registry stores), refused unless it
    holds this run's model (its `fedmedclip.model_digest` is the run's, `model_digest`); without it, the run's
    `model/` artifacts as they are (not loadable as a pyfunc, not servable: `promote` refuses the version). The
    version carries the run's lineage tags, its privacy facts (`dp.*`) and a model card (mlops/model_card.py); a
    run whose card cannot be built is refused.

    Idempotent, keyed on the run and the file: a version already registered from this run with the same file
    (or, without one, the run's model folder) is returned as it is (`existing=True`), and an ONNX model already
    logged into the run for this file is reused, so a retried registration task finds its own version; two
    registrations at once end with one version (the later deletes its own)."""
    from .model_card import download_run_files

    client, uri = _client(tracking_uri)
    mlrun = if_found(client.get_run, run_id)
    if mlrun is None:
        raise TrackingError(f"no MLflow run {run_id!r} on {uri}")
    if mlrun.data.tags.get(COMPLETE_TAG) != "complete":
        raise TrackingError(
            f"run {run_id} was not logged from a complete run directory (`fedmedclip track`); refusing to "
            "register a model without its lineage"
        )
    with tempfile.TemporaryDirectory() as tmp:
        # The files a model card is built from, downloaded once: checked before registering, the card logged after.
        return _register(client, mlrun, download_run_files(client, mlrun, Path(tmp)), name, onnx_path)


def _register(client, mlrun, run_dir: Path, name: str, onnx_path) -> RegisteredVersion:
    import mlflow
    from mlflow.exceptions import MlflowException

    from .model_card import CARD_TAG, check_card, log_model_card

    run_id, run_tags = mlrun.info.run_id, mlrun.data.tags
    tags = {k: run_tags[k] for k in LINEAGE_TAGS if k in run_tags}
    # The privacy facts the promotion gate reads: computed from the files the version's card is built from (not
    # copied from the run's tags), so the card and the tags agree.
    tags.update(check_card(run_dir, f"MLflow run {run_id}"))
    tags["source_run_id"] = run_id
    if onnx_path is not None and not Path(onnx_path).is_file():
        raise TrackingError(f"ONNX file {onnx_path} does not exist")
    source_key = tags[REGISTRATION_KEY_TAG] = sha256_file(onnx_path) if onnx_path is not None else "model/"
    found = _version_of_run(client, name, run_id, source_key)
    if found is not None:
        log.info("%s version %s is already registered from run %s: reused", name, found.version, run_id)
        found_tags = dict(found.tags)
        if CARD_TAG not in found_tags:  # the attempt that registered it stopped before its card was logged
            contract = _onnx_contract(Path(onnx_path))[1] if onnx_path is not None else None
            found_tags[CARD_TAG] = log_model_card(
                client, mlrun, run_dir, name, str(found.version), found_tags, contract
            )
        return RegisteredVersion(name, str(found.version), run_id, found.source, found_tags, True)
    bacc = _accuracy(mlrun.data.metrics.get(PROMOTION_METRIC))  # as promote reads it
    if bacc is not None:
        tags[PROMOTION_METRIC] = f"{bacc:.6f}"
    is_new = if_found(client.get_registered_model, name) is None
    contract = None
    if onnx_path is not None:
        source, contract = _log_onnx(client, mlrun, Path(onnx_path), tags, run_dir)
    else:
        _run_model_digest(client, mlrun, run_dir)  # as with an ONNX file: a damaged model file is refused
        # MLflow 3's register_model wants a logged model under runs:/ URIs; a plain folder is registered
        # by its artifact location instead (downloadable with models:/NAME/VERSION, not a pyfunc).
        source = f"{mlrun.info.artifact_uri.rstrip('/')}/model"
    try:
        if onnx_path is not None:
            mv = mlflow.register_model(source, name, tags=tags)
        else:
            if is_new:  # unless another registration created the name since the look-up (it describes it)
                is_new = unless_exists(client.create_registered_model, name) is not None
            mv = client.create_model_version(name, source, run_id=run_id, tags=tags)
    except MlflowException as e:
        raise TrackingError(f"registering {source} as {name!r} failed: {e.message}") from e
    # Two registrations of this run at once both found no version and created one each: the later gives way to
    # the earlier (the lowest number, what a look-up returns), deleting its own before anything refers to it.
    first = _version_of_run(client, name, run_id, source_key)
    if first is not None and str(first.version) != str(mv.version):
        client.delete_model_version(name, mv.version)
        log.info("%s version %s was registered from run %s meanwhile: reused", name, first.version, run_id)
        return RegisteredVersion(name, str(first.version), run_id, first.source, dict(first.tags), True)
    if is_new:
        client.set_registered_model_tag(name, "project", "fedmedclip")
        client.update_registered_model(name, description="FedMedCLIP classifier (see docs/contracts.md)")
    metric = f", {PROMOTION_METRIC} {bacc:.4f}" if bacc is not None else ""
    epsilon = tags.get("dp.epsilon")
    privacy = f", DP epsilon {epsilon} (delta {tags['dp.delta']})" if epsilon else ", no record-level DP"
    description = f"{tags.get('method', '?')} from run {run_id}{metric}{privacy}"
    client.update_model_version(name, mv.version, description=description)
    tags[CARD_TAG] = log_model_card(client, mlrun, run_dir, name, str(mv.version), tags, contract)
    log.info("registered %s version %s from %s", name, mv.version, source)
    return RegisteredVersion(name, str(mv.version), run_id, source, tags)


def _run_model_digest(client, mlrun, dest: Path) -> str:
    """The model digest of a logged run (digests.model_digest), from its model files, downloaded to `dest`."""
    from .model_card import download_run_files

    model_files = [f"model/{file_name}" for file_name in MODEL_DIGEST_FILES]
    download_run_files(client, mlrun, dest, model_files, (), "to check its model files")
    try:
        return model_dir_digest(dest / "model", where=f"MLflow run {mlrun.info.run_id}'s artifacts model")
    except ValueError as exc:
        raise TrackingError(str(exc)) from None


def _check_lineage(onnx_path: Path, contract, run_id: str, run_digest: str) -> None:
    """Refuse a file that does not hold this run's model: its recorded model digest must be the run's."""
    recorded = contract.metadata.get(META_MODEL_DIGEST, "")
    if not recorded:
        raise TrackingError(
            f"{onnx_path} does not record which run's model it holds (no {META_MODEL_DIGEST}: exported "
            f"before exports recorded it); export it again from run {run_id}'s directory (`fedmedclip export "
            "RUN_DIR`) and register that file"
        )
    if recorded != run_digest:
        raise TrackingError(
            f"{onnx_path} holds another run's model: its {META_MODEL_DIGEST} {recorded[:12]} (exported with "
            f"run id {contract.metadata.get(META_RUN_ID, '')!r}) is not MLflow run {run_id}'s "
            f"{run_digest[:12]}; register it with the run it was exported from, or export this run's model "
            "(`fedmedclip export RUN_DIR`) and register that"
        )


@contextlib.contextmanager
def _quiet_provider_check():
    """MLflow checks the input example by loading the model here, on the machine that registers it, and warns
    that the CUDA provider the model declares (for the GPU servers that load it) is missing: not this
    command's concern, so not shown while it logs the model."""

    def quiet(record: logging.LogRecord) -> bool:  # a logging filter may be any callable
        return "execution providers" not in record.getMessage()

    logger = logging.getLogger("mlflow.onnx")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _onnx_contract(onnx_path: Path):
    """The ONNX file's model and its export contract, as the server checks it (TrackingError naming the file)."""
    import onnx

    from fedmedclip.onnx_contract import ContractError, contract_of_model

    try:
        model = onnx.load(str(onnx_path))
    except Exception as e:
        raise TrackingError(f"{onnx_path} is not a readable ONNX model: {e}") from e
    try:
        return model, contract_of_model(model, str(onnx_path))
    except ContractError as exc:
        raise TrackingError(f'{exc} (docs/contracts.md, "Exported model")') from None


def _log_onnx(client, mlrun, onnx_path: Path, tags: dict, run_dir: Path):
    """Check the file (the contract, the run's backbone, the run's model: `run_dir` receives the run's model
    files), record its hashes in `tags` and log it into the run as an MLflow ONNX model, once per file (a
    retry reuses what an earlier attempt logged). Returns the model's URI and its contract."""
    import mlflow
    import numpy as np
    import onnx

    run_id = mlrun.info.run_id
    model, contract = _onnx_contract(onnx_path)
    backbone = contract.metadata.get(META_BACKBONE_SHA256)
    if not backbone:
        raise TrackingError(f"{onnx_path}: metadata_props lack {META_BACKBONE_SHA256} (docs/contracts.md)")
    if tags.get("backbone_sha256") not in (None, "unknown", backbone):
        raise TrackingError(
            f"{onnx_path} was exported from backbone {backbone[:12]} but run {run_id} trained on "
            f"{tags['backbone_sha256'][:12]}: not the model of this run"
        )
    run_digest = _run_model_digest(client, mlrun, run_dir)
    _check_lineage(onnx_path, contract, run_id, run_digest)
    tags[MODEL_DIGEST_TAG] = run_digest
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
        tags[ONNX_SHA256_TAG] = sha256_file(stored)
        tags[ONNX_BYTES_TAG] = str(stored.stat().st_size)
    tags.update(onnx_source_sha256=tags[REGISTRATION_KEY_TAG], onnx_file=ONNX_FILE)
    logged_tag = f"{LOGGED_ONNX_TAG_PREFIX}{tags[REGISTRATION_KEY_TAG][:16]}"
    source = mlrun.data.tags.get(logged_tag)  # logged by an earlier attempt that failed before registering
    if source is None:
        size = contract.image_size
        with mlflow.start_run(run_id=run_id), _quiet_provider_check():
            source = mlflow.onnx.log_model(
                model,
                name=ONNX_MODEL_NAME,
                signature=_onnx_signature(contract),
                # one black image, uint8 [1, S, S, 3]: the smallest valid request
                input_example={"images": np.zeros((1, size, size, 3), np.uint8)},
                pip_requirements=_onnx_requirements(),
                metadata=dict(tags),
                # one self-contained model.onnx: what the server downloads and checks against onnx_sha256
                save_as_external_data=False,
            ).model_uri
        client.set_tag(run_id, logged_tag, source)
    return source, contract


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
    already: bool = False  # the version held the alias already: nothing was changed

    def describe(self) -> str:
        if self.already:
            return (
                f"{self.name} version {self.version} is @{self.alias} already ({PROMOTION_METRIC} "
                f"{self.candidate_metric:.4f}); nothing changed\nload it with models:/{self.name}@{self.alias}"
            )
        prev = f"previous: version {self.previous_version}, {PROMOTION_METRIC} {_fmt(self.previous_metric)}"
        prev = prev if self.previous_version is not None else "no previous holder"
        note = " (worse than the previous holder: promoted with --allow-worse)" if self.overridden else ""
        if self.different_data:
            note += f" (trained on other data than the previous holder: {', '.join(self.different_data)} differ; promoted with --allow-different-data)"
        return (
            f"{self.name} version {self.version} is now @{self.alias} ({PROMOTION_METRIC} "
            f"{self.candidate_metric:.4f}; {prev}){note}\nload it with models:/{self.name}@{self.alias}"
        )


def _fmt(metric: float | None) -> str:
    return "(no metric)" if metric is None else f"{metric:.4f}"


def _version_metric(client, mv) -> float | None:
    run = if_found(client.get_run, mv.run_id) if mv.run_id else None
    # The run may be gone (deleted experiment); registration copied the number onto the version.
    places = (run.data.metrics if run is not None else {}, mv.tags)
    found = [
        _accuracy(place.get(n)) for place in places for n in (PROMOTION_METRIC, *LEGACY_PROMOTION_METRICS)
    ]
    return next((v for v in found if v is not None), None)


def _accuracy(raw) -> float | None:
    """A balanced accuracy as a number from 0 to 1, None for anything else: anyone who may register may write a
    version's tags, and a NaN compares as no worse than any holder (`nan < 0.6` is False), a 5.0 as better."""
    value = _num(raw)
    return value if value is not None and 0.0 <= value <= 1.0 else None


def check_privacy_budget(
    name: str, version: str, tags: dict, max_epsilon: float, max_delta: float = 0.0
) -> None:
    """PrivacyRefused unless the version was trained with record-level DP at epsilon <= max_epsilon (and, given
    `max_delta`, delta <= max_delta)."""
    mode = tags.get("dp.mode", "none")
    if "record" not in mode.split("+"):
        raise PrivacyRefused(
            f"refusing to promote {name} version {version} under --max-epsilon {max_epsilon:g}: it was trained "
            f"without record-level differential privacy (dp.mode {mode}); train with --dp-target-epsilon"
        )
    epsilon = _num(tags.get("dp.epsilon"))
    if epsilon is None:
        raise PrivacyRefused(
            f"refusing to promote {name} version {version} under --max-epsilon {max_epsilon:g}: its record-level "
            "epsilon is unknown (a site sent updates without a privacy report that bounds them; see its model card)"
        )
    if epsilon > max_epsilon:
        raise PrivacyRefused(
            f"refusing to promote {name} version {version}: its epsilon {tags.get('dp.epsilon') or '(none)'} "
            f"(delta {tags.get('dp.delta', '?')}, largest over its sites) is above --max-epsilon {max_epsilon:g}"
        )
    delta = _num(tags.get("dp.delta"))
    if not max_delta or (delta is not None and 0.0 <= delta <= max_delta):
        return
    refused = f"refusing to promote {name} version {version} under --max-delta {max_delta:g}: its delta"
    if delta is None or delta < 0.0:  # no tag, or one no accountant writes (the registry's tags are editable)
        raise PrivacyRefused(f"{refused} {shown(tags.get('dp.delta'))} is unknown or not a probability")
    raise PrivacyRefused(
        f"{refused} {delta:g} is above it (epsilon {shown(tags.get('dp.epsilon'))} holds at that delta, a "
        "weaker guarantee than the budget's)"
    )


def check_servable(name: str, version: str, tags: dict, alias: str) -> None:
    """NoOnnxRefused unless the version holds an ONNX model: the `onnx_sha256` tag registration sets for one,
    without which `serve models:/NAME@ALIAS` refuses to load it."""
    if tags.get(ONNX_SHA256_TAG):
        return
    source = tags.get(REGISTRATION_KEY_TAG)
    why = "registered from its run's model/ folder" if source == "model/" else f"no {ONNX_SHA256_TAG} tag"
    raise NoOnnxRefused(
        f"refusing to promote {name} version {version} to @{alias}: it holds no ONNX model ({why}), so "
        f"`serve models:/{name}@{alias}` could not load it; export the run (`fedmedclip export RUN_DIR --out "
        f"model.onnx`), register it with `fedmedclip register RUN_ID --name {name} --onnx model.onnx` (in the "
        "pipeline: a non-empty export_site) and promote that version"
    )


def data_differences(candidate_tags: dict, holder_tags: dict) -> dict[str, tuple[str, str]]:
    """The data digests (DATA_DIGEST_TAGS) on which two versions differ, as tag -> (candidate, holder).
    A digest missing on either side counts as different: nothing says the data are the same."""
    pairs = {tag: (candidate_tags.get(tag, ""), holder_tags.get(tag, "")) for tag in DATA_DIGEST_TAGS}
    return {tag: (a or "(none)", b or "(none)") for tag, (a, b) in pairs.items() if not a or a != b}


def promote(
    name: str, version: str | int, policy: PromotionPolicy | None = None, tracking_uri: str | None = None
) -> Promotion:
    """Point `models:/NAME@ALIAS` at `version` under `policy` (its defaults when None). Balanced accuracies
    compare only on the same test data: refused (DifferentDataRefused) when the candidate and the holder differ in
    a data digest unless `allow_different_data`, and (PromotionRefused) when the candidate's PROMOTION_METRIC is
    below the holder's unless `allow_worse`; overrides are logged and recorded as tags. With `max_epsilon` (0: no
    budget), a version without record-level DP or with a larger epsilon (its `dp.epsilon` tag) is refused
    (PrivacyRefused); no override. A version without an ONNX model (registered without --onnx) is refused
    (NoOnnxRefused): the alias is what `serve models:/NAME@ALIAS` loads."""
    policy = policy or PromotionPolicy()
    alias, max_epsilon = policy.promote_alias, policy.max_epsilon
    client, _ = _client(tracking_uri)
    version = str(version)
    mv = if_found(client.get_model_version, name, version)
    if mv is None:
        raise TrackingError(f"registered model {name!r} has no version {version}")
    if max_epsilon:
        check_privacy_budget(name, version, mv.tags, max_epsilon, policy.max_delta)
    check_servable(name, version, mv.tags, alias)
    candidate = _version_metric(client, mv)
    if candidate is None:
        raise TrackingError(
            f"{name} version {version} has no {PROMOTION_METRIC} from 0 to 1 (neither on its run nor as a tag); "
            "only versions registered from a tracked run directory can be promoted"
        )
    # A missing alias is an INVALID_PARAMETER_VALUE error from the server: read the alias table instead.
    holder = client.get_registered_model(name).aliases.get(alias)
    previous = str(holder) if holder is not None else None
    if previous == version:
        # Asked again (a retried register task, say): the first promotion's record, naming the version it
        # replaced, stays as it is.
        return Promotion(name, version, alias, candidate, None, None, False, already=True)
    previous_metric, overridden, different = None, False, {}
    if previous is not None:
        current = client.get_model_version(name, previous)
        different = data_differences(mv.tags, current.tags)
        if different and not policy.allow_different_data:
            listed = "; ".join(
                f"{tag} {cand[:12]} (version {version}) vs {was[:12]} (version {previous})"
                for tag, (cand, was) in different.items()
            )
            raise DifferentDataRefused(
                f"refusing to compare {name} version {version} with the current @{alias} (version {previous}): "
                f"they were trained on different data ({listed}), so their balanced accuracies are not "
                "comparable; pass --allow-different-data to promote it anyway"
            )
        previous_metric = _version_metric(client, current)
        overridden = previous_metric is None or candidate < previous_metric
        if overridden and not policy.allow_worse:
            raise PromotionRefused(
                f"cannot compare: the current @{alias} ({name} version {previous}) has no "
                f"{PROMOTION_METRIC} from 0 to 1; pass --allow-worse to promote version {version} anyway"
                if previous_metric is None
                else f"refusing to promote {name} version {version} to @{alias}: its global balanced "
                f"accuracy {candidate:.4f} is below the current @{alias} (version {previous}) at "
                f"{previous_metric:.4f}; pass --allow-worse to override"
            )
    result = Promotion(name, version, alias, candidate, previous, previous_metric, overridden, different)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    reasons = {}
    if overridden:
        reasons[f"promotion_override.{alias}"] = (
            f"promoted to @{alias} with allow_worse at {stamp}: {PROMOTION_METRIC} {candidate:.4f} vs "
            f"version {previous} {_fmt(previous_metric)}"
        )
    if different:
        reasons[f"promotion_different_data.{alias}"] = (
            f"promoted to @{alias} with allow_different_data at {stamp}: "
            + "; ".join(f"{tag} {cand} vs version {previous} {was}" for tag, (cand, was) in different.items())
        )
    for tag, reason in reasons.items():
        client.set_model_version_tag(name, version, tag, reason[:5000])
        log.warning("%s version %s: %s", name, version, reason)
    client.set_registered_model_alias(name, alias, version)
    promoted = {
        "at": stamp,
        "previous_version": previous,
        "previous_metric": previous_metric,
        "metric": candidate,
        "allow_worse": overridden,
        "allow_different_data": sorted(different),
        "max_epsilon": max_epsilon,
        "max_delta": policy.max_delta,
    }
    client.set_model_version_tag(name, version, f"promoted.{alias}", json.dumps(promoted))
    return result

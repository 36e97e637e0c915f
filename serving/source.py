"""Where the served ONNX file comes from: a local path (file or a folder holding one .onnx, e.g. KServe's
/mnt/models), or the MLflow registry (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, artifacts on S3 behind
the MLflow server). Every model is verified before ONNX Runtime sees it: a registry model against the sha256
recorded at registration (model-version tag `onnx_sha256`; its size, `onnx_bytes`, bounds it before it is
downloaded), a file against `--expected-sha256` or else the sidecar `fedmedclip export` wrote next to it
(`model.onnx.sha256`). A file with neither is refused.

A registry model is downloaded into the folder its caller gives (`cache_dir`), which the caller owns: `serve`
gives --cache-dir, kept, or else a temporary folder it removes when it stops (serving/cli.py).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedmedclip.digests import ONNX_SHA256_TAG, is_sha256, read_sha256_sidecar, sha256_file, sha256_sidecar
from fedmedclip.paths import relative_id_problem

from .errors import ServingError

log = logging.getLogger("fedmedclip.serving")

# A registry version registered before `fedmedclip register` recorded its file's size (the `onnx_bytes` tag)
# is bounded by this: an fp32 CLIP ViT-L/14 ONNX is about 1.7 GB, and registration stores one file under
# protobuf's 2 GiB limit; a file listed larger was not registered, and would fill the pod's disk.
MAX_REGISTRY_ONNX_BYTES = 4 << 30


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    sha256: str  # of the file served, as verified (registry tag, --expected-sha256 or the sidecar)
    origin: str  # human-readable: the path, or "models:/NAME@ALIAS (version 3)"
    registry_version: str | None = None  # the MLflow model version the alias or URI resolved to

    @property
    def public_origin(self) -> str:
        """`origin` as a client may read it (model metadata): a registry model's reference, a file's name alone,
        since its absolute path told every client the server's folders (a temporary download's, a home's)."""
        return self.origin if self.registry_version else self.path.name

    @property
    def version(self) -> str:
        """What every answer carries as `model_version`: the registry version, or the file's sha256 prefix,
        so each prediction traces back to one registered model or one file."""
        return self.registry_version or self.sha256[:12]


def _normalise_sha(value: str, what: str) -> str:
    value = value.strip().lower()
    if not is_sha256(value):
        raise ServingError(f"{what} must be 64 hex digits (a sha256), got {value!r}")
    return value


def verify_sha256(path: Path, expected: str, what: str) -> str:
    expected, actual = _normalise_sha(expected, what), sha256_file(path)
    if actual != expected:
        raise ServingError(
            f"refusing to serve {path}: its sha256 is {actual} but {what} is {expected}: the file changed "
            "after it was exported/registered, or the wrong file was fetched."
        )
    return actual


def _pick_onnx(found: list[str], what: str) -> str:
    """The single .onnx path of `found` (a folder's files: an MLflow model directory, KServe's /mnt/models),
    else its model.onnx."""
    found = sorted(p for p in found if p.endswith(".onnx"))
    if len(found) == 1:
        return found[0]
    named = [p for p in found if p.rsplit("/", 1)[-1] == "model.onnx"]
    if len(named) == 1:
        return named[0]
    if not found:
        raise ServingError(f"{what} holds no .onnx file")
    raise ServingError(f"{what} holds several .onnx files ({found}); pass the file itself")


def is_registry(spec: str) -> bool:
    """Whether the `serve` argument names a registry model (downloaded), not a local file or folder."""
    return spec.startswith("models:/")


def resolve_model(
    spec: str,
    expected_sha256: str | None = None,
    cache_dir: str | None = None,
    tracking_uri: str | None = None,
) -> ResolvedModel:
    """Turn the `serve` argument into a verified local .onnx path (`tracking_uri`: the registry's server for
    models:/, else the project's one rule, fedmedclip.tracking_server). A registry model is downloaded into
    `cache_dir`, which the caller gives and owns (nothing here makes a folder that nobody removes)."""
    if is_registry(spec):
        return _from_registry(spec, expected_sha256, cache_dir, tracking_uri)
    path = Path(spec)
    if path.is_dir():
        found = [str(p) for p in path.rglob("*.onnx") if p.is_file()]
        path = Path(_pick_onnx(found, f"model folder {spec}"))
    elif not path.is_file():
        raise ServingError(
            f"model file {spec} not found (give an .onnx path, a folder, or models:/NAME@ALIAS)"
        )
    sidecar = sha256_sidecar(path).name
    try:
        recorded = expected_sha256 or read_sha256_sidecar(path)
    except (ValueError, OSError) as exc:
        raise ServingError(f"cannot verify {path}: {exc}") from None
    if recorded is None:
        raise ServingError(
            f"refusing to serve {path}: it has no sha256 sidecar ({sidecar}, written by `fedmedclip export`) and "
            "no --expected-sha256, so nothing says it is the file that was exported. Re-export it, pass "
            f"--expected-sha256 HASH, or record its hash with `sha256sum {path.name} > {sidecar}` if you trust the "
            "file."
        )
    what = "--expected-sha256" if expected_sha256 else f"the sha256 recorded in {sidecar}"
    return ResolvedModel(path, verify_sha256(path, recorded, what), str(path))


def _from_registry(
    uri: str, expected_sha256: str | None, cache_dir: str | None, tracking_uri: str | None
) -> ResolvedModel:
    if not cache_dir:  # a caller's mistake, not the model's
        raise ValueError(f"resolving {uri} needs cache_dir, the folder its caller owns to download it into")
    # Imported here: the core CLI and `predict` must not pay for mlflow.
    from mlops.registry import ONNX_BYTES_TAG
    from mlops.tracking import ListedArtifacts, artifact_problems, registered_version

    # The one rule of every command (never MLflow's default, which would create ./mlflow.db here), and
    # downloads through the tracking server as every MLflow client of this project makes them.
    _, mv = registered_version(uri, tracking_uri, f"{uri} needs the MLflow registry", ServingError)
    tags = mv.tags or {}
    tag = tags.get(ONNX_SHA256_TAG)
    if not tag:
        raise ServingError(
            f"{uri} (version {mv.version}) has no {ONNX_SHA256_TAG!r} tag, so its file cannot be verified; register it "
            "with `fedmedclip register`, which records the hash"
        )
    tag = _normalise_sha(tag, f"the registry tag {ONNX_SHA256_TAG} of {uri}")
    if expected_sha256 and _normalise_sha(expected_sha256, "--expected-sha256") != tag:
        raise ServingError(
            f"--expected-sha256 {expected_sha256} disagrees with {uri}'s {ONNX_SHA256_TAG} tag {tag}"
        )
    recorded = tags.get(ONNX_BYTES_TAG)
    if recorded is not None and not (
        recorded.isascii() and recorded.isdigit() and int(recorded) <= MAX_REGISTRY_ONNX_BYTES
    ):
        raise ServingError(
            f"{uri} (version {mv.version}) has the {ONNX_BYTES_TAG} tag {recorded[:40]!r}, not a size of at most "
            f"{MAX_REGISTRY_ONNX_BYTES} bytes"
        )
    # Download the pinned version, not the alias again: the alias may move between the two calls.
    pinned = f"models:/{mv.name}/{mv.version}"

    def artifact_errors():
        return artifact_problems(
            lambda exc: ServingError(
                f"refusing to serve {uri} (version {mv.version}): {pinned}/{exc.rel} {exc.why}"
            ),
            lambda why: ServingError(f"cannot download {pinned}: {why}"),
        )

    # Whoever can write the version's run may have replaced its file by a huge one: the artifact store's own
    # listing bounds it before it is downloaded, by its onnx_bytes tag, else (registered before that tag) by
    # MAX_REGISTRY_ONNX_BYTES. Only that file is downloaded: the server reads nothing else of the version.
    with artifact_errors():
        store = ListedArtifacts(mv.source)
        # `fedmedclip register` names the file it stored (its `onnx_file` tag); else the one a model folder
        # would give among the version's top-level files.
        rel = tags.get("onnx_file") or _pick_onnx(list(store.sizes), pinned)
        if problem := relative_id_problem(rel):  # it is placed under the cache
            raise ServingError(
                f"{pinned}'s model file {rel[:200]!r} is not a path inside the version: {problem}"
            )
        store.walk_into([rel])
        if recorded is None:
            why = f"above the {MAX_REGISTRY_ONNX_BYTES} bytes of a version without an {ONNX_BYTES_TAG} tag"
            size = store.check(rel, MAX_REGISTRY_ONNX_BYTES, why, at_most=True)
        else:
            size = store.check(
                rel, int(recorded), f"not at the {recorded} bytes its {ONNX_BYTES_TAG} tag records"
            )

    # Absolute: the path is reported and logged, and must not depend on the working directory.
    dst = Path(cache_dir).resolve()
    dst.mkdir(parents=True, exist_ok=True)
    # Into a folder of this process's own beside the cache, verified there, then moved into place: replicas
    # sharing a --cache-dir and starting together never read (or serve) a file another one is still writing.
    with tempfile.TemporaryDirectory(prefix=".fedmedclip-download-", dir=dst) as tmp:
        with artifact_errors():
            fetched = store.fetch(rel, Path(tmp), size)  # measured again: it may be replaced since listed
        sha = verify_sha256(
            fetched, tag, f"the registry tag {ONNX_SHA256_TAG} of {uri} (version {mv.version})"
        )
        # One folder per file (its sha256): replicas of two versions sharing --cache-dir (a rolling update) never
        # replace the file the other just verified, which it then refused to load as changed.
        path = dst / sha / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(fetched, path)
    log.info("fetched %s version %s to %s, sha256 %s verified", uri, mv.version, path, sha)
    return ResolvedModel(path, sha, f"{uri} (version {mv.version})", str(mv.version))

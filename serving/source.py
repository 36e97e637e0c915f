"""Where the served ONNX file comes from: a local path (file or a folder holding one .onnx, e.g. KServe's
/mnt/models), or the MLflow registry (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, artifacts on S3 behind
the MLflow server). Every model is verified before ONNX Runtime sees it: a registry model against the sha256
recorded at registration (model-version tag `onnx_sha256`), a file against `--expected-sha256` or else the
sidecar `fedmedclip export` wrote next to it (`model.onnx.sha256`). A file with neither is refused.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedmedclip.digests import ONNX_SHA256_TAG, is_sha256, read_sha256_sidecar, sha256_file, sha256_sidecar

from .errors import ServingError

log = logging.getLogger("fedmedclip.serving")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    sha256: str  # of the file served, as verified (registry tag, --expected-sha256 or the sidecar)
    origin: str  # human-readable: the path, or "models:/NAME@ALIAS (version 3)"
    registry_version: str | None = None  # the MLflow model version the alias or URI resolved to

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
    """Hash `path` and refuse a mismatch. Returns the hash."""
    expected, actual = _normalise_sha(expected, what), sha256_file(path)
    if actual != expected:
        raise ServingError(
            f"refusing to serve {path}: its sha256 is {actual} but {what} is {expected}: the file changed "
            "after it was exported/registered, or the wrong file was fetched."
        )
    return actual


def find_onnx(folder: Path, what: str) -> Path:
    """The single .onnx file in a folder (an MLflow model directory, KServe's /mnt/models), else its model.onnx."""
    found = sorted(p for p in folder.rglob("*.onnx") if p.is_file())
    if len(found) == 1:
        return found[0]
    named = [p for p in found if p.name == "model.onnx"]
    if len(named) == 1:
        return named[0]
    if not found:
        raise ServingError(f"{what} holds no .onnx file")
    raise ServingError(f"{what} holds several .onnx files ({[str(p) for p in found]}); pass the file itself")


def resolve_model(
    spec: str,
    expected_sha256: str | None = None,
    cache_dir: str | None = None,
    tracking_uri: str | None = None,
) -> ResolvedModel:
    """Turn the `serve` argument into a verified local .onnx path (`tracking_uri`: the registry's server for
    models:/, else the project's one rule, fedmedclip.tracking_server)."""
    if spec.startswith("models:/"):
        return _from_registry(spec, expected_sha256, cache_dir, tracking_uri)
    path = Path(spec)
    if path.is_dir():
        path = find_onnx(path, f"model folder {spec}")
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
    # Imported here: the core CLI and `predict` must not pay for mlflow.
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from mlops.tracking import registered_version

    # The one rule of every command (never MLflow's default, which would create ./mlflow.db here), and
    # downloads through the tracking server as every MLflow client of this project makes them.
    _, mv = registered_version(uri, tracking_uri, f"{uri} needs the MLflow registry", ServingError)
    tag = (mv.tags or {}).get(ONNX_SHA256_TAG)
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

    # Absolute: MLflow answers with absolute paths, which _move_into places relative to the download folder.
    dst = Path(cache_dir).resolve() if cache_dir else Path(tempfile.mkdtemp(prefix="fedmedclip-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    # Download the pinned version, not the alias again: the alias may move between the two calls.
    pinned = f"models:/{mv.name}/{mv.version}"
    # Into a folder of this process's own beside the cache, verified there, then moved into place: replicas
    # sharing a --cache-dir and starting together never read (or serve) a file another one is still writing.
    with tempfile.TemporaryDirectory(prefix=".fedmedclip-download-", dir=dst) as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=tmp))
        except (MlflowException, OSError) as exc:  # botocore/S3 and network errors are OSErrors or wrap them
            raise ServingError(f"cannot download {pinned}: {getattr(exc, 'message', exc)}") from None
        # `fedmedclip register` stores one model.onnx (its `onnx_file` tag), which find_onnx takes.
        fetched = find_onnx(local, f"{pinned} (downloaded to {local})") if local.is_dir() else local
        sha = verify_sha256(
            fetched, tag, f"the registry tag {ONNX_SHA256_TAG} of {uri} (version {mv.version})"
        )
        # One folder per file (its sha256): replicas of two versions sharing --cache-dir (a rolling update) never
        # replace the file the other just verified, which it then refused to load as changed.
        path = _move_into(Path(tmp), dst / sha, last=fetched)
    log.info("fetched %s version %s to %s, sha256 %s verified", uri, mv.version, path, sha)
    return ResolvedModel(path, sha, f"{uri} (version {mv.version})", str(mv.version))


def _move_into(tmp: Path, dst: Path, last: Path) -> Path:
    """Move every file downloaded under `tmp` to the same place under `dst`, each replacing what is there in one
    step (os.replace), `last` (the verified model) after its companions. Returns where `last` went."""
    for file in sorted(p for p in tmp.rglob("*") if p.is_file() and p != last) + [last]:
        target = dst / file.relative_to(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
    return dst / last.relative_to(tmp)

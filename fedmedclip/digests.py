"""What identifies things across the layers, defined once: the canonical digest of JSON-like objects, the
sha256 of a file and its sidecar, and the `fedmedclip.*` metadata keys (with the format version) of an
exported ONNX model (docs/contracts.md, "Exported model").

Standard library only at import (no torch, numpy, onnx): export, tracking, the server (whose image has no torch)
and the test fixtures all import it; `model_digest` reads safetensors files with the safetensors package.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# ---- the canonical digest --------------------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """`obj` as JSON with sorted keys and no whitespace: equal objects give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def canonical_digest(obj: Any) -> str:
    """sha256 (hex) of `canonical_json(obj)`: the digest of partitions, provenance, data sets and configs."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


# ---- file hashes and their sidecar -----------------------------------------------------------------------

SHA256_SIDECAR_SUFFIX = ".sha256"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """A hash (hex) of a file's bytes, read in 1 MiB chunks (models are hundreds of MiB); MD5 is S3's ETag,
    not for security. (hashlib.file_digest is Python 3.11+; 3.10 is supported.)"""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_digest(path)


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def is_sha256(value: str) -> bool:
    """64 lowercase hex digits."""
    return bool(_SHA256_HEX.match(value))


def sha256_sidecar(path: str | Path) -> Path:
    """`model.onnx` -> `model.onnx.sha256`, where `write_sha256_sidecar` records the file's hash."""
    path = Path(path)
    return path.with_name(path.name + SHA256_SIDECAR_SUFFIX)


def write_sha256_sidecar(path: str | Path, digest: str | None = None) -> str:
    """Write `<hex>  <file name>` (the `sha256sum` format, so `sha256sum -c model.onnx.sha256` checks it)
    next to `path`; hashes the file unless `digest` is given. Returns the hash."""
    path = Path(path)
    digest = sha256_file(path) if digest is None else digest.lower()
    if not is_sha256(digest):
        raise ValueError(f"not a sha256: {digest!r}")
    from .federation.storage import atomic_write_bytes  # a temporary file of its own: writers never meet

    atomic_write_bytes(sha256_sidecar(path), f"{digest}  {path.name}\n".encode())
    return digest


def read_sha256_sidecar(path: str | Path) -> str | None:
    """The hash recorded in `path`'s sidecar, or None when it has none. A sidecar that is not one line
    `<64 hex>` (optionally followed by the file name, as `sha256sum` writes it), or that names another
    file, raises ValueError naming the sidecar."""
    path = Path(path)
    sidecar = sha256_sidecar(path)
    if not sidecar.exists():  # a folder or other non-file there is an error reading it, not "no sidecar"
        return None
    lines = [line for line in sidecar.read_text(errors="replace").splitlines() if line.strip()]
    fields = lines[0].split(maxsplit=1) if len(lines) == 1 else []
    digest = fields[0].lower() if fields else ""
    if not is_sha256(digest):
        raise ValueError(
            f"{sidecar} is not a sha256 sidecar: expected one line '<64 hex digits>  {path.name}'"
        )
    if len(fields) == 2:
        named = fields[1].strip().lstrip("*")  # sha256sum marks binary mode with '*'
        if Path(named).name != path.name:
            raise ValueError(f"{sidecar} records the hash of {named!r}, not of {path.name!r}")
    return digest


# The registered model version's tag recording its ONNX file's sha256 (set at registration, checked by serving).
ONNX_SHA256_TAG = "onnx_sha256"


# ---- the digest of a run's model -------------------------------------------------------------------------
# Which run an exported file came from: `fedmedclip.run_id` cannot say (every `train` run is "inprocess"), so
# an export records the digest of the run's selected model, which registration recomputes from the run's logged
# files. Over the files every export path reads and the registry holds: the selected round's global module as
# the sites received it and the class-prompt embeddings (a site's own part never leaves the site). Over the
# tensors (name, dtype, shape, bytes), not the files' bytes: a run directory and a site's export from its
# private state write the same tensors through different code.
MODEL_DIGEST_FILES = ("global.safetensors", "text_features.safetensors")
_MODEL_DIGEST_DOMAIN = b"fedmedclip-model-digest-1\0"


def _safetensors_entries(data: bytes, source: str) -> list[tuple[str, str, list, bytes]]:
    """(name, dtype, shape, bytes) of every tensor of a safetensors file's content, by name, as the safetensors
    package parses it (no torch or numpy). ValueError names `source` when the content is not a safetensors
    file."""
    import safetensors

    try:
        tensors = safetensors.deserialize(bytes(data))
    except Exception as exc:  # noqa: BLE001 - the package's SafetensorError and its Rust parser's panics
        raise ValueError(f"{source} is not a readable safetensors file ({exc})") from None
    return sorted((name, t["dtype"], list(t["shape"]), bytes(t["data"])) for name, t in tensors)


def model_digest(files: Mapping[str, bytes]) -> str:
    """sha256 (hex) of a run's model: the tensors of each MODEL_DIGEST_FILES file, given by name with its
    content. ValueError names a file that is missing or unreadable."""
    digest = hashlib.sha256(_MODEL_DIGEST_DOMAIN)
    for file_name in MODEL_DIGEST_FILES:
        if file_name not in files:
            raise ValueError(f"{file_name} is missing")
        entries = _safetensors_entries(files[file_name], file_name)
        digest.update(canonical_json([file_name, [[n, t, s, len(b)] for n, t, s, b in entries]]))
        for *_, raw in entries:
            digest.update(raw)
    return digest.hexdigest()


def model_dir_digest(model_dir: str | Path, where: str = "") -> str:
    """model_digest of a run's `model/` folder. ValueError names a file that is missing or unreadable, in
    `where` (default: the folder's path; a download's temporary folder means nothing to the user)."""
    files, where = {}, where or str(model_dir)
    for file_name in MODEL_DIGEST_FILES:
        try:
            files[file_name] = (Path(model_dir) / file_name).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {where}/{file_name}: {exc.strerror or exc}") from None
    try:
        return model_digest(files)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


# ---- metadata of an exported ONNX model ------------------------------------------------------------------

FORMAT_VERSION = "1"  # of the exported model's interface and metadata; the server reads exactly this one

META_CLASS_NAMES = "fedmedclip.class_names"  # JSON list of strings
META_IMAGE_SIZE = "fedmedclip.image_size"  # S of the uint8 [N, S, S, 3] input
META_PREPROCESSING = "fedmedclip.preprocessing"  # JSON of Preprocessing.describe()
META_BACKBONE = "fedmedclip.backbone"
META_BACKBONE_SHA256 = "fedmedclip.backbone_sha256"
META_METHOD = "fedmedclip.method"
META_SITE = "fedmedclip.site"
META_RUN_ID = "fedmedclip.run_id"  # "inprocess" for every `train` run: not the run's identity
META_MODEL_DIGEST = "fedmedclip.model_digest"  # model_digest of the run's model/: which run the file holds
META_PRECISION = "fedmedclip.precision"  # fp32 | fp16
META_FORMAT_VERSION = "fedmedclip.format_version"
META_EXPORTER = "fedmedclip.exporter"  # informational: which torch.onnx exporter wrote the graph
# informational: JSON of the run's privacy facts (fedmedclip.privacy.report.privacy_summary: dp.mode, dp.epsilon,
# dp.delta, dp.clip, dp.noise_multiplier, dp.secure_aggregation, ...), which the served model's metadata reports
META_PRIVACY = "fedmedclip.privacy"

# Every key of the contract, in the order docs/contracts.md lists them (META_EXPORTER is not part of it).
METADATA_KEYS = (
    META_CLASS_NAMES,
    META_IMAGE_SIZE,
    META_PREPROCESSING,
    META_BACKBONE,
    META_BACKBONE_SHA256,
    META_METHOD,
    META_SITE,
    META_RUN_ID,
    META_MODEL_DIGEST,
    META_PRECISION,
    META_FORMAT_VERSION,
)
# What a server cannot classify without (the format version is checked on its own, with its own message).
SERVING_METADATA_KEYS = (META_CLASS_NAMES, META_IMAGE_SIZE, META_PREPROCESSING)


def onnx_metadata(
    *,
    class_names: list[str] | tuple[str, ...],
    image_size: int,
    preprocessing: dict,
    backbone: str,
    backbone_sha256: str,
    method: str,
    site: str,
    run_id: str = "",
    model_digest: str = "",
    precision: str = "fp32",
) -> dict[str, str]:
    """The contract's metadata_props (all strings), every key of METADATA_KEYS."""
    return {
        META_CLASS_NAMES: json.dumps(list(class_names)),
        META_IMAGE_SIZE: str(int(image_size)),
        META_PREPROCESSING: json.dumps(preprocessing),
        META_BACKBONE: str(backbone),
        META_BACKBONE_SHA256: str(backbone_sha256),
        META_METHOD: str(method),
        META_SITE: str(site),
        META_RUN_ID: str(run_id),
        META_MODEL_DIGEST: str(model_digest),
        META_PRECISION: str(precision),
        META_FORMAT_VERSION: FORMAT_VERSION,
    }


# ---- the out-of-distribution score and the drift reference (optional parts of an exported model) ----------
# A model exported with an OOD score has two more outputs, `ood_score` float32 [N] (larger: further from the
# exporting party's data) and `drift_embedding` float32 [N, K] (the projection the drift statistic compares), and
# these metadata_props. A model without them still serves, without the OOD fields.

META_OOD_METHOD = "fedmedclip.ood.method"  # e.g. "mahalanobis-shared-covariance"
META_OOD_THRESHOLD = "fedmedclip.ood.threshold"  # a score above it is flagged out_of_distribution
META_OOD_FALSE_ALARM_RATE = "fedmedclip.ood.false_alarm_rate"  # the rate the threshold was calibrated to
META_OOD_CALIBRATION = "fedmedclip.ood.calibration"  # JSON: what it was fitted and calibrated on, counts
META_DRIFT_REFERENCE = "fedmedclip.drift.reference"  # base64 of little-endian float32 [R, K] embeddings
META_DRIFT_REFERENCE_SHAPE = "fedmedclip.drift.reference_shape"  # "R,K"
META_DRIFT_SIGMA = "fedmedclip.drift.sigma"  # Gaussian kernel bandwidth of the MMD (median heuristic)

OOD_METADATA_KEYS = (
    META_OOD_METHOD,
    META_OOD_THRESHOLD,
    META_OOD_FALSE_ALARM_RATE,
    META_OOD_CALIBRATION,
    META_DRIFT_REFERENCE,
    META_DRIFT_REFERENCE_SHAPE,
    META_DRIFT_SIGMA,
)
OOD_OUTPUTS = ("ood_score", "drift_embedding")


def ood_metadata(
    *,
    method: str,
    threshold: float,
    false_alarm_rate: float,
    calibration: dict,
    reference: bytes,
    reference_shape: tuple[int, int],
    sigma: float,
) -> dict[str, str]:
    """The OOD metadata_props (all strings). `reference`: the drift reference embeddings as little-endian
    float32 bytes of `reference_shape`."""
    import base64

    rows, dims = reference_shape
    if len(reference) != 4 * rows * dims:
        raise ValueError(f"reference holds {len(reference)} bytes, not float32 {rows}x{dims}")
    return {
        META_OOD_METHOD: method,
        META_OOD_THRESHOLD: repr(float(threshold)),
        META_OOD_FALSE_ALARM_RATE: repr(float(false_alarm_rate)),
        META_OOD_CALIBRATION: json.dumps(calibration, sort_keys=True),
        META_DRIFT_REFERENCE: base64.b64encode(reference).decode(),
        META_DRIFT_REFERENCE_SHAPE: f"{rows},{dims}",
        META_DRIFT_SIGMA: repr(float(sigma)),
    }


# ---- registered model references -------------------------------------------------------------------------


def parse_model_reference(ref: str) -> tuple[str, str | None, str | None] | None:
    """`NAME@ALIAS` -> (NAME, ALIAS, None), `NAME/VERSION` -> (NAME, None, VERSION), with or without the
    `models:/` prefix; None when `ref` is neither (each caller says so in its own words)."""
    rest = ref.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    return None

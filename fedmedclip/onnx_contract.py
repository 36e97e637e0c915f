"""The exported model's contract (docs/contracts.md, "Exported model (ONNX)"), checked in ONE place: by
registration on the onnx `ModelProto` it is about to store, and by serving on the ONNX Runtime session it is
about to serve. Both read the graph through the same small view (inputs, outputs, metadata_props), so a file
the registry accepts is a file the server starts on, and the other way round.

numpy and the standard library only (onnx is imported inside `contract_of_model`): the serving image has no
torch and no onnx.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field

import numpy as np

from .digests import (
    FORMAT_VERSION,
    META_CLASS_NAMES,
    META_DRIFT_REFERENCE,
    META_DRIFT_REFERENCE_SHAPE,
    META_DRIFT_SIGMA,
    META_FORMAT_VERSION,
    META_IMAGE_SIZE,
    META_OOD_CALIBRATION,
    META_OOD_FALSE_ALARM_RATE,
    META_OOD_METHOD,
    META_OOD_THRESHOLD,
    META_PRECISION,
    META_PREPROCESSING,
    OOD_METADATA_KEYS,
    OOD_OUTPUTS,
    SERVING_METADATA_KEYS,
)
from .errors import FedMedClipError, class_names_problem, shown
from .preprocess import MAX_IMAGE_SIZE, Preprocessing

INPUT = "images"
OUTPUTS = ("probabilities", "class_index")
# ONNX Runtime's spelling of the element types; a ModelProto's are mapped onto it.
_PROBABILITY_TYPES = ("tensor(float)", "tensor(float16)")
# What `fedmedclip export` writes in META_OOD_CALIBRATION (fedmedclip.ood.fit_ood, its `described` from export),
# any of it, and nothing else: the model card prints it and stores it as strict JSON after registration.
_CALIBRATION_STRINGS = ("holder", "fitted_on", "calibrated_on")
_CALIBRATION_COUNTS = (
    "fit_images",
    "fit_classes",
    "calibration_images",
    "embedding_dims",
    "reference_images",
)
_CALIBRATION_SHARES = ("covariance_shrinkage",)  # a Ledoit-Wolf shrinkage: from 0 to 1


class ContractError(FedMedClipError):
    """The model does not follow the export contract; the message names the file and the broken part."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # "tensor(uint8)", "tensor(float)", ... (ONNX Runtime's spelling)
    shape: tuple  # an int for a fixed dimension, anything else for a symbolic one


@dataclass(frozen=True)
class OodContract:
    """The exported OOD score's calibration and the drift reference."""

    method: str
    threshold: float
    false_alarm_rate: float
    calibration: dict
    reference: np.ndarray = field(repr=False)  # float32 [R, K]: embeddings of the exporting party's images
    sigma: float  # the MMD's Gaussian kernel bandwidth


@dataclass(frozen=True)
class ModelContract:
    """What registration and serving need from the ONNX metadata and signature."""

    class_names: tuple[str, ...]
    image_size: int
    preprocessing: Preprocessing
    precision: str
    metadata: dict[str, str] = field(repr=False)
    ood: OodContract | None = None  # None: an export without the OOD score (served without its fields)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def output_names(self) -> list[str]:
        return [*OUTPUTS, *(OOD_OUTPUTS if self.ood else ())]

    def signature(self) -> tuple[list[tuple], list[tuple]]:
        """(inputs, outputs) as (name, numpy dtype, shape) with -1 for a free dimension: the MLflow signature
        registration stores with the model."""
        s, c = self.image_size, self.num_classes
        outputs = [("probabilities", "float32", (-1, c)), ("class_index", "int64", (-1,))]
        if self.ood:
            outputs += [("ood_score", "float32", (-1,)), ("drift_embedding", "float32", (-1, -1))]
        return [(INPUT, "uint8", (-1, s, s, 3))], outputs


def contract_of_session(session, source: str) -> ModelContract:
    """The contract of an onnxruntime.InferenceSession's model (what the server checks at start-up)."""

    def infos(args) -> list[TensorInfo]:
        return [TensorInfo(a.name, a.type, tuple(a.shape)) for a in args]

    meta = dict(session.get_modelmeta().custom_metadata_map)
    return read_contract(infos(session.get_inputs()), infos(session.get_outputs()), meta, source)


def contract_of_model(model, source: str) -> ModelContract:
    """The contract of an onnx ModelProto (what registration checks before storing it)."""
    from onnx import TensorProto

    def infos(values, skip=frozenset()) -> list[TensorInfo]:
        out = []
        for v in values:
            if v.name in skip:
                continue
            t = v.type.tensor_type
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
            )
            out.append(TensorInfo(v.name, f"tensor({TensorProto.DataType.Name(t.elem_type).lower()})", dims))
        return out

    initializers = {t.name for t in model.graph.initializer}  # older IRs list them as inputs too
    meta = {p.key: p.value for p in model.metadata_props}
    return read_contract(infos(model.graph.input, initializers), infos(model.graph.output), meta, source)


def read_contract(
    inputs: list[TensorInfo], outputs: list[TensorInfo], meta: dict[str, str], source: str
) -> ModelContract:
    """Check the inputs, outputs and metadata_props against the contract; ContractError names what breaks it."""
    missing = [k for k in SERVING_METADATA_KEYS if k not in meta]
    if missing:
        raise ContractError(
            f"{source} is not a fedmedclip export: metadata_props lack {missing} (export it with `fedmedclip export`)"
        )
    version = meta.get(META_FORMAT_VERSION, "")
    if version != FORMAT_VERSION:
        raise ContractError(
            f"{source} has {META_FORMAT_VERSION}={version!r}; this version reads format {FORMAT_VERSION}"
        )
    try:
        class_names = tuple(str(c) for c in json.loads(meta[META_CLASS_NAMES]))
        image_size = int(meta[META_IMAGE_SIZE])
        recipe = json.loads(meta[META_PREPROCESSING])
    except (ValueError, KeyError, TypeError) as exc:
        raise ContractError(
            f"{source}: unreadable fedmedclip metadata ({type(exc).__name__}: {exc})"
        ) from None
    # Before the recipe's own check of its size, to name the key: 0 serves nonsense, -4 fails registration.
    if not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ContractError(
            f"{source}: {META_IMAGE_SIZE} is {image_size}; an image side is an integer from 1 to "
            f"{MAX_IMAGE_SIZE}"
        )
    try:
        pre = Preprocessing.from_dict(recipe)
    except (ValueError, KeyError, TypeError) as exc:
        raise ContractError(
            f"{source}: unusable {META_PREPROCESSING} ({type(exc).__name__}: {exc})"
        ) from None
    if not class_names:
        raise ContractError(f"{source}: {META_CLASS_NAMES} is empty")
    # Answered to every client, logged and printed by `predict`.
    if problem := class_names_problem(class_names):
        raise ContractError(f"{source}: {META_CLASS_NAMES}: {problem}")
    if pre.size != image_size:
        raise ContractError(
            f"{source}: preprocessing size {pre.size} != {META_IMAGE_SIZE} {image_size} (broken export)"
        )

    if len(inputs) != 1 or inputs[0].name != INPUT or inputs[0].type != "tensor(uint8)":
        got = [(i.name, i.type) for i in inputs]
        raise ContractError(f"{source}: expected one input 'images' of tensor(uint8), got {got}")
    shape = inputs[0].shape
    if len(shape) != 4 or [d for d in shape[1:] if isinstance(d, int)] not in (
        [image_size, image_size, 3],
        [],
    ):
        raise ContractError(
            f"{source}: input 'images' has shape {list(shape)}, expected [N, {image_size}, {image_size}, 3]"
        )
    by_name = {o.name: o for o in outputs}
    got = [(o.name, o.type) for o in outputs]
    for name, types in (("probabilities", _PROBABILITY_TYPES), ("class_index", ("tensor(int64)",))):
        if name not in by_name or by_name[name].type not in types:
            raise ContractError(f"{source}: expected output {name!r} of {types[0]}, got {got}")
    if set(by_name) - {*OUTPUTS, *OOD_OUTPUTS}:
        raise ContractError(
            f"{source}: outputs {got}, expected {list(OUTPUTS)} (and all or none of {list(OOD_OUTPUTS)})"
        )
    width = by_name["probabilities"].shape[-1] if by_name["probabilities"].shape else None
    if isinstance(width, int) and width != len(class_names):
        raise ContractError(f"{source}: {width} probabilities per image but {len(class_names)} class names")
    ood = _read_ood(meta, by_name, source) if any(n in by_name for n in OOD_OUTPUTS) else None
    return ModelContract(class_names, image_size, pre, meta.get(META_PRECISION, "fp32"), meta, ood)


def _read_ood(meta: dict[str, str], outputs: dict[str, TensorInfo], source: str) -> OodContract:
    """The OOD outputs and their metadata, all or nothing: a half-exported score is refused."""
    for name in OOD_OUTPUTS:
        if name not in outputs or outputs[name].type != "tensor(float)":
            raise ContractError(
                f"{source}: has OOD outputs but not {name!r} of tensor(float) (broken export)"
            )
    missing = [k for k in OOD_METADATA_KEYS if k not in meta]
    if missing:
        raise ContractError(
            f"{source}: has OOD outputs but its metadata_props lack {missing} (broken export)"
        )
    try:
        threshold = float(meta[META_OOD_THRESHOLD])
        rate = float(meta[META_OOD_FALSE_ALARM_RATE])
        sigma = float(meta[META_DRIFT_SIGMA])
        calibration = json.loads(meta[META_OOD_CALIBRATION])
        rows, dims = (int(x) for x in meta[META_DRIFT_REFERENCE_SHAPE].split(","))
        reference = np.frombuffer(base64.b64decode(meta[META_DRIFT_REFERENCE], validate=True), dtype="<f4")
        reference = reference.reshape(rows, dims).astype(np.float32)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ContractError(f"{source}: unreadable OOD metadata ({type(exc).__name__}: {exc})") from None
    if not (math.isfinite(threshold) and 0 < rate < 1 and math.isfinite(sigma) and sigma > 0):
        raise ContractError(
            f"{source}: OOD threshold {threshold}, false-alarm rate {rate} and kernel bandwidth {sigma} must be "
            "finite, the rate in (0, 1) and the bandwidth positive"
        )
    # The drift kernel divides by 2 sigma^2 (serving/monitor.py, in this order): at 0 or infinity every kernel
    # value is 0 or 1 and drift is never reported.
    if not 0 < 2.0 * sigma * sigma < math.inf:
        raise ContractError(
            f"{source}: 2 sigma^2 of kernel bandwidth {sigma} is not a finite number above 0 in float64"
        )
    if rows < 2 or not np.isfinite(reference).all():
        raise ContractError(f"{source}: the drift reference must hold 2 or more finite rows")
    _check_calibration(calibration, source)
    width = outputs["drift_embedding"].shape[-1] if outputs["drift_embedding"].shape else None
    if isinstance(width, int) and width != dims:
        raise ContractError(f"{source}: embeddings of {width} values but a drift reference of {dims}")
    return OodContract(meta[META_OOD_METHOD], threshold, rate, calibration, reference, sigma)


def _check_calibration(calibration, source: str) -> None:
    """ContractError unless `calibration` is what the exporter writes: some of its keys, each of its type."""
    if not isinstance(calibration, dict):
        raise ContractError(f"{source}: {META_OOD_CALIBRATION} is not a JSON object")
    unknown = set(calibration) - {*_CALIBRATION_STRINGS, *_CALIBRATION_COUNTS, *_CALIBRATION_SHARES}
    if unknown:
        keys = sorted(unknown)[:5]
        raise ContractError(
            f"{source}: {META_OOD_CALIBRATION} has keys {shown(keys)} that `fedmedclip export` never writes"
        )
    for key, value in sorted(calibration.items()):
        if key in _CALIBRATION_STRINGS:
            wrong, expected = type(value) is not str, "a string"
        elif key in _CALIBRATION_COUNTS:  # json reads NaN and 1e400 as floats; True is no count either
            wrong, expected = type(value) is not int or value < 0, "an integer from 0"
        else:
            wrong = type(value) not in (int, float) or not 0 <= value <= 1  # NaN compares false
            expected = "a number from 0 to 1"
        if wrong:
            raise ContractError(f"{source}: {META_OOD_CALIBRATION} {key} is {shown(value)}, not {expected}")

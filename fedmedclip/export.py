"""Export a trained predictor (fedmedclip.inference.ImageClassifier) to one self-contained ONNX file.

The graph follows docs/contracts.md ("Exported model"): input `images` uint8 [N, S, S, 3] with a dynamic
batch, outputs `probabilities` float32 [N, C] and `class_index` int64 [N], and the `fedmedclip.*`
metadata_props the server reads. torch.onnx's dynamo exporter is tried first; the TorchScript exporter
is the fallback, and `fedmedclip.exporter` records which one wrote the file.

fp16 casts only the CLIP image encoder to half precision: normalisation, the adaptation module, the
masks, the cosine logits (x100) and the ensemble stay float32, because the mask rule's `> 0.01` margin
and the x100 temperature would amplify half-precision rounding; the interface (uint8 in, float32
out) is the same for both precisions. ONNX Runtime's CPU provider runs the fp16 graph too (it
inserts casts around half-precision nodes it lacks kernels for), so parity is testable without a GPU.

Nothing non-finite is exported: the run's model files and every parameter and buffer of the classifier are
checked first, and a NaN or inf (or a negative BatchNorm variance, finite but a NaN once normalised) is refused
naming the file or tensor; then a probe batch runs through the model, and a non-finite answer is refused too. The written file's sha256 goes to a
sidecar next to it (`model.onnx.sha256`, `sha256sum` format), which `fedmedclip serve` verifies.

The metadata records which run's model the file holds (`fedmedclip.model_digest`, digests.model_digest of the
run's `model/`), whichever path exported it: registration recomputes it from the run's logged files.

With an OOD score (fedmedclip.ood, the default of `fedmedclip export`) the graph has two more outputs,
`ood_score` float32 [N] and `drift_embedding` float32 [N, K], computed from the same frozen features, and the
calibration in the metadata. It is fitted on what the exporting party holds: for the global model the
server's images (`export RUN`), for a site's own model that site's images, read by the site itself
(`export --state`, on the site's machine: its private MLP never leaves it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .backbone import Backbone
from .digests import (
    FORMAT_VERSION,  # noqa: F401 - part of this module's interface since the first export format
    META_EXPORTER,
    META_PRIVACY,
    OOD_OUTPUTS,
    model_dir_digest,
    onnx_metadata,
    ood_metadata,
    read_sha256_sidecar,
    sha256_file,
    sha256_sidecar,
    write_sha256_sidecar,
)
from .errors import ConfigError, FedMedClipError
from .inference import (
    GLOBAL,
    ImageClassifier,
    load_classifier,
    load_run_backbone,
    read_model_json,
    resolve_site,
)
from .jsonfiles import read_json_object
from .ood import DEFAULT_FALSE_ALARM_RATE, METHOD, OodFit, OodHead, fit_ood, split_for_calibration
from .paths import DEFAULT_CACHE_DIR, lock_folder
from .privacy.report import privacy_summary

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "class_index")
TORCHSCRIPT_OPSET = 17
OOD_MODES = ("require", "auto", "off")  # fit the OOD score, or fail / or export without it / never


class ScoredClassifier(torch.nn.Module):
    """The classifier and its OOD head on the same frozen features: (probabilities, class_index, ood_score,
    embedding)."""

    def __init__(self, classifier: ImageClassifier, ood: OodHead):
        super().__init__()
        self.classifier, self.ood = classifier, ood

    def forward(self, images_uint8: torch.Tensor):
        features = self.classifier.features(images_uint8)
        probabilities = self.classifier.head(features)
        score, embedding = self.ood(features)
        return probabilities, torch.argmax(probabilities, dim=1), score, embedding


def contract_metadata(meta: dict, precision: str, run_id: str = "", model_digest: str = "") -> dict[str, str]:
    """The `fedmedclip.*` metadata_props of docs/contracts.md, all strings, from model.json-style metadata."""
    return onnx_metadata(
        class_names=meta["class_names"],
        image_size=meta["preprocessing"]["size"],
        preprocessing=meta["preprocessing"],
        backbone=meta["backbone"]["name"],
        backbone_sha256=meta["backbone"].get("weights_sha256", ""),
        method=meta["method"],
        site=meta["site"],
        run_id=run_id,
        model_digest=model_digest,
        precision=precision,
    )


def _non_finite(tensor: torch.Tensor) -> str | None:
    """'3 NaN, 1 inf of 512 values' for a floating tensor holding any, else None."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return None
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(tensor).sum())
    return f"{nan} NaN, {int((~finite).sum()) - nan} inf of {tensor.numel()} values"


def check_classifier_finite(clf: torch.nn.Module, where: str) -> None:
    """Refuse a classifier with a non-finite parameter or buffer: its ONNX graph would answer NaN."""
    for kind, named in (("parameter", clf.named_parameters()), ("buffer", clf.named_buffers())):
        for name, tensor in named:
            problem = _non_finite(tensor.detach())
            if problem:
                raise FedMedClipError(
                    f"refusing to export {where}: its {kind} {name!r} is not finite ({problem}); the "
                    "training that produced it diverged or the model files are damaged"
                )


def _negative_variance(key: str, tensor: torch.Tensor) -> str | None:
    """'2 of 64 values below 0' for a BatchNorm running variance (`*.running_var`) holding any: finite, but the
    normalisation takes its square root, so the model would answer NaN."""
    if not key.endswith("running_var") or not tensor.is_floating_point():
        return None
    negative = int((tensor < 0).sum())
    return f"{negative} of {tensor.numel()} values below 0" if negative else None


def check_model_files_finite(run_dir: str | Path, site: str | int = GLOBAL) -> list[Path]:
    """Refuse a run whose model files for `site`'s predictor hold a NaN or inf, or a negative BatchNorm
    variance, naming the file and tensor. Reads the files the predictor may be built from: the class-prompt
    embeddings, the communicated module and the site's own file. Returns the files checked."""
    from safetensors import SafetensorError, safe_open

    meta = read_model_json(run_dir)
    name = resolve_site(meta, site)
    model_dir = Path(run_dir) / "model"
    candidates = ["text_features.safetensors", "global.safetensors"]
    if name != GLOBAL:
        candidates.append(f"site_{name}.safetensors")
    checked = []
    for file_name in candidates:
        path = model_dir / file_name
        if not path.is_file():
            continue  # load_classifier says which file a predictor needs and lacks
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensor = fh.get_tensor(key)
                    problem = _non_finite(tensor)
                    if problem:
                        raise FedMedClipError(
                            f"refusing to export site {name!r} of {run_dir}: {path} holds a non-finite "
                            f"tensor {key!r} ({problem}); the training that wrote it diverged or the file "
                            "is damaged"
                        )
                    problem = _negative_variance(key, tensor)
                    if problem:
                        raise FedMedClipError(
                            f"refusing to export site {name!r} of {run_dir}: {path} holds a BatchNorm variance "
                            f"{key!r} with {problem}, which no training writes; the file is damaged or was edited"
                        )
        except (SafetensorError, OSError) as exc:
            raise FedMedClipError(f"cannot read {path}: {exc}") from None
        checked.append(path)
    return checked


def _onnx_export(model: torch.nn.Module, example: torch.Tensor, path: Path, output_names, **exporter) -> None:
    """torch.onnx.export with the contract's input and output names, as one file (the server verifies a single
    hash); `exporter`: what differs between the exporters (how the batch axis is declared, the opset)."""
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=list(output_names),
        external_data=False,
        verbose=False,
        **exporter,
    )


def _export_dynamo(
    model: torch.nn.Module, example: torch.Tensor, path: Path, output_names=OUTPUT_NAMES
) -> None:
    batch = torch.export.Dim("batch", min=1)
    _onnx_export(model, example, path, output_names, dynamic_shapes=({0: batch},), dynamo=True)


def _export_torchscript(
    model: torch.nn.Module, example: torch.Tensor, path: Path, output_names=OUTPUT_NAMES
) -> None:
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *output_names)}
    _onnx_export(
        model, example, path, output_names, dynamic_axes=axes, opset_version=TORCHSCRIPT_OPSET, dynamo=False
    )


EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _quiet_torch_onnx_logs() -> None:
    # The dynamo exporter warns about every torchvision op when torchvision is absent (it always is here).
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    # onnxscript's optimiser logs every pass at INFO; our own log line says what was written.
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))


def write_graph(
    module: torch.nn.Module, example: torch.Tensor, path: Path, output_names, order: list[str]
) -> str:
    """Export `module` (input `images`, dynamic batch) to `path` with the first exporter of `order` that
    succeeds; returns its name. The classifier export and the feature extraction's ONNX Runtime engine
    (fedmedclip.encoders) both write their graphs through here."""
    errors = []
    _quiet_torch_onnx_logs()
    for name in order:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # exporter deprecation chatter, not about this model
                EXPORTERS[name](module, example, path, output_names=output_names)
        except Exception as exc:  # noqa: BLE001 - any exporter failure means: try the next one
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            log.warning("ONNX export with the %s exporter failed (%s)", name, errors[-1])
            path.unlink(missing_ok=True)
            continue
        if errors:
            log.warning("exported with the %s exporter after: %s", name, "; ".join(errors))
        return name
    raise FedMedClipError("ONNX export failed with every exporter:\n  " + "\n  ".join(errors))


def export_classifier(
    clf: ImageClassifier,
    meta: dict,
    out_path: str | Path,
    precision: str = "fp32",
    run_id: str = "",
    exporter: str = "auto",
    ood: OodFit | None = None,
    model_digest: str = "",
    source: str = "",
) -> Path:
    """Write `clf` (modified in place for fp16) as ONNX with the contract's names and metadata.
    `meta` needs class_names, preprocessing, backbone, method and site. `exporter`: auto (dynamo,
    then TorchScript on failure), dynamo or torchscript. `ood`: the fitted OOD score, exported with it.
    `model_digest`: the run's (`run_model_digest`), which registration checks the file against. `source`: where
    the model files are, for an error (default: meta's run_dir's model/ folder)."""
    import onnx

    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if exporter not in ("auto", *EXPORTERS):
        raise ConfigError(f"unknown exporter {exporter!r}; choose auto, dynamo or torchscript")
    out = Path(out_path)
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_classifier_finite(clf, f"the {meta.get('method', '?')} predictor of site {meta.get('site', '?')!r}")
    clf = clf.eval()
    if precision == "fp16":
        clf.encoder.half()
        # A weight beyond float16's range (65504) becomes inf: an error, never a silently broken graph.
        check_classifier_finite(clf, "the float16 encoder (a weight overflows float16; export in fp32)")
    elif clf.encoder_dtype() != torch.float32:
        raise ConfigError("this classifier's encoder was already halved (an fp16 export): reload it for fp32")
    size = clf.preprocessing.size
    # Batch 2, not 1: a size-1 example dimension would be specialised to a constant.
    example = torch.randint(
        0, 256, (2, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    module, names = (
        (clf, OUTPUT_NAMES)
        if ood is None
        else (ScoredClassifier(clf, ood.head).eval(), OUTPUT_NAMES + OOD_OUTPUTS)
    )
    where = source or (str(Path(meta["run_dir"]) / "model") if meta.get("run_dir") else "its model files")
    check_outputs_finite(module, example, names, f"site {meta.get('site', '?')!r} ({where})")

    try:  # a folder that takes no file is the system's one-line error, not every exporter failing in turn
        # A temporary file of this export's own: two exports to one --out never write into the same file.
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(name)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write the ONNX file there: {exc.strerror}", str(out)) from None
    used = write_graph(module, example, tmp, names, list(EXPORTERS) if exporter == "auto" else [exporter])

    try:
        model = onnx.load(str(tmp))
        metadata = {**contract_metadata(meta, precision, run_id, model_digest), META_EXPORTER: used}
        if ood is not None:
            metadata.update(
                ood_metadata(
                    method=METHOD,
                    threshold=ood.threshold,
                    false_alarm_rate=ood.false_alarm_rate,
                    calibration=ood.calibration,
                    reference=ood.reference.astype("<f4").tobytes(),
                    reference_shape=ood.reference.shape,
                    sigma=ood.sigma,
                )
            )
        if meta.get("privacy"):  # the run's differential-privacy facts (export_onnx reads them)
            metadata[META_PRIVACY] = json.dumps(meta["privacy"], sort_keys=True)
        del model.metadata_props[:]
        for key, value in metadata.items():
            model.metadata_props.add(key=key, value=value)
        _check_interface(
            model, size, len(meta["class_names"]), None if ood is None else ood.reference.shape[1]
        )
        onnx.checker.check_model(model)
        onnx.save_model(model, str(tmp))
        digest = sha256_file(tmp)
        put_export_in_place(tmp, out, digest)
    finally:
        tmp.unlink(missing_ok=True)
    log.info(
        "wrote %s (%s, %s exporter, opset %d, %.1f MiB), sha256 %s (recorded in %s)%s",
        out,
        precision,
        used,
        max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
        out.stat().st_size / 2**20,
        digest,
        sha256_sidecar(out).name,
        ""
        if ood is None
        else f"; OOD threshold {ood.threshold:.6g} at a false-alarm rate of {ood.false_alarm_rate:g}",
    )
    return out


def _out_problem(out: Path) -> str | None:
    """Why the export may not write `out` (None when it may): it is a folder, or a file that is not an earlier
    export of this tool, which the export would replace. An export is recognised by its sha256 sidecar (every
    export writes one) matching it: `--out RUN/results.json` destroyed a run's results."""
    if out.is_dir():
        return f"--out {str(out)!r} is a directory; give a file name such as model.onnx"
    if not os.path.lexists(out):
        return None
    try:  # is_file first: hashing a FIFO would wait for a writer
        if out.is_file() and sha256_file(out) in (read_sha256_sidecar(out), _pending_digest(out)):
            return None
    except (OSError, ValueError):  # an unreadable or malformed sidecar vouches for nothing
        pass
    return (
        f"--out {str(out)!r} already exists and is not a model this tool exported (no {sha256_sidecar(out).name} "
        "beside it matching it, as every export writes): it is left untouched; remove it or choose another path"
    )


@contextlib.contextmanager
def _out_folder_locked(out: Path):
    """Exports to one folder taking turns at checking and replacing their --out: an export puts the file, then
    its sidecar, in place, and another one looking between the two would see a file no sidecar vouches for and
    refuse it (two exports to one --out at once must both succeed)."""
    if not out.parent.is_dir():  # nothing there yet (created later), or a file above it (mkdir's error then)
        yield
        return
    with lock_folder(
        out.parent, on_wait=lambda: log.info("waiting for another process writing %s", out.parent)
    ):
        yield


def check_out(out: str | Path) -> None:
    """ConfigError in one line unless the export may write `out` (`_out_problem`); every export path checks it
    before loading anything, and again as it puts the file in place."""
    out = Path(out)
    with _out_folder_locked(out):
        problem = _out_problem(out)
    if problem:
        raise ConfigError(problem)


def _pending(out: Path) -> Path:
    """`model.onnx.sha256.pending`: the digest of the export being put in place, until its sidecar is."""
    sidecar = sha256_sidecar(out)
    return sidecar.with_name(sidecar.name + ".pending")


def _pending_digest(out: Path) -> str | None:
    try:
        return _pending(out).read_text().strip() or None
    except OSError:
        return None


def put_export_in_place(tmp: Path, out: Path, digest: str) -> None:
    """Rename the written export `tmp` (of sha256 `digest`) to `out` and write its sidecar, after checking again
    that `out` may be replaced: something else may have been put there while the model was exported. Its
    digest is recorded as pending first, so that an export stopped between the rename and the sidecar (a
    kill, a preempted pod) left a file its retry still recognises as an export (`_out_problem`), not one
    refused for good. The earlier sidecar is replaced, not removed first: it never matches the new file, so it
    never vouches for it (serve refuses a file its sidecar does not match)."""
    with _out_folder_locked(out):
        problem = _out_problem(out)
        if problem:
            raise ConfigError(problem)
        from .federation.storage import atomic_write_bytes

        atomic_write_bytes(_pending(out), f"{digest}\n".encode())
        os.replace(tmp, out)  # never leave a half-written model under the final name
        write_sha256_sidecar(out, digest)
        _pending(out).unlink(missing_ok=True)


def check_outputs_finite(module: torch.nn.Module, example: torch.Tensor, names, where: str) -> None:
    """Refuse a model that answers a non-finite number on a probe batch (the export's example images, a black
    and a white one): finite weights can still make one (a negative variance, a zero scale), and its ONNX graph
    would serve NaN probabilities. `where`: the model and its files, for the error."""
    size = example.shape[1]
    plain = [torch.full((size, size, 3), v, dtype=torch.uint8) for v in (0, 255)]
    with torch.no_grad():
        outputs = module(torch.cat([example, torch.stack(plain)]))
    for name, output in zip(names, outputs, strict=True):
        problem = _non_finite(output)
        if problem:
            raise FedMedClipError(
                f"refusing to export {where}: it answers a non-finite {name!r} on probe images ({problem}); its "
                "model files are damaged or were edited"
            )


def _check_interface(model, size: int, num_classes: int, embedding_dims: int | None = None) -> None:
    """Fail at export time, not in the server, if the graph's names or shapes drift from the contract."""
    import onnx

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    ins, outs = list(model.graph.input), list(model.graph.output)
    got = ([i.name for i in ins], [o.name for o in outs])
    names = list(OUTPUT_NAMES) + (list(OOD_OUTPUTS) if embedding_dims else [])
    if got != ([INPUT_NAME], names):
        raise FedMedClipError(f"exported graph has inputs/outputs {got}, expected {([INPUT_NAME], names)}")
    want = {
        INPUT_NAME: (onnx.TensorProto.UINT8, 4, [size, size, 3]),
        "probabilities": (onnx.TensorProto.FLOAT, 2, [num_classes]),
        "class_index": (onnx.TensorProto.INT64, 1, []),
        "ood_score": (onnx.TensorProto.FLOAT, 1, []),
        "drift_embedding": (onnx.TensorProto.FLOAT, 2, [embedding_dims]),
    }
    for v in ins + outs:
        elem, rank, tail = want[v.name]
        d = dims(v)
        if v.type.tensor_type.elem_type != elem or len(d) != rank or d[1:] != tail or isinstance(d[0], int):
            raise FedMedClipError(
                f"exported {v.name!r} has type {onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)} "
                f"shape {d}; the contract needs {onnx.TensorProto.DataType.Name(elem)} {['batch', *tail]}"
            )


def export_onnx(
    run_dir: str | Path,
    site: str | int = GLOBAL,
    out_path: str | Path = "model.onnx",
    precision: str = "fp32",
    run_id: str = "",
    backbone: str | None = None,
    exporter: str = "auto",
    ood: str = "auto",
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
) -> Path:
    """Export the predictor of `site` ("global", a site name or index) of a run directory to ONNX.

    `ood`: "require" fits the OOD score on the holder's data (the run's config.json names it; its features
    come from the feature cache) and fails if it cannot; "auto" exports without the score, with a warning,
    when the data cannot be read here (a pipeline task without the server's credentials); "off" never."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if ood not in OOD_MODES:
        raise ConfigError(f"unknown OOD mode {ood!r}; choose one of {', '.join(OOD_MODES)}")
    check_out(out_path)
    check_model_files_finite(run_dir, site)
    # Loaded once, checked against the run's hash: the classifier's encoder and the OOD fit's encoding alike.
    loaded = load_run_backbone(read_model_json(run_dir), backbone)
    clf, meta = load_classifier(run_dir, site, backbone=loaded)
    digest = run_model_digest(run_dir)
    fitted = None
    if ood != "off":
        try:
            fitted = fit_run_ood(run_dir, meta["site"], clf, false_alarm_rate, loaded)
        except FedMedClipError as exc:
            if ood == "require":
                raise FedMedClipError(
                    f"cannot fit the OOD score of {meta['site']!r}: {exc} (export with --no-ood to skip it)"
                ) from None
            log.warning("exporting %s without an OOD score: %s", meta["site"], exc)
    results = recorded_results(run_dir)
    meta["privacy"] = _privacy(results)
    # The run's own id unless the caller names another: what the served model's metadata says it came from.
    run_id = run_id or str((results or {}).get("run_id") or "")
    return export_classifier(clf, meta, out_path, precision, run_id, exporter, fitted, digest)


def run_model_digest(run_dir: str | Path) -> str:
    """The digest of the run's selected model (digests.model_digest of RUN/model/): what an export records as
    `fedmedclip.model_digest` and registration recomputes from the run's logged files."""
    try:
        return model_dir_digest(Path(run_dir) / "model")
    except ValueError as exc:
        raise FedMedClipError(f"cannot export {run_dir}: {exc}") from None


def fit_run_ood(
    run_dir: str | Path,
    site: str,
    clf: ImageClassifier,
    false_alarm_rate: float,
    backbone: str | Backbone | None = None,
) -> OodFit:
    """The OOD score of `site` ("global": the server's) fitted on that holder's features of the run; `backbone`:
    where the run's frozen weights are now, if not where the run recorded them, or those weights loaded
    already (checked against the run's hash either way)."""
    import json

    from .config import TrainConfig
    from .preparation import SERVER, _rows, prepare

    loaded = load_run_backbone(read_model_json(run_dir), backbone)
    config = Path(run_dir) / "config.json"
    try:
        cfg = TrainConfig.from_json(json.loads(config.read_text()))
        cfg.backbone = loaded.name
        holder = SERVER if site == GLOBAL else site
        prepared = prepare(cfg, progress=False, holders=[holder], backbone=loaded)
    except Exception as exc:  # noqa: BLE001 - any reason the holder's data is not readable here (files, S3)
        raise FedMedClipError(f"the run's data cannot be read here ({type(exc).__name__}: {exc})") from None
    store = prepared.stores[holder]
    if site == GLOBAL:
        ids = prepared.partition.global_test + prepared.partition.reference
        return fit_server_ood(_rows(store, ids)[0], clf, false_alarm_rate)
    split = prepared.partition.sites[site]
    return fit_site_ood(
        site, _rows(store, split["train"]), _rows(store, split["val"] + split["test"])[0], false_alarm_rate
    )


def fit_server_ood(features: torch.Tensor, clf: ImageClassifier, false_alarm_rate: float) -> OodFit:
    """The global model's OOD score on the server's images: classes are the model's own predictions (the
    reference set is unlabelled), half the images fit the Gaussians, the other half calibrate."""
    fit, cal = split_for_calibration(len(features))
    with torch.no_grad():
        predicted = clf.head(features.float()).argmax(1)
    return fit_ood(
        features[fit],
        predicted[fit],
        features[cal],
        false_alarm_rate,
        described={
            "holder": "server",
            "fitted_on": "half of the global test and reference images, predicted classes",
            "calibrated_on": "the other half",
        },
    )


def fit_site_ood(
    site: str, train: tuple[torch.Tensor, torch.Tensor], held_out: torch.Tensor, false_alarm_rate: float
) -> OodFit:
    """A site's OOD score: fitted on its training split with its labels, calibrated on its validation and
    test splits."""
    return fit_ood(
        train[0],
        train[1],
        held_out,
        false_alarm_rate,
        described={
            "holder": site,
            "fitted_on": "the site's training split, labels",
            "calibrated_on": "the site's validation and test splits",
        },
    )


def export_site_state(
    state: str,
    site: str,
    mailbox: str,
    run_id: str,
    out_path: str | Path = "model.onnx",
    data: str | None = None,
    cache_dir: str = DEFAULT_CACHE_DIR,
    precision: str = "fp32",
    exporter: str = "auto",
    ood: str = "require",
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    threads: int = 1,
    backbone: str | None = None,
) -> Path:
    """A site's personalised model (its private part with the run's shared modules) from its own private
    state (`site run --state`), on the site's machine: the run's manifest, prompt embeddings and selected
    round's global module come from the mailbox (what the site may read anyway), its own part from `state`,
    and the OOD score is fitted on its own images. Nothing is written outside `out_path`. `backbone`: where
    the frozen weights are now, if they moved since the run (they must hash as the run's)."""
    import tempfile

    from safetensors.torch import load

    from .codec import decode
    from .federation.mailbox import SERVER, Mailbox
    from .federation.records import write_model_dir
    from .federation.runner import prepare_site, site_config
    from .federation.server import read_manifest
    from .federation.site import template_of
    from .federation.storage import open_store

    if ood not in OOD_MODES:
        raise ConfigError(f"unknown OOD mode {ood!r}; choose one of {', '.join(OOD_MODES)}")
    check_out(out_path)
    mb = Mailbox(open_store(mailbox), run_id)
    manifest = read_manifest(mb)
    if manifest is None:
        raise FedMedClipError(f"{mb.where(mb.manifest_key)} is missing: no run {run_id!r} in that mailbox")
    status = mb.status(SERVER)
    if status is None or status.state != "done" or status.best_round is None:
        state = status.state if status is not None else None
        raise FedMedClipError(
            f"run {run_id} has not finished (server status {state!r}): nothing selected yet"
        )
    best = status.best_round
    own = open_store(state).get(f"model/site_{site}.safetensors")
    if own is None:
        raise FedMedClipError(
            f"{open_store(state).where(f'model/site_{site}.safetensors')} is missing: site {site!r} writes its model "
            "part there when the run ends (give the --state that `site run` used)"
        )
    shared_raw = mb.store.get(mb.shared_key)
    global_raw = mb.store.get(mb.global_key(best))
    if shared_raw is None or global_raw is None:
        raise FedMedClipError(
            f"run {run_id}'s shared tensors or round {best}'s global module are missing from the mailbox"
        )
    shared = load(shared_raw)
    received = decode(global_raw, template=template_of(manifest)).state
    cfg = site_config(manifest, data, cache_dir, threads)
    checked = None
    if backbone:
        # Checked here, before the site's images are encoded with them, in the words of a run directory's export;
        # loaded once, for the encoding and the classifier alike.
        checked = load_run_backbone({"backbone": manifest["backbone"]}, backbone)
        cfg.backbone = backbone
    setup = prepare_site(cfg, site, manifest, shared, progress=False, backbone=checked)
    meta = {
        "format_version": 1,
        "method": manifest["method"],
        "method_options": setup.method.opt,
        "federation": "federated",
        "class_names": manifest["class_names"],
        "prompt_template": cfg.prompt_template,
        "backbone": manifest["backbone"],
        "preprocessing": manifest["preprocessing"],
        "feature_dim": int(shared["text_features"].shape[1]),
        "sites": [s["name"] for s in manifest["sites"]],
        "best_round": best,
        "partition_digest": manifest["partition_digest"],
    }
    with tempfile.TemporaryDirectory(prefix="fedmedclip-site-export-") as tmp:
        write_model_dir(Path(tmp) / "model", received, shared["text_features"], meta, {site: load(own)})
        check_model_files_finite(tmp, site)
        clf, meta = load_classifier(tmp, site, backbone=checked or cfg.backbone)
        # The same tensors as the server's run directory holds (the selected round's module as received, the
        # run's prompt embeddings): the digest the run's registration recomputes.
        digest = run_model_digest(tmp)
        fitted = None
        if ood != "off":
            d = setup.data
            try:
                fitted = fit_site_ood(
                    site, (d.train_x, d.train_y), torch.cat([d.val_x, d.test_x]), false_alarm_rate
                )
            except FedMedClipError as exc:
                if ood == "require":
                    raise FedMedClipError(
                        f"cannot fit the OOD score of {site!r}: {exc} (export with --no-ood to skip it)"
                    ) from None
                log.warning("exporting %s without an OOD score: %s", site, exc)
        where = (
            f"{open_store(state).where(f'model/site_{site}.safetensors')} with run {run_id}'s global module"
        )
        return export_classifier(clf, meta, out_path, precision, run_id, exporter, fitted, digest, where)


def recorded_results(run_dir: str | Path) -> dict | None:
    """The run directory's results.json, None when it has none (the model's privacy is then unknown)."""
    path = Path(run_dir) / "results.json"
    if not path.exists():
        return None
    try:  # not an object: read as {}, a damaged file gave the model `dp.mode: none`
        return read_json_object(path)
    except (OSError, ValueError) as exc:
        raise FedMedClipError(f"cannot read {path} for the model's metadata: {exc}") from None


def run_privacy(run_dir: str | Path) -> dict[str, str]:
    """The run's privacy facts for the model's metadata (`dp.mode` none when results.json has no DP,
    unknown when the run directory has no results.json)."""
    return _privacy(recorded_results(run_dir))


def _privacy(results: dict | None) -> dict[str, str]:
    return privacy_summary(results) if results is not None else {"dp.mode": "unknown"}

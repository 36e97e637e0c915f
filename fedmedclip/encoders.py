"""Engines that run the frozen CLIP image encoder for feature extraction (uint8 NHWC pixels -> raw embeddings).

- `torch`: the backbone itself (`Preprocessing.normalise`, then `Backbone.encode_images`): the reference.
- `onnxruntime`: the same normalisation, vision tower and projection exported once to ONNX (through
  `fedmedclip.export.write_graph`, the TorchScript exporter first: it writes a ViT-B/32 graph in about half
  the dynamo exporter's time) and run by ONNX Runtime's CPU provider. About 2x PyTorch eager at ViT-B/32 on
  this project's 2-core machines (`bench/bench_extract.py`), features within ~1e-6 relative of `torch`.
- `auto` (the default): `onnxruntime` for a CLIP-sized vision tower when ONNX Runtime is installed, else
  `torch`. The one-off export (33 s and 335 MiB at ViT-B/32 on two shared cores) pays for itself after about
  230 images there; the tiny test backbones encode faster than they export. On a GPU, `torch`.

The device (`--encoder-device`): `auto` is CUDA when torch sees a GPU (a pipeline's extraction task asks for
one) unless the engine named is `onnxruntime`, else the CPU. On CUDA the torch engine encodes with a copy of the vision path on the GPU, in float32
with TF32 off, and is checked on the probe image against the CPU's features to `PARITY_TOLERANCE` like every
engine; the onnxruntime engine runs on the CPU only.

The graph is cached under `<cache>/encoders/<key>.onnx`, the key made of the weights hash, the preprocessing
and the torch version. It is checked on a fixed probe image: against PyTorch when exported, and each time it
is opened against the PyTorch features recorded in it then (running PyTorch again would cost seconds on a busy
machine). A cached graph built for another key, that does not load, or that disagrees beyond
`PARITY_TOLERANCE` is exported again; a fresh export that still disagrees is refused (`auto` then falls back
to `torch` with a warning). A process opens a backbone's engine once: a run's holders share the session. So every engine here gives the same float32 features to 1e-4 relative, which
is why feature stores do not key on the engine (fedmedclip.features: `provenance["encoder"]` records which
one built a store, outside its digest)."""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backbone import Backbone
from .digests import canonical_digest
from .errors import ConfigError, FedMedClipError
from .preprocess import Preprocessing

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime")
DEVICES = ("auto", "cpu", "cuda")
# Largest relative difference (max |a - b| / max |b|) allowed between an engine and the PyTorch path.
PARITY_TOLERANCE = 1e-4
# `auto` exports a vision tower of at least this many parameters (ViT-B/32: 88 M; the tiny test shape: 0.1 M).
AUTO_MIN_VISION_PARAMETERS = 20_000_000
GRAPH_FORMAT = 1
_EXAMPLE_IMAGES = (
    2  # the export's example batch; not 1: the exporter would specialise a size-1 batch dimension
)
META_KEY = "fedmedclip.encoder.key"  # graph_key of what it was exported from
META_PROBE = "fedmedclip.encoder.probe_features"  # PyTorch's features of the probe image, JSON


@dataclass
class ImageEncoder:
    """`encode(uint8 [N, S, S, 3] array) -> float32 [N, D] tensor` and what ran it."""

    engine: str
    encode: Callable[[np.ndarray], torch.Tensor]
    version: str
    device: str = "cpu"

    def describe(self) -> dict:
        """What a feature store's provenance records under `encoder` (outside its digest)."""
        return {"engine": self.engine, "precision": "fp32", "version": self.version, "device": self.device}


class PixelsToFeatures(torch.nn.Module):
    """uint8 NHWC pixels -> raw image embeddings: the torch engine's computation, as one module to export."""

    def __init__(self, backbone: Backbone, preprocessing: Preprocessing):
        super().__init__()
        self.model = backbone.model
        self.preprocessing = preprocessing

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocessing.normalise(images_uint8)
        return self.model.get_image_features(pixel_values=pixels).pooler_output.float()


def torch_encoder(backbone: Backbone, preprocessing: Preprocessing) -> ImageEncoder:
    def encode(images: np.ndarray) -> torch.Tensor:
        return backbone.encode_images(preprocessing.normalise(torch.from_numpy(images)))

    return ImageEncoder("torch", encode, torch.__version__)


def device_torch_encoder(
    backbone: Backbone, preprocessing: Preprocessing, device: str = "cuda"
) -> ImageEncoder:
    """The torch engine on `device` (the GPU; any torch device works the same way): a copy of the
    pixels-to-features path there (the backbone itself stays on the CPU for the rest of the process), float32
    with cuDNN's TF32 off, checked on the probe image against the CPU's features. Opened once per backbone,
    recipe and device: a run's holders share the copy."""
    opened = _OPENED.setdefault(backbone, {})
    memo = (device, graph_key(backbone, preprocessing))
    if memo in opened:
        return opened[memo]
    module = copy.deepcopy(PixelsToFeatures(backbone, preprocessing)).eval().to(device)

    def encode(images: np.ndarray) -> torch.Tensor:
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            return module(torch.from_numpy(np.ascontiguousarray(images)).to(device)).cpu()

    probe = _probe_image(preprocessing)
    diff = relative_difference(encode(probe), torch_encoder(backbone, preprocessing).encode(probe))
    if not diff <= PARITY_TOLERANCE:
        raise FedMedClipError(
            f"the image encoder on {device} gives features {diff:.2e} relative from the CPU's (tolerance "
            f"{PARITY_TOLERANCE:g}): encode with --encoder-device cpu"
        )
    opened[memo] = ImageEncoder("torch", encode, torch.__version__, device=device)
    return opened[memo]


def resolve_device(device: str) -> str:
    """The device `device` names: `auto` is CUDA when torch sees a GPU, else the CPU; `cuda` without one is
    refused naming the flag."""
    if device not in DEVICES:
        raise ConfigError(f"unknown encoder device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError(
            "--encoder-device cuda: torch sees no CUDA device here (a CPU build of torch, no GPU, or no driver); "
            "use auto or cpu"
        )
    return "cuda"


def _probe_image(preprocessing: Preprocessing) -> np.ndarray:
    """The fixed image every engine is checked on."""
    size = preprocessing.size
    return np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def resolve_engine(engine: str, backbone: Backbone, device: str = "cpu") -> str:
    """The engine `engine` names for this backbone on `device` (resolved): `auto` becomes `onnxruntime` or
    `torch`."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown encoder engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if device == "cuda":
        if engine == "onnxruntime":
            raise ConfigError(
                "--encoder-engine onnxruntime runs on the CPU only: with --encoder-device cuda use torch or auto"
            )
        return "torch"
    if engine != "auto":
        return engine
    vision = sum(p.numel() for p in backbone.model.vision_model.parameters())
    if vision >= AUTO_MIN_VISION_PARAMETERS and _onnxruntime() is not None:
        return "onnxruntime"
    return "torch"


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: how far an engine's features are from the PyTorch path's."""
    scale = float(want.abs().max())
    diff = float((got - want).abs().max())
    return diff / scale if scale > 0 else diff


def graph_key(backbone: Backbone, preprocessing: Preprocessing) -> str:
    """Names a cached encoder graph: what the exported computation depends on."""
    return canonical_digest(
        {
            "format": GRAPH_FORMAT,
            "weights_sha256": backbone.weights_sha256,
            "preprocessing": preprocessing.describe(),
            "torch": torch.__version__,
        }
    )[:24]


def _export(backbone: Backbone, preprocessing: Preprocessing, path: Path, key: str, probe_features) -> None:
    """Write the graph atomically (a half-written file must never be found in the cache), with its key and
    PyTorch's features of the probe image in its metadata: what every later opening checks it against."""
    import onnx

    from .export import write_graph

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    size = preprocessing.size
    example = torch.zeros(_EXAMPLE_IMAGES, size, size, 3, dtype=torch.uint8)
    try:
        used = write_graph(
            PixelsToFeatures(backbone, preprocessing).eval(),
            example,
            tmp,
            ["features"],
            ["torchscript", "dynamo"],
        )
        model = onnx.load(str(tmp))
        for k, v in ((META_KEY, key), (META_PROBE, json.dumps(probe_features.reshape(-1).tolist()))):
            model.metadata_props.add(key=k, value=v)
        onnx.save_model(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported the image encoder for ONNX Runtime (%s exporter) to %s", used, path)


def _checked_session(path: Path, key: str, probe: np.ndarray, want: torch.Tensor | None, threads: int):
    """(session, None) when the graph at `path` loads, was built for `key` and gives `want` (default: the
    PyTorch features recorded in it at export) on the probe image to PARITY_TOLERANCE; else (None, why)."""
    from .export import INPUT_NAME

    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        if meta.get(META_KEY) != key:
            return None, f"was built for other weights or preprocessing ({meta.get(META_KEY)!r}, not {key!r})"
        if want is None:
            want = torch.tensor(json.loads(meta[META_PROBE]), dtype=torch.float32).reshape(len(probe), -1)
        got = torch.from_numpy(session.run(None, {INPUT_NAME: probe})[0])
    except Exception as exc:  # noqa: BLE001 - whatever makes a cached graph unusable, it is rebuilt
        return None, f"does not load ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    diff = relative_difference(got, want) if got.shape == want.shape else float("inf")
    if not diff <= PARITY_TOLERANCE:
        return None, f"gives features {diff:.2e} relative from PyTorch's (tolerance {PARITY_TOLERANCE:g})"
    return session, None


# Opened engines, per backbone: a run's holders (the sites and the server) share one session.
_OPENED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def onnxruntime_encoder(
    backbone: Backbone, preprocessing: Preprocessing, cache_dir: str | Path | None = None
) -> ImageEncoder:
    """The ONNX Runtime engine, its graph read from (or exported into) `cache_dir`, checked on a probe image
    against PyTorch (at export) or against the PyTorch features recorded in the graph (when cached). A cached
    graph that fails is exported again; raises FedMedClipError when a fresh export fails too."""
    from .export import INPUT_NAME

    ort = _onnxruntime()
    if ort is None:
        raise ConfigError("encoder engine onnxruntime: ONNX Runtime is not installed (the `cpu` extra)")
    key = graph_key(backbone, preprocessing)
    threads = torch.get_num_threads()  # extraction's threads: every core unless the caller set fewer
    opened = _OPENED.setdefault(backbone, {})
    memo = (key, threads, None if cache_dir is None else str(cache_dir))
    if memo in opened:
        return opened[memo]
    probe = _probe_image(preprocessing)

    with tempfile.TemporaryDirectory(prefix="fedmedclip-encoder-") as scratch:
        path = (Path(cache_dir) if cache_dir is not None else Path(scratch)) / f"{key}.onnx"
        session = None
        if path.exists():
            session, problem = _checked_session(path, key, probe, None, threads)
            if session is None:
                log.warning("cached encoder graph %s %s; exporting it again", path, problem)
        if session is None:
            want = torch_encoder(backbone, preprocessing).encode(probe)
            _export(backbone, preprocessing, path, key, want)
            session, problem = _checked_session(path, key, probe, want, threads)
            if session is None:
                raise FedMedClipError(f"the image encoder exported for ONNX Runtime {problem}")

    def encode(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {INPUT_NAME: np.ascontiguousarray(images)})[0])

    opened[memo] = ImageEncoder("onnxruntime", encode, ort.__version__)
    return opened[memo]


def open_image_encoder(
    backbone: Backbone,
    preprocessing: Preprocessing,
    engine: str = "auto",
    cache_dir: str | Path | None = None,
    device: str = "auto",
) -> ImageEncoder:
    """The engine `engine` names on the device `device` names (see the module's docstring); `cache_dir` keeps
    exported graphs between runs (None: a temporary export, gone after this call)."""
    # An engine named explicitly wins over `auto`'s device: onnxruntime then runs where it can, on the CPU.
    where = "cpu" if (device, engine) == ("auto", "onnxruntime") else resolve_device(device)
    chosen = resolve_engine(engine, backbone, where)
    if where == "cuda":
        try:
            return device_torch_encoder(backbone, preprocessing, "cuda")
        except FedMedClipError as exc:
            if device != "auto":
                raise
            log.warning("encoding on the CPU instead of CUDA: %s", exc)
            chosen = resolve_engine(engine, backbone)
    if chosen == "torch":
        return torch_encoder(backbone, preprocessing)
    try:
        return onnxruntime_encoder(backbone, preprocessing, cache_dir)
    except FedMedClipError as exc:
        if engine != "auto":
            raise
        log.warning("encoding with PyTorch instead of ONNX Runtime: %s", exc)
        return torch_encoder(backbone, preprocessing)

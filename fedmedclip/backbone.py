"""The frozen CLIP backbone: built-in seeded random shapes, or offline loading of real weights."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
from pathlib import Path

import torch

from .digests import canonical_digest
from .errors import BackboneNotFound, ConfigError, ProvenanceMismatch
from .paths import DEFAULT_CACHE_DIR
from .preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, PREPROCESSING_NAMES, Preprocessing
from .seeding import seeded

# exp(logit_scale) of both OpenAI CLIPs is exactly 100; the methods use it as a frozen temperature.
LOGIT_SCALE = 100.0

# Built-in random backbones: no files, seeded, for tests, demos and benchmarks.
_RANDOM_SHAPES = {
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        patch_size=32,
        projection_dim=128,
    ),
    "random-vit-b32": dict(text={}, vision={}, patch_size=32, projection_dim=512),
    "random-vit-b16": dict(text={}, vision={}, patch_size=16, projection_dim=512),
}
BUILTIN_BACKBONES = tuple(_RANDOM_SHAPES)


def byte_level_tokenizer():
    """A working CLIP tokenizer with no vocabulary file: CLIP's byte-to-unicode alphabet, no merges.
    Every word is spelled out character by character, which is all a random text encoder needs."""
    from transformers import CLIPTokenizer

    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def random_clip(shape: str = "tiny", seed: int = 0):
    """A seeded random CLIPModel of a named shape plus the byte-level tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    spec = _RANDOM_SHAPES[shape]
    tokenizer = byte_level_tokenizer()
    specials = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **spec["text"], **specials),
        vision_config=dict(image_size=224, patch_size=spec["patch_size"], **spec["vision"]),
        projection_dim=spec["projection_dim"],
    )
    with seeded(seed):
        model = CLIPModel(config)
    return model, tokenizer


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Hash of every tensor's name, dtype, shape and bytes: identifies weights, not file layout."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def make_preprocessing(name: str, backbone: Backbone) -> Preprocessing:
    """The recipe `name` at the backbone's input size; `clip` uses the backbone's own mean/std."""
    if name == "clip":
        return Preprocessing(
            "clip", backbone.image_size, "bicubic", True, backbone.image_mean, backbone.image_std
        )
    if name == "squash":
        return Preprocessing("squash", backbone.image_size, "bilinear", False, IMAGENET_MEAN, IMAGENET_STD)
    raise ConfigError(f"unknown preprocessing {name!r}; choose one of {', '.join(PREPROCESSING_NAMES)}")


_HOW_TO_SUPPLY = (
    "fedmedclip never downloads weights at run time. On a machine with internet access run\n"
    "  huggingface-cli download {hub_id} --local-dir {folder}\n"
    "(or `CLIPModel.from_pretrained(...).save_pretrained(DIR)` plus the tokenizer and image processor), copy the\n"
    "folder here and pass --backbone {folder}, or pre-populate the Hugging Face cache (HF_HOME)."
)
# A missing directory is where the user wants the weights; its name is no Hugging Face id.
_DEFAULT_HUB_ID = "openai/clip-vit-base-patch32"


class Backbone:
    """A frozen CLIPModel with its tokenizer and image-processor settings.

    A built-in backbone whose description was recorded in the cache (`described`) is known without building it:
    its identity, sizes and weights hash come from the record, and the model (transformers, ~2 s of CPU) is
    built only when something is encoded, then checked against the record."""

    def __init__(self, model, tokenizer, name: str, image_mean=CLIP_MEAN, image_std=CLIP_STD):
        self.name = name
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self._lock = threading.Lock()
        self._adopt(model, tokenizer)
        self._sizes = _sizes(model)
        self._sha256: str | None = None  # hashed when first asked (seconds for a ViT-B)

    @classmethod
    def described(cls, name: str, description: dict, build, record: Path) -> Backbone:
        """The backbone `build()` -> (model, tokenizer) gives, known until then by `description` (what
        `description()` returned for it, recorded at `record`)."""
        self = cls.__new__(cls)
        self.name = name
        self.image_mean, self.image_std = tuple(CLIP_MEAN), tuple(CLIP_STD)
        self._lock = threading.Lock()
        self._model = self._tokenizer = None
        self._build, self._record = build, record
        self._sha256 = description["weights_sha256"]
        self._sizes = {k: v for k, v in description.items() if k != "weights_sha256"}
        return self

    def _adopt(self, model, tokenizer) -> None:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self._model, self._tokenizer = model, tokenizer

    def _built(self):
        with self._lock:
            if self._model is None:
                model, tokenizer = self._build()
                built = {"weights_sha256": state_dict_sha256(model), **_sizes(model)}
                if built != self.description():
                    # Not adopted: nothing is encoded under the recorded identity; a restart reads the right record.
                    _write_record(self._record, built)
                    raise ProvenanceMismatch(
                        f"backbone {self.name!r}: the description recorded at {self._record} "
                        f"(weights {self._sha256[:12]}...) is not what this machine builds "
                        f"(weights {built['weights_sha256'][:12]}...); it is replaced: run again"
                    )
                self._adopt(model, tokenizer)
        return self._model

    @property
    def model(self):
        return self._model if self._model is not None else self._built()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._built()
        return self._tokenizer

    @property
    def weights_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = state_dict_sha256(self._model)
        return self._sha256

    def description(self) -> dict:
        """Identity without the name: the weights hash and the sizes."""
        return {"weights_sha256": self.weights_sha256, **self._sizes}

    @property
    def image_size(self) -> int:
        return self._sizes["image_size"]

    @property
    def feature_dim(self) -> int:
        return self._sizes["feature_dim"]

    def identity(self) -> dict:
        return {"name": self.name, **self.description()}

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) image embeddings, float32 [N, D]."""
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output.float()

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Raw (unnormalised) text embeddings, float32 [len(prompts), D]."""
        enc = self.tokenizer(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        out = self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return out.pooler_output.float()


_DESCRIPTION_TYPES = {
    "weights_sha256": str,
    "feature_dim": int,
    "image_size": int,
    "patch_size": int,
    "vision_layers": int,
    "vision_width": int,
}


def _sizes(model) -> dict:
    vc = model.config.vision_config
    return {
        "feature_dim": int(model.config.projection_dim),
        "image_size": int(vc.image_size),
        "patch_size": int(vc.patch_size),
        "vision_layers": int(vc.num_hidden_layers),
        "vision_width": int(vc.hidden_size),
    }


# What builds a built-in backbone: this file's recipe, the seeding, torch's and transformers' initialisation.
_BUILT_FROM = (Path(__file__), Path(__file__).with_name("seeding.py"))


def builtin_record_key(shape: str, seed: int, versions: dict[str, str] | None = None) -> str:
    """The digest of everything that determines a built-in backbone's weights: the shape, the seed, the code
    that builds it, torch's and transformers' versions (default: the installed ones) and the machine type."""
    if versions is None:
        from importlib.metadata import version

        versions = {"torch": torch.__version__, "transformers": version("transformers")}
    code = hashlib.sha256(b"".join(p.read_bytes() for p in _BUILT_FROM)).hexdigest()
    return canonical_digest(
        {
            "shape": shape,
            "spec": _RANDOM_SHAPES[shape],
            "seed": seed,
            "code": code,
            "versions": versions,
            "machine": platform.machine(),
        }
    )


def builtin_record(cache_dir: str | Path, shape: str, seed: int) -> Path:
    """Where the description of a built-in backbone is recorded in a cache directory."""
    return Path(cache_dir) / "backbones" / f"{shape}-{builtin_record_key(shape, seed)[:24]}.json"


def _read_record(path: Path) -> dict | None:
    """The recorded description, or None where there is none or it is not one (then it is built again)."""
    try:
        if path.stat().st_size > 4096:
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or set(record) != set(_DESCRIPTION_TYPES):
        return None
    for key, kind in _DESCRIPTION_TYPES.items():
        if type(record[key]) is not kind:
            return None
    return record


def _write_record(path: Path, description: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(description, indent=2))
    os.replace(tmp, path)


def builtin_backbone(shape: str, seed: int = 0, cache_dir: str | Path | None = None) -> Backbone:
    """A built-in seeded backbone. With `cache_dir`, its description is recorded there the first time, and a
    later process gets it from the record and builds the model only when it encodes something."""
    name = shape if seed == 0 else f"{shape}@seed{seed}"
    build = lambda: random_clip(shape, seed)  # noqa: E731
    if cache_dir is None:
        return Backbone(*build(), name)
    record = builtin_record(cache_dir, shape, seed)
    description = _read_record(record)
    if description is None:
        backbone = Backbone(*build(), name)
        _write_record(record, backbone.description())
        return backbone
    return Backbone.described(name, description, build, record)


BACKBONE_ENTRY_POINTS = "fedmedclip.backbones"


def is_remote_spec(spec: str) -> bool:
    """A backbone published to object storage or a model registry (`s3://...`, `models:/...`)."""
    return "://" in spec or spec.startswith("models:/")


def resolve_remote(spec: str, cache_dir: str | Path) -> str:
    """The local directory of a published backbone, downloaded once into `cache_dir` and checked against its
    recorded weights hash by the MLOps layer (entry-point group `fedmedclip.backbones`, name `resolve`)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=BACKBONE_ENTRY_POINTS):
        if ep.name == "resolve":
            try:
                resolve = ep.load()
            except ImportError as exc:
                raise BackboneNotFound(
                    f"backbone {spec!r} is published remotely: reading it needs the MLOps layer's packages "
                    f"({exc}); install the project with its `pipelines` extra"
                ) from None
            return resolve(spec, cache_dir)
    raise BackboneNotFound(f"backbone {spec!r}: no resolver for remote backbones is installed")


def load_backbone(spec: str, seed: int = 0, cache_dir: str | Path | None = None) -> Backbone:
    """`tiny` / `random-vit-b32` / `random-vit-b16` (seeded random, no files; with `cache_dir`, built only when
    something is encoded, see `builtin_backbone`), a local directory, a Hugging Face model id already in the
    local cache, or a backbone published with `fedmedclip backbone push` (`s3://...`, `models:/...`:
    downloaded into `cache_dir`, by default DEFAULT_CACHE_DIR, and hash-checked; its name stays the spec, so
    every pod that loads it gives the same identity). Never touches a model hub."""
    if is_remote_spec(spec):
        backbone = load_backbone(resolve_remote(spec, cache_dir or DEFAULT_CACHE_DIR), seed)
        backbone.name = spec
        return backbone
    if spec in _RANDOM_SHAPES:
        return builtin_backbone(spec, seed, cache_dir)

    # Offline always: a missing file must fail here, not silently try a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.image_processing_base import ImageProcessingMixin

    path = Path(spec)
    looks_like_path = (
        path.exists() or spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1
    )
    if looks_like_path and not path.is_dir():
        raise BackboneNotFound(
            f"backbone directory {spec!r} does not exist.\n"
            + _HOW_TO_SUPPLY.format(hub_id=_DEFAULT_HUB_ID, folder=spec)
        )
    try:
        model = CLIPModel.from_pretrained(spec, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as exc:
        hub_id, folder = (_DEFAULT_HUB_ID, spec) if looks_like_path else (spec, "./clip-weights")
        raise BackboneNotFound(
            f"no local CLIP weights or tokenizer for {spec!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}).\n"
            + _HOW_TO_SUPPLY.format(hub_id=hub_id, folder=folder)
        ) from exc
    mean, std = CLIP_MEAN, CLIP_STD
    try:
        # The image processor's settings, not a processor: only its mean and std are used, and making a
        # CLIPImageProcessor without torchvision (not a dependency) warns users to install it.
        settings, _ = ImageProcessingMixin.get_image_processor_dict(spec, local_files_only=True)
        mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
    except (OSError, ValueError):
        pass  # No preprocessor_config.json: OpenAI CLIP's defaults are the right ones.
    return Backbone(model, tokenizer, str(path.resolve()) if path.is_dir() else spec, mean, std)

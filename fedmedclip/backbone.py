"""The frozen CLIP backbone: built-in seeded random shapes, or offline loading of real weights."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .errors import BackboneNotFound, ConfigError
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
    "  huggingface-cli download {spec} --local-dir ./clip-weights\n"
    "(or `CLIPModel.from_pretrained(...).save_pretrained(DIR)` plus the tokenizer and image processor), copy the\n"
    "folder here and pass --backbone ./clip-weights, or pre-populate the Hugging Face cache (HF_HOME)."
)


class Backbone:
    """A frozen CLIPModel with its tokenizer and image-processor settings."""

    def __init__(self, model, tokenizer, name: str, image_mean=CLIP_MEAN, image_std=CLIP_STD):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.image_size = int(model.config.vision_config.image_size)
        self.feature_dim = int(model.config.projection_dim)
        self._sha256: str | None = None

    @property
    def weights_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = state_dict_sha256(self.model)
        return self._sha256

    def identity(self) -> dict:
        vc = self.model.config.vision_config
        return {
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "feature_dim": self.feature_dim,
            "image_size": self.image_size,
            "patch_size": int(vc.patch_size),
            "vision_layers": int(vc.num_hidden_layers),
            "vision_width": int(vc.hidden_size),
        }

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


def load_backbone(spec: str, seed: int = 0, cache_dir: str | Path = ".cache/fedmedclip") -> Backbone:
    """`tiny` / `random-vit-b32` / `random-vit-b16` (seeded random, no files), a local directory, a Hugging
    Face model id already in the local cache, or a backbone published with `fedmedclip backbone push`
    (`s3://...`, `models:/...`: downloaded into `cache_dir` and hash-checked; its name stays the spec, so
    every pod that loads it gives the same identity). Never touches a model hub."""
    if is_remote_spec(spec):
        backbone = load_backbone(resolve_remote(spec, cache_dir), seed)
        backbone.name = spec
        return backbone
    if spec in _RANDOM_SHAPES:
        model, tokenizer = random_clip(spec, seed)
        name = spec if seed == 0 else f"{spec}@seed{seed}"
        return Backbone(model, tokenizer, name)

    # Offline always: a missing file must fail here, not silently try a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    path = Path(spec)
    looks_like_path = (
        path.exists() or spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1
    )
    if looks_like_path and not path.is_dir():
        raise BackboneNotFound(
            f"backbone directory {spec!r} does not exist.\n" + _HOW_TO_SUPPLY.format(spec=spec)
        )
    try:
        model = CLIPModel.from_pretrained(spec, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BackboneNotFound(
            f"no local CLIP weights or tokenizer for {spec!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}).\n"
            + _HOW_TO_SUPPLY.format(spec=spec if not looks_like_path else "openai/clip-vit-base-patch32")
        ) from exc
    mean, std = CLIP_MEAN, CLIP_STD
    try:
        processor = CLIPImageProcessor.from_pretrained(spec, local_files_only=True)
        mean, std = processor.image_mean, processor.image_std
    except (OSError, ValueError):
        pass  # No preprocessor_config.json: OpenAI CLIP's defaults are the right ones.
    return Backbone(model, tokenizer, str(path.resolve()) if path.is_dir() else spec, mean, std)

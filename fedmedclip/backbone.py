"""The frozen CLIP backbone: built-in seeded random shapes, or offline loading of real weights."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import stat
import threading
from pathlib import Path

import torch

from .digests import canonical_digest
from .errors import BackboneNotFound, ConfigError, ProvenanceMismatch, shown
from .extensions import load_extension
from .jsonfiles import loads, no_constant, read_bounded
from .paths import DEFAULT_CACHE_DIR
from .preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_IMAGE_SIZE,
    PREPROCESSING_NAMES,
    Preprocessing,
    channel_values_problem,
)
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
    resolve = load_extension(
        BACKBONE_ENTRY_POINTS, "resolve", BackboneNotFound, f"backbone {spec!r} (published remotely)"
    )
    if resolve is None:
        raise BackboneNotFound(f"backbone {spec!r}: no resolver for remote backbones is installed")
    return resolve(spec, cache_dir)


# ----------------------------------------------------------- a CLIP folder: another party may have written it
# A folder may be a backbone another party published (what a resolved s3:// or models:/ backbone becomes): its
# files are checked here before transformers reads any of them, so a hostile one is a one-line refusal naming
# the file and the field, never gigabytes allocated or a traceback from inside transformers.

# The files transformers reads from a CLIP folder besides the weights, each bounded before anything reads it: a
# real CLIP's configs are a few KiB and its tokenizer files 0.5 to 2.2 MiB (tokenizer.json), so these are far
# above any real one and far below what hurts when read whole.
_FOLDER_FILE_MAX_BYTES = {
    "config.json": 4 << 20,
    "preprocessor_config.json": 4 << 20,
    "processor_config.json": 4 << 20,
    "tokenizer_config.json": 4 << 20,
    "special_tokens_map.json": 4 << 20,
    "added_tokens.json": 16 << 20,
    "tokenizer.json": 64 << 20,
    "vocab.json": 32 << 20,
    "merges.txt": 32 << 20,
}

# config.json's fields that size a CLIPModel (CLIPTextConfig, CLIPVisionConfig, CLIPConfig), each an integer in
# [low, high]. Every released CLIP is well inside: the largest, ViT-bigG/14, has widths 1664 (vision) and 1280
# (text), MLPs of 8192, 48 layers, 20 heads and a 1280 projection; L/14-336 and DFN's H/14-378 see 336 and 378
# pixels in patches of 14; every OpenAI and LAION CLIP has 49408 tokens and 77 positions. Past these a config
# makes transformers allocate gigabytes (a width of 10**6, 10**5 layers); 0, -1, 1.5 or "768" crash inside it.
# At least 77 positions: every prompt is encoded padded to 77 tokens (Backbone.encode_text).
_SIZE_BOUNDS = {
    "hidden_size": (1, 8192),
    "intermediate_size": (1, 32768),
    "num_hidden_layers": (1, 256),
    "num_attention_heads": (1, 256),
    "projection_dim": (1, 8192),
    "vocab_size": (1, 1 << 20),
    "max_position_embeddings": (77, 8192),
    "image_size": (1, MAX_IMAGE_SIZE),
    "patch_size": (1, 256),
    "num_channels": (1, 16),
}
_COMMON = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "projection_dim")
_SIZE_FIELDS = {  # which of them each part of config.json holds ("": its top level)
    "text_config": (*_COMMON, "vocab_size", "max_position_embeddings"),
    "vision_config": (*_COMMON, "image_size", "patch_size", "num_channels"),
    "": ("projection_dim",),
}
# The bounds one by one still allow 256 layers of width 8192; the whole model is bounded by this: twice
# ViT-bigG/14's 2.5 billion parameters (20 GB in float32).
_MAX_PARAMETERS = 5_000_000_000
_DTYPES = ("float32", "float16", "bfloat16")  # what CLIPs are published in; float64 would double the memory


def _folder_file(folder: Path, name: str) -> Path | None:
    """`folder/name` when it is there (None when not), refused unless it is a regular file within its bound: for
    the files transformers reads itself (the JSON ones this module reads go through `_folder_json`)."""
    path = folder / name
    try:
        st = path.stat()  # through a link: a Hugging Face cache's snapshot folder is links to its blobs
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BackboneNotFound(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BackboneNotFound(f"{path} is not a regular file: refused unread")
    if st.st_size > (limit := _FOLDER_FILE_MAX_BYTES[name]):
        raise BackboneNotFound(
            f"{path} is {st.st_size} bytes, over the limit of {limit} for a CLIP's {name}: refused unread"
        )
    return path


def _folder_json(folder: Path, name: str) -> dict | None:
    """The JSON object in `folder/name` (None when there is none), read bounded and strictly: a key twice,
    NaN or Infinity, anything but an object are refused, naming the file."""
    path = folder / name
    try:
        raw = read_bounded(path, _FOLDER_FILE_MAX_BYTES[name])  # through a link, as _folder_file
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BackboneNotFound(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise BackboneNotFound(f"{path}: {exc}") from None
    try:
        obj = loads(raw, unique=True, parse_constant=no_constant)
    except ValueError as exc:
        raise BackboneNotFound(f"{path} is not readable JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise BackboneNotFound(f"{path} holds {type(obj).__name__}, not a JSON object")
    return obj


def _size_problem(value: object, field: str) -> str | None:
    low, high = _SIZE_BOUNDS[field]
    if type(value) is not int or not low <= value <= high:  # bool, float, str, list: no size
        return f"is {shown(value)}; a CLIP's is an integer from {low} to {high}"
    return None


def _checked_clip_config(folder: Path):
    """The CLIPConfig of `folder`'s config.json (None when there is none: transformers then says what is
    missing), checked before anything is built from it: the schema above, then the whole model's size.
    BackboneNotFound naming the file and the field otherwise."""
    from transformers import CLIPConfig
    from transformers.activations import ACT2FN

    raw = _folder_json(folder, "config.json")
    if raw is None:
        return None
    where = folder / "config.json"

    def refuse(name: str, problem: str):
        raise BackboneNotFound(f"{where}: {name} {problem}: refused before building the model")

    if raw.get("model_type", "clip") != "clip":
        refuse("model_type", f"is {shown(raw['model_type'])}, not 'clip'")
    for key in ("dtype", "torch_dtype"):
        if raw.get(key) is not None and raw[key] not in _DTYPES:
            refuse(key, f"is {shown(raw[key])}, not one of {', '.join(_DTYPES)}")
    # Each part as written; transformers also reads the older `text_config_dict` and `vision_config_dict`.
    parts = {"": raw}
    for part in ("text_config", "vision_config"):
        for key in (part, f"{part}_dict"):
            if raw.get(key) is not None:
                if not isinstance(raw[key], dict):
                    refuse(key, f"is {type(raw[key]).__name__}, not a JSON object")
                parts[key] = raw[key]
    for key, fields in parts.items():
        prefix = f"{key}." if key else ""
        for field in _SIZE_FIELDS[key.removesuffix("_dict")]:
            if field in fields and (problem := _size_problem(fields[field], field)):
                refuse(prefix + field, problem)
        if not key:
            continue
        if "hidden_act" in fields and not (
            isinstance(fields["hidden_act"], str) and fields["hidden_act"] in ACT2FN
        ):
            refuse(
                f"{prefix}hidden_act",
                f"is {shown(fields['hidden_act'])}, not an activation transformers has",
            )
        eps = fields.get("layer_norm_eps", 1e-5)
        if type(eps) not in (int, float) or not 0 < eps < 1:
            refuse(f"{prefix}layer_norm_eps", f"is {shown(eps)}; a CLIP's is a small positive number")
    try:
        config = CLIPConfig.from_dict(raw)
    except Exception as exc:  # transformers' own checks (heads dividing the width, ...); several classes
        said = " ".join(line.strip() for line in str(exc).splitlines())
        refuse("its settings", f"are refused by transformers ({said[:200]})")
    # What the model is built from: the parts merged over transformers' defaults, checked as a whole.
    for key, part in (
        ("text_config", config.text_config),
        ("vision_config", config.vision_config),
        ("", config),
    ):
        for field in _SIZE_FIELDS[key]:
            if problem := _size_problem(getattr(part, field, None), field):
                refuse(f"{key}.{field}" if key else field, problem)
    if config.vision_config.patch_size > config.vision_config.image_size:
        refuse("vision_config.patch_size", "is larger than its image_size")
    if (n := _parameters(config)) > _MAX_PARAMETERS:
        refuse(
            "its sizes",
            f"make a model of {n / 1e9:.1f} billion parameters, "
            f"over the bound of {_MAX_PARAMETERS / 1e9:g} billion",
        )
    return config


def _parameters(config) -> int:
    """About how many parameters a CLIPModel of `config` has: each encoder's layers (attention 4 h*h, the MLP
    2 h*i, their biases and norms) and embeddings, and the two projections."""
    t, v = config.text_config, config.vision_config

    def layers(c) -> int:
        h, i = c.hidden_size, c.intermediate_size
        return c.num_hidden_layers * (4 * h * h + 2 * h * i + 9 * h + i)

    positions = (v.image_size // v.patch_size) ** 2 + 1
    return (
        layers(t)
        + (t.vocab_size + t.max_position_embeddings) * t.hidden_size
        + layers(v)
        + (v.num_channels * v.patch_size**2 + positions) * v.hidden_size
        + config.projection_dim * (t.hidden_size + v.hidden_size)
    )


def _check_tokenizer_files(folder: Path) -> None:
    for name in (
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
    ):
        _folder_file(folder, name)


def _folder_image_settings(folder: Path) -> tuple[dict, str]:
    """The image processor's settings in `folder` as transformers finds them (processor_config.json's
    `image_processor`, else preprocessor_config.json; {} when neither), read strictly, and the file's name."""
    processor = _folder_json(folder, "processor_config.json")
    if processor is not None and isinstance(processor.get("image_processor"), dict):
        return processor["image_processor"], str(folder / "processor_config.json")
    settings = _folder_json(folder, "preprocessor_config.json")
    return settings or {}, str(folder / "preprocessor_config.json")


def _checked_mean_std(settings: dict, where: str) -> tuple[tuple, tuple]:
    """The image mean and std (OpenAI CLIP's where not given): three finite numbers each, the std's positive."""
    checked = []
    for name, default in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
        value = settings.get(name)
        value = default if value is None else value
        if problem := channel_values_problem(name, value):
            raise BackboneNotFound(f"{where}: {problem}")
        checked.append(tuple(float(v) for v in value))
    return checked[0], checked[1]


def _check_weights_fit(spec: str, loading: dict) -> None:
    """Every weight the config builds is in the files and every weight in the files has its place: transformers
    fills a missing weight at random (a warning, then features that are noise for every site and every served
    image) and drops one it has no place for (a config of fewer layers than the weights were trained with)."""
    missing = (
        "weights its config.json builds are not in its weight files (transformers would draw them at random)"
    )
    unplaced = "weights in its weight files have no place in the model its config.json builds"
    for kind, what in (("missing_keys", missing), ("unexpected_keys", unplaced)):
        if keys := sorted(loading.get(kind) or ()):
            raise BackboneNotFound(
                f"backbone {spec!r}: its config.json and weights disagree: {len(keys)} {what}, e.g. {keys[0]}"
            )


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
    # A folder's files are checked before transformers reads any of them, and the model is built from the
    # config that was checked (transformers does not read config.json again).
    local = path.is_dir()
    config = _checked_clip_config(path) if local else None
    if local:
        _check_tokenizer_files(path)
        settings, where = _folder_image_settings(path)
    try:
        model, loading = CLIPModel.from_pretrained(
            spec,
            local_files_only=True,
            output_loading_info=True,
            **({"config": config} if config is not None else {}),
        )
        tokenizer = CLIPTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as exc:
        hub_id, folder = (_DEFAULT_HUB_ID, spec) if looks_like_path else (spec, "./clip-weights")
        raise BackboneNotFound(
            f"no local CLIP weights or tokenizer for {spec!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}).\n"
            + _HOW_TO_SUPPLY.format(hub_id=hub_id, folder=folder)
        ) from exc
    except RuntimeError as exc:  # weights of other shapes than the checked config gives, memory exhausted
        raise BackboneNotFound(
            f"backbone {spec!r}: transformers cannot build it from its files: its config.json and weights "
            f"disagree, or it does not fit in memory ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None
    _check_weights_fit(spec, loading)
    # A token the text model has no embedding for would fail inside it at the first prompt.
    if len(tokenizer) > (vocab := model.config.text_config.vocab_size):
        raise BackboneNotFound(
            f"backbone {spec!r}: its tokenizer has {len(tokenizer)} tokens, more than its text model's {vocab}"
        )
    if not local:  # a model in the Hugging Face cache
        settings, where = {}, spec
        # The image processor's settings, not a processor: only its mean and std are used, and making a
        # CLIPImageProcessor without torchvision (not a dependency) warns users to install it. None found:
        # OpenAI CLIP's defaults are the right ones.
        with contextlib.suppress(OSError, ValueError):
            settings, _ = ImageProcessingMixin.get_image_processor_dict(spec, local_files_only=True)
    mean, std = _checked_mean_std(settings, where)
    return Backbone(model, tokenizer, str(path.resolve()) if local else spec, mean, std)

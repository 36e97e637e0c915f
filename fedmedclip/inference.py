"""The trained predictor as one torch module, rebuilt from a run directory's `model/` folder.

`ImageClassifier` goes from uint8 images to class probabilities exactly as training predicted:
Preprocessing.normalise -> frozen CLIP image encoder + projection -> the adaptation module (FedMedCLIP's
FAM or FACMIC's attention) -> ĥ = n(a(f) ⊙ f) -> softmax(100 · cos(ĥ, t_c)), and at a FedMedCLIP site
also the private MLP and the uncertainty-weighted ensemble (docs/algorithms.md §3.7). It is what
`fedmedclip.export` traces into ONNX, so `forward` has no data-dependent python control flow.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, ConfigDict, Field, ValidationError
from torch import nn

from .backbone import LOGIT_SCALE, Backbone, load_backbone
from .config import FEDERATIONS
from .errors import (
    ConfigError,
    FedMedClipError,
    ProvenanceMismatch,
    class_names_problem,
    first_repeat,
    shown,
)
from .federation.messages import BackboneIdentity, Message, PreprocessingSpec, Short, Text, _first_problem
from .jsonfiles import read_json
from .losses import ENTROPIES, ensemble
from .methods import METHODS, MethodContext, ModelFiles
from .modules import adapt
from .preprocess import Preprocessing

log = logging.getLogger(__name__)

GLOBAL = "global"


class ImageEncoder(nn.Module):
    """CLIP's vision tower + projection: `CLIPModel.get_image_features(...).pooler_output`, without
    the text tower (so an exported graph carries no unused weights)."""

    def __init__(self, clip_model):
        super().__init__()
        self.vision_model = clip_model.vision_model
        self.visual_projection = clip_model.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values, return_dict=True).pooler_output
        return self.visual_projection(pooled)


class ImageClassifier(nn.Module):
    """uint8 NHWC images -> (probabilities float32 [N, C], class_index int64 [N]).

    `mlp=None` gives zero-shot prediction through the adaptation module (FedMedCLIP global, FACMIC);
    with an MLP, the ensemble p = (1-α)·p_fam + α·p_mlp with α from the `entropy` rule."""

    def __init__(
        self,
        encoder: nn.Module,
        preprocessing: Preprocessing,
        attention: nn.Module,
        text_features: torch.Tensor,
        mlp: nn.Module | None = None,
        entropy: str = "code",
    ):
        super().__init__()
        if entropy not in ENTROPIES:
            raise ConfigError(f"unknown entropy rule {entropy!r}; choose one of {', '.join(ENTROPIES)}")
        self.encoder = encoder
        self.preprocessing = preprocessing
        self.attention = attention
        self.mlp = mlp
        self.entropy = entropy
        # Normalised once here with the same function the methods use per call: identical values.
        self.register_buffer("text_normalised", F.normalize(text_features.float(), dim=1).contiguous())
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return int(self.text_normalised.shape[0])

    def encoder_dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Raw CLIP image embeddings, float32 [N, D] (what the feature store holds)."""
        pixels = self.preprocessing.normalise(images_uint8)
        # An fp16 encoder takes fp16 pixels; its output goes back to float32 for the head.
        return self.encoder(pixels.to(self.encoder_dtype())).float()

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Probabilities from raw features: the rule of Method.global_probs / SiteTrainer.probs."""
        h = adapt(self.attention, features)
        p_fam = torch.softmax(LOGIT_SCALE * h @ self.text_normalised.t(), dim=1)
        if self.mlp is None:
            return p_fam
        return ensemble(p_fam, torch.softmax(self.mlp(h), dim=1), self.entropy)

    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = self.head(self.features(images_uint8))
        return probabilities, torch.argmax(probabilities, dim=1)


# ---------------------------------------------------------------- loading a run directory
def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FedMedClipError(f"model file {str(path)!r} is missing: the run directory is incomplete")
    return load_file(str(path))


def _class_names(names: list[str]) -> list[str]:
    if problem := class_names_problem(names):
        raise ValueError(problem)
    return names


def _distinct_sites(names: list[str] | None) -> list[str] | None:
    if names is not None and (twice := first_repeat(names)) is not None:
        raise ValueError(f"site {shown(names[twice])} is listed twice")
    return names


def _federation(mode: str) -> str:
    if mode not in FEDERATIONS:
        raise ValueError(f"federation is {shown(mode)}, not one of {', '.join(FEDERATIONS)}")
    return mode


SiteList = Annotated[list[Short], Field(max_length=10_000), AfterValidator(_distinct_sites)]


class ModelJson(Message):
    """model/model.json as the server (federation.server.model_meta) and a site's export write it: the entries
    export and serving read, with their types (the backbone and preprocessing as the run's manifest declares
    them). Keys this version does not read are not looked at."""

    model_config = ConfigDict(extra="ignore")

    format_version: Annotated[int, Field(ge=1, le=1000)] | None = None
    method: Short
    method_options: Annotated[dict[Short, Any], Field(max_length=1000)] = {}
    federation: Annotated[Short, AfterValidator(_federation)] = "federated"
    class_names: Annotated[list[Short], Field(min_length=1, max_length=10_000), AfterValidator(_class_names)]
    prompt_template: Text | None = None
    backbone: BackboneIdentity
    preprocessing: PreprocessingSpec
    feature_dim: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    sites: SiteList | None = None
    site_names: SiteList | None = None  # what runs wrote before `sites`
    best_round: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    partition_digest: Short | None = None


def read_model_json(run_dir: str | Path) -> dict:
    """`RUN/model/model.json`, with errors that say what is wrong with the run directory: each entry export and
    serving read has its type (`ModelJson`), the preprocessing is one `Preprocessing` takes, and the classes are
    those the run's partition.json says it trained on (where the run directory has one: a site's export builds
    its model folder without it)."""
    run = Path(run_dir)
    if not run.is_dir():
        what = "is a file, not a run directory" if run.exists() else "does not exist"
        raise FedMedClipError(f"run directory {str(run)!r} {what}")
    path = run / "model" / "model.json"
    if not path.is_file():
        raise FedMedClipError(
            f"{str(run)!r} has no model/model.json: not a finished `fedmedclip train --out` run directory"
        )
    try:
        meta = read_json(path)
    except ValueError as exc:
        raise FedMedClipError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise FedMedClipError(f"{str(path)!r} is not a JSON object")
    missing = [k for k in ("method", "class_names", "backbone", "preprocessing") if k not in meta]
    if missing:
        raise FedMedClipError(f"{str(path)!r} lacks {', '.join(missing)}")
    try:
        ModelJson.model_validate(meta)
        Preprocessing.from_dict(meta["preprocessing"])  # its values' ranges, beyond their types
    except ValidationError as exc:
        raise FedMedClipError(f"{str(path)!r} is damaged or was edited: {_first_problem(exc)}") from None
    except ValueError as exc:
        raise FedMedClipError(f"{str(path)!r} is damaged or was edited: {exc}") from None
    _check_trained_classes(run, path, meta["class_names"])
    return meta


def _check_trained_classes(run: Path, path: Path, class_names: list[str]) -> None:
    """model.json's classes, in order, are those of the run's partition.json: the text features' rows and the
    heads' outputs follow that order, so reordered or renamed classes would label every answer wrongly."""
    partition = run / "partition.json"
    if not partition.exists():
        return
    try:
        trained = read_json(partition)
    except (OSError, ValueError) as exc:
        raise FedMedClipError(f"cannot read {str(partition)!r}: {exc}") from None
    trained = trained.get("class_names") if isinstance(trained, dict) else None
    if not (isinstance(trained, list) and all(isinstance(c, str) for c in trained)):
        raise FedMedClipError(
            f"{str(partition)!r} is damaged or was edited: class_names is not a list of names"
        )
    if trained != class_names:
        raise FedMedClipError(
            f"{str(path)!r} lists the classes {shown(class_names)}, but the run trained on {shown(trained)} "
            f"({partition.name}): model.json was edited, and its model would answer under the wrong names"
        )


def site_names(meta: dict) -> list[str]:
    return list(meta.get("sites") or meta.get("site_names") or [])


def resolve_site(meta: dict, site: str | int) -> str:
    """The canonical site name for "global", a site name, or a site index (int or digits)."""
    names = site_names(meta)
    s = str(site)
    if s == GLOBAL or s in names:
        return s
    if s.lstrip("-").isdigit():
        k = int(s)
        if 0 <= k < len(names):
            return names[k]
        raise ConfigError(f"site index {k} is out of range: this run has {len(names)} site(s) {names}")
    raise ConfigError(
        f"unknown site {s!r}: choose 'global', a site name {names} or an index 0..{len(names) - 1}"
    )


def load_run_backbone(meta: dict, backbone: str | Backbone | None = None) -> Backbone:
    """The run's frozen backbone, checked against the weights hash recorded at training; `backbone`: where the
    weights are now, or a backbone already loaded from there."""
    ident = meta["backbone"]
    if isinstance(backbone, Backbone):
        spec, bb = backbone.name, backbone
    else:
        spec, seed = backbone or ident["name"], 0
        if backbone is None and "@seed" in spec:  # built-in random shapes with a non-default seed
            spec, seed = spec.split("@seed")[0], int(spec.split("@seed")[1])
        bb = load_backbone(spec, seed)
    want = ident.get("weights_sha256")
    if want and bb.weights_sha256 != want:
        raise ProvenanceMismatch(
            f"backbone {spec!r} has weights sha256 {bb.weights_sha256[:16]}..., but the run was trained "
            f"with {want[:16]}...: point --backbone at the exact weights used for training"
        )
    return bb


def _method_context(meta: dict, text: torch.Tensor) -> MethodContext:
    # The seed only draws initial weights that the stored state overwrites (thresholds start at 0).
    return MethodContext(
        feature_dim=text.shape[1],
        num_classes=text.shape[0],
        text_features=text,
        options=dict(meta.get("method_options") or {}),
    )


def load_classifier(
    run_dir: str | Path, site: str | int = GLOBAL, backbone: str | Backbone | None = None
) -> tuple[ImageClassifier, dict]:
    """The predictor of `site` ("global", a site name or an index) from RUN/model, and metadata:
    model.json's contents plus `site` (canonical name) and `run_dir`. `backbone` overrides where the
    frozen weights come from (their hash must still match)."""
    meta = read_model_json(run_dir)
    name = meta["method"]
    if name not in METHODS or not METHODS[name].exportable:
        exportable = [m for m, cls in METHODS.items() if cls.exportable]
        raise ConfigError(
            f"cannot export method {name!r}: exportable are {', '.join(exportable)} (methods that fine-tune "
            "the CLIP encoder are not exportable yet)"
        )
    site = resolve_site(meta, site)
    model_dir = Path(run_dir) / "model"
    text = _load_safetensors(model_dir / "text_features.safetensors")["text_features"].float()
    if text.shape[0] != len(meta["class_names"]):
        raise FedMedClipError(
            f"text_features has {text.shape[0]} rows but model.json lists {len(meta['class_names'])} classes"
        )
    method = METHODS[name](_method_context(meta, text))
    files = ModelFiles(model_dir, meta)
    if files.federation == "local" and method.shared_state(method.new_global()):
        # Each site trained alone: global.safetensors is only the untrained starting point.
        if site == GLOBAL:
            raise ConfigError(
                "this run was trained with --federation local: it has no global model; export a site"
            )
        if files.site(site) is None:
            raise FedMedClipError(
                f"this {name} run was trained with --federation local, but site {site!r}'s own module was "
                "not saved in model/ (only private modules are): it cannot be exported"
            )
    attention, mlp, entropy = method.predictor_parts(files, None if site == GLOBAL else site)
    bb = load_run_backbone(meta, backbone)
    if bb.feature_dim != text.shape[1]:
        raise ProvenanceMismatch(
            f"backbone feature dim {bb.feature_dim} != stored text features {text.shape[1]}"
        )
    prep = Preprocessing.from_dict(meta["preprocessing"])
    clf = ImageClassifier(ImageEncoder(bb.model), prep, attention, text, mlp, entropy)
    log.debug("loaded %s classifier for site %s from %s", name, site, run_dir)
    return clf, {**meta, "site": site, "run_dir": str(run_dir)}

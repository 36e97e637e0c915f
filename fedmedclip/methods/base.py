"""What a federated method provides to the engine. One method per module in this package."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..aggregation import weighted_average
from ..backbone import LOGIT_SCALE
from ..errors import ConfigError


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts: every random draw is a function of (seed, site, round),
    so a resumed run draws exactly what an uninterrupted one would."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass
class SiteData:
    """One site's cached features, or, for a method with `needs_images`, its preprocessed uint8 pixels
    [N, S, S, 3] in the same places. Labels of `reference_x` are never given (unlabelled)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    reference_x: torch.Tensor | None = None

    @property
    def n_train(self) -> int:
        return len(self.train_y)


@dataclass
class MethodContext:
    feature_dim: int
    num_classes: int
    text_features: torch.Tensor  # raw [C, D]
    seed: int = 0
    batch_size: int = 32
    options: dict = field(default_factory=dict)
    # Only filled for methods with `needs_images` (they fine-tune the encoders themselves):
    backbone: Any = None  # fedmedclip.backbone.Backbone, the frozen original to copy from
    preprocessing: Any = None  # fedmedclip.preprocess.Preprocessing, turns the uint8 pixels into inputs
    prompts: list[str] | None = None  # one prompt per class, in class order


def batch_stream(n: int, batch_size: int, gen: torch.Generator):
    """An endless stream of shuffled index batches (drop_last; reshuffled at each pass)."""
    b = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - b + 1, b):
            yield perm[i : i + b]


def zero_shot_probs(h: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """softmax_c(100 · cos(ĥ, t_c)) for already-normalised ĥ."""
    return torch.softmax(LOGIT_SCALE * h @ F.normalize(text, dim=1).t(), dim=1)


class SiteTrainer:
    """A site's side of a method: private state plus the local copy of the shared module."""

    def load_shared(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def shared_update(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_round(self, round_index: int) -> dict:
        """Local training for round `round_index` (1-based); returns stats such as the mean loss."""
        raise NotImplementedError

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Local prediction (the site's own rule, e.g. FedMedCLIP's ensemble)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Everything private needed to resume: modules and optimiser state."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def private_modules(self) -> dict[str, nn.Module]:
        """Modules that never leave the site but belong to the exported model (e.g. the MLP)."""
        return {}


class Method:
    """Server-side description of a method."""

    name: str = ""
    weighting: str = "samples"  # aggregation rule: "samples" or "equal"
    default_preprocessing: str = "clip"
    # True: SiteData carries preprocessed pixels instead of cached features, because the method trains
    # the image encoder (no feature cache possible); the engine then also fills ctx.backbone/prompts.
    needs_images: bool = False
    options: dict = {}  # name -> default; documented in the method's module docstring

    def __init__(self, ctx: MethodContext):
        unknown = set(ctx.options) - set(self.options)
        if unknown:
            raise ConfigError(
                f"unknown option(s) for {self.name}: {', '.join(sorted(unknown))}; "
                f"known: {', '.join(f'{k} (default {v})' for k, v in self.options.items())}"
            )
        self.ctx = ctx
        self.opt = {**self.options, **ctx.options}

    def new_global(self) -> nn.Module:
        """The server's copy of the shared module, seeded."""
        raise NotImplementedError

    def shared_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The entries of the shared module that travel."""
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def new_site(self, data: SiteData, index: int) -> SiteTrainer:
        raise NotImplementedError

    def aggregation_counts(self, n_train: list[int]) -> list[int]:
        """The sample counts the `samples` weighting uses: the sites' training-set sizes."""
        return list(n_train)

    def aggregate(self, previous: dict, updates: list[dict], weights: list[float]) -> dict:
        """Weighted average of float entries; counters keep the server's previous value."""
        out = weighted_average(updates, weights)
        for k, v in previous.items():
            if not v.is_floating_point():
                out[k] = v.clone()
        return out

    @torch.no_grad()
    def global_probs(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Prediction at the global site, where no private module exists: zero-shot through the module."""
        raise NotImplementedError

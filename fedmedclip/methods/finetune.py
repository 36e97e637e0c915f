"""Shared machinery of the baselines that fine-tune CLIP itself (FedAvg, FedProx, MOON, FedFocal;
docs/algorithms.md §4): the image AND text encoders are trained, so images are encoded at every step (no
feature cache is possible) and the whole trainable model travels each round.

Settings follow the FACMIC repository's baselines (the BT protocol of its Table 2, §2.3):
- Adam (coupled L2), lr 5e-5, betas (0.9, 0.98), eps 1e-6, weight_decay 0.02; one optimiser per site whose
  state persists across rounds; aggregation weighted by training-set size.
- local_steps 199 per round (the reference's n_iter break); local_epochs 0. Set local_epochs 1 for one pass
  over the local training split (local_epochs set alone replaces the default local_steps; both non-zero is
  refused).
- The frozen temperature exp(logit_scale) = 100 is not trained and does not travel; every other
  parameter of the CLIP model (vision tower, text tower, both projections) is trained and travels.

Memory: every site holds its own model and optimiser state (and MOON two more copies), so with a
ViT-B/32 (151M parameters) expect several GB per site; the tiny backbone is what the tests use."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..losses import contrastive_loss
from .base import (
    NON_NEGATIVE,
    POSITIVE,
    LocalStepsMethod,
    SiteTrainer,
    batch_stream,
    clip_adam,
    generator,
    zero_shot_probs,
)

EVAL_BATCH = 128
FROZEN = ("logit_scale",)  # the temperature stays exactly 100, as everywhere else in the package


def _features(out) -> torch.Tensor:
    # transformers >= 5 wraps the projected features in an output object; older versions return the tensor.
    return getattr(out, "pooler_output", out) if not isinstance(out, torch.Tensor) else out


def trainable_clip(backbone) -> nn.Module:
    """A trainable deep copy of the frozen backbone's CLIPModel (the backbone itself is untouched)."""
    model = copy.deepcopy(backbone.model)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in FROZEN)
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


class FineTuneSite(SiteTrainer):
    """One site fine-tuning its own copy of CLIP. Subclasses add to the loss through `extra_loss`."""

    def __init__(self, method: FineTuneMethod, data, index: int):
        super().__init__(method, data, index)
        self.model = trainable_clip(method.ctx.backbone)
        self.global_params: dict[str, torch.Tensor] | None = None  # the last received global model
        self.optimiser = clip_adam([p for p in self.model.parameters() if p.requires_grad], method.opt)

    # -- encoding through the trainable model
    def image_features(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        x = self.m.ctx.preprocessing.normalise(pixels)
        return _features(model.get_image_features(pixel_values=x)).float()

    def text_features(self, model: nn.Module) -> torch.Tensor:
        ids, mask = self.m.tokens
        return _features(model.get_text_features(input_ids=ids, attention_mask=mask)).float()

    # -- the federated interface
    def load_shared(self, state):
        self.model.load_state_dict(state, strict=False)
        self.global_params = {k: v.clone() for k, v in state.items()}

    def shared_module(self):
        return self.model

    def extra_loss(self, h: torch.Tensor, pixels: torch.Tensor, round_index: int) -> torch.Tensor | None:
        """A method's regulariser on the normalised image embeddings h of the batch; None for none."""
        return None

    def base_loss(self, h: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(h, text, labels)

    def before_round(self, round_index: int) -> None:
        pass

    def after_round(self, round_index: int) -> None:
        pass

    def train_round(self, round_index):
        ctx = self.m.ctx
        x, y = self.data.train_x, self.data.train_y
        b = min(ctx.batch_size, len(y))
        steps = self.m.steps_per_round(len(y))
        stream = batch_stream(len(y), b, generator(ctx.seed, "batches", self.index, round_index))
        self.before_round(round_index)
        self.model.train()
        total = 0.0
        for _ in range(steps):
            idx = next(stream)
            pixels, labels = x[idx], y[idx]
            h = F.normalize(self.image_features(self.model, pixels), dim=1)
            loss = self.base_loss(h, self.text_features(self.model), labels)
            extra = self.extra_loss(h, pixels, round_index)
            if extra is not None:
                loss = loss + extra
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            self.optimiser.step()
            total += loss.item()
        self.after_round(round_index)
        return {"loss": total / max(steps, 1), "steps": steps}

    def state_dict(self):
        return {"model": trainable_state(self.model), "optimiser": copy.deepcopy(self.optimiser.state_dict())}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"], strict=False)
        self.optimiser.load_state_dict(state["optimiser"])


class FineTuneMethod(LocalStepsMethod):
    """Server side: the global module is a trainable CLIP copy; its trainable parameters travel."""

    weighting = "samples"
    default_preprocessing = "clip"
    needs_images = True
    site_class = FineTuneSite
    group = "finetune"
    # Not exportable yet: the fine-tuned encoder is no longer the frozen backbone a run identifies by hash.
    exportable = False
    options = {"lr": 5e-5, "weight_decay": 0.02, **LocalStepsMethod.options}
    option_rules = {"lr": POSITIVE, "weight_decay": NON_NEGATIVE, **LocalStepsMethod.option_rules}
    option_help = {
        "lr": "Adam learning rate (optimiser state persists across rounds)",
        "weight_decay": "Adam L2 weight decay",
        **LocalStepsMethod.option_help,
    }

    def __init__(self, ctx):
        super().__init__(ctx)
        if ctx.backbone is None or ctx.preprocessing is None or not ctx.prompts:
            raise ConfigError(
                f"{self.name} fine-tunes CLIP and needs the backbone, preprocessing and prompts"
            )
        self.check_local_steps(self.name)
        enc = ctx.backbone.tokenizer(
            ctx.prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        self.tokens = (enc["input_ids"], enc["attention_mask"])

    def new_global(self):
        return trainable_clip(self.ctx.backbone)

    def shared_state(self, module):
        return trainable_state(module)

    @torch.no_grad()
    def global_probs(self, module, x):
        """Zero-shot through the (fine-tuned) encoders: softmax(100 · cos(image, prompt))."""
        module.eval()
        ids, mask = self.tokens
        text = _features(module.get_text_features(input_ids=ids, attention_mask=mask)).float()
        out = []
        for i in range(0, len(x), EVAL_BATCH):
            pixels = self.ctx.preprocessing.normalise(x[i : i + EVAL_BATCH])
            out.append(_features(module.get_image_features(pixel_values=pixels)).float())
        h = F.normalize(torch.cat(out) if out else torch.zeros(0, text.shape[1]), dim=1)
        return zero_shot_probs(h, text)


__all__ = ["FineTuneMethod", "FineTuneSite", "trainable_clip", "trainable_state"]

"""FedCLIP (docs/algorithms.md §4, microsoft/PersonalizedFL `fedclip`): an attention adapter
Linear(D,D) → Tanh → Linear(D,D) → Softmax multiplied into the frozen image feature, ĥ = n(a(f) ⊙ f),
trained with the CLIP contrastive loss and averaged with equal weights. Prediction is zero-shot
through the adapter, locally and at the global site.

Options (defaults follow the original FedCLIP code):
- lr 5e-5, weight_decay 0.2, Adam (coupled L2) with betas (0.9, 0.98), eps 1e-6, re-created every round.
- local_epochs 1: one pass over the local training split per round (batch 32, drop_last)."""

from __future__ import annotations

import torch
from torch import nn

from ..losses import contrastive_loss
from ..modules import adapt
from ..seeding import seeded
from .base import (
    MAX_LOCAL_EPOCHS,
    NON_NEGATIVE,
    POSITIVE,
    Bound,
    Method,
    SiteTrainer,
    batch_stream,
    clip_adam,
    generator,
)


class FedClipAdapter(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim), nn.Softmax(dim=1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


class FedClipSite(SiteTrainer):
    def __init__(self, method: FedClip, data, index: int):
        super().__init__(method, data, index)
        self.adapter = method.new_global()

    def shared_module(self):
        return self.adapter

    def train_round(self, round_index):
        ctx, opt = self.m.ctx, self.m.opt
        # Re-created every round, as in the original: the moments reset.
        optimiser = clip_adam(self.adapter.parameters(), opt)
        x, y = self.data.train_x, self.data.train_y
        steps = opt["local_epochs"] * max(1, len(y) // ctx.batch_size)
        stream = batch_stream(len(y), ctx.batch_size, generator(ctx.seed, "batches", self.index, round_index))
        self.adapter.train()
        total = 0.0
        for _ in range(steps):
            idx = next(stream)
            loss = contrastive_loss(adapt(self.adapter, x[idx]), ctx.text_features, y[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item()
        return {"loss": total / max(steps, 1), "steps": steps}

    def resumable_parts(self):
        return {"adapter": self.adapter}


class FedClip(Method):
    name = "fedclip"
    weighting = "equal"
    default_preprocessing = "clip"
    group = "cached"
    exportable = True
    site_class = FedClipSite
    options = {"lr": 5e-5, "weight_decay": 0.2, "local_epochs": 1}
    option_rules = {
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "local_epochs": Bound(1, most=MAX_LOCAL_EPOCHS),
    }
    option_help = {
        "lr": "Adam learning rate (re-created every round)",
        "weight_decay": "Adam L2 weight decay",
        "local_epochs": "passes over the training split per round",
    }

    def new_global(self):
        with seeded(self.seed_for("global")):
            return FedClipAdapter(self.ctx.feature_dim)

"""CLIP zero-shot (docs/algorithms.md §4): nothing is trained and nothing travels.

Prediction everywhere is argmax_c softmax(100 · cos(n(f), n(t_c))) with the prompt template of the run.
Rounds still run (each one only evaluates, and the ledger shows the near-empty payload), so the run
directory and results.json have the same shape as every other method's. Use --rounds 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import contrastive_loss
from .base import Method, SiteTrainer, zero_shot_probs


class ZeroShotSite(SiteTrainer):
    def load_shared(self, state):
        pass

    def shared_update(self):
        return {}

    @torch.no_grad()
    def train_round(self, round_index):
        # No training: report the contrastive loss of the frozen features so the history stays comparable.
        x, y = self.data.train_x, self.data.train_y
        loss = contrastive_loss(F.normalize(x, dim=1), self.m.ctx.text_features, y) if len(y) else 0.0
        return {"loss": float(loss), "steps": 0}

    @torch.no_grad()
    def probs(self, x):
        return self.m.global_probs(None, x)

    def resumable_parts(self):
        return {}


class ZeroShot(Method):
    name = "zeroshot"
    weighting = "equal"
    default_preprocessing = "clip"
    group = "cached"
    exportable = True
    site_class = ZeroShotSite
    options = {}
    sends_parameters = False

    def new_global(self):
        return nn.Module()  # an empty module: its state (and so every payload) has no tensors

    def shared_state(self, module):
        return {}

    def aggregate(self, previous, updates, weights):
        return {}

    @torch.no_grad()
    def global_probs(self, module, x):
        return zero_shot_probs(F.normalize(x, dim=1), self.ctx.text_features)

    def predictor_parts(self, model, site):
        return UnitAttention(), None, "code"


class UnitAttention(nn.Module):
    """a(f) = 1, so n(a(f) f) = n(f): plain CLIP zero-shot through the predictor's head."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(f)

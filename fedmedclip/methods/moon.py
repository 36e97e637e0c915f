"""MOON (docs/algorithms.md §4): FedAvg plus model-contrastive learning on the normalised image embedding z:
mu · CE([cos(z, z_glob), cos(z, z_prev)] / tau, target 0), pulling toward the round's global model and
away from this site's model of the previous round.

The reference's `previous_nets` aliases the current models (so z_prev = z); here the previous local
model is a true copy with its own storage, refreshed at the end of every local round. In round 1 it is
the initial model, as in the MOON paper.

Options (besides those of fedmedclip/methods/finetune.py): mu 1.0, tau 0.5."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .base import NON_NEGATIVE, POSITIVE
from .finetune import FineTuneMethod, FineTuneSite, trainable_state


def _frozen_copy(model):
    twin = copy.deepcopy(model).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


class MoonSite(FineTuneSite):
    def __init__(self, method, data, index):
        super().__init__(method, data, index)
        # Separate modules with their own storage; states are copied into them, never shared.
        self.global_model = _frozen_copy(self.model)
        self.previous_model = _frozen_copy(self.model)

    def before_round(self, round_index):
        if self.global_params is not None:
            self.global_model.load_state_dict(self.global_params, strict=False)

    def after_round(self, round_index):
        self.previous_model.load_state_dict(trainable_state(self.model), strict=False)

    def extra_loss(self, h, pixels, round_index):
        opt = self.m.opt
        with torch.no_grad():
            z_glob = F.normalize(self.image_features(self.global_model, pixels), dim=1)
            z_prev = F.normalize(self.image_features(self.previous_model, pixels), dim=1)
        logits = torch.stack([(h * z_glob).sum(1), (h * z_prev).sum(1)], dim=1) / opt["tau"]
        target = torch.zeros(len(h), dtype=torch.long)
        return opt["mu"] * F.cross_entropy(logits, target)

    def state_dict(self):
        return {**super().state_dict(), "previous": trainable_state(self.previous_model)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.previous_model.load_state_dict(state["previous"], strict=False)


class Moon(FineTuneMethod):
    name = "moon"
    needs_global_model = True
    site_class = MoonSite
    options = {**FineTuneMethod.options, "mu": 1.0, "tau": 0.5}
    option_rules = {**FineTuneMethod.option_rules, "mu": NON_NEGATIVE, "tau": POSITIVE}
    option_help = {
        **FineTuneMethod.option_help,
        "mu": "weight of the model-contrastive loss",
        "tau": "temperature of the model-contrastive loss",
    }

"""FedProx (docs/algorithms.md §4): FedAvg plus a proximal pull toward the round's global model,
(mu/2)·||w − w_g||², active from round 2 (as in the reference).

Options (besides those of fedmedclip/methods/finetune.py):
- mu 0.01.
- prox_norm "squared" (default: the FedProx paper's term) or "unsquared": the reference code's
  (mu/2)·||w − w_g||₂ (the square root of the summed squares), a bug kept only to reproduce its numbers."""

from __future__ import annotations

import torch

from .base import NON_NEGATIVE
from .finetune import FineTuneMethod, FineTuneSite

PROX_NORMS = ("squared", "unsquared")


class FedProxSite(FineTuneSite):
    def extra_loss(self, h, pixels, round_index):
        if round_index < 2 or self.global_params is None:
            return None
        g = self.global_params
        sq = sum(((p - g[k]) ** 2).sum() for k, p in self.model.named_parameters() if p.requires_grad)
        # clamp: at w == w_g (every round's first step) sqrt's gradient would be inf·0 = NaN.
        prox = sq if self.m.opt["prox_norm"] == "squared" else torch.sqrt(sq.clamp_min(1e-12))
        return 0.5 * self.m.opt["mu"] * prox


class FedProx(FineTuneMethod):
    name = "fedprox"
    needs_global_model = True
    site_class = FedProxSite
    options = {**FineTuneMethod.options, "mu": 0.01, "prox_norm": "squared"}
    option_rules = {**FineTuneMethod.option_rules, "mu": NON_NEGATIVE, "prox_norm": PROX_NORMS}
    option_help = {
        **FineTuneMethod.option_help,
        "mu": "weight of the proximal term toward the round's global model (active from round 2)",
        "prox_norm": "squared (the FedProx paper) or unsquared (the reference code's norm)",
    }

"""FedFocal (docs/algorithms.md §4): FedAvg with the contrastive loss replaced by a focal loss with label
smoothing on the B×B contrastive logits (the "classes" are the B batch entries), symmetrised over
images→texts and texts→images like L_con.

Per row with probabilities p and smoothed target q = (1−ε)·onehot + ε/B:
loss = −Σ_j w_j q_j log p_j with w_target = (1 − p_target)^γ (not detached) and w_j = 1 elsewhere,
as in the reference. Options (besides those of fedmedclip/methods/finetune.py): gamma 1.0, smoothing 0.1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbone import LOGIT_SCALE
from .base import NON_NEGATIVE, Bound
from .finetune import FineTuneMethod, FineTuneSite


def focal_smoothed(logits: torch.Tensor, gamma: float, smoothing: float) -> torch.Tensor:
    n = logits.shape[1]
    target = torch.arange(len(logits), device=logits.device)
    logp = F.log_softmax(logits, dim=1)
    onehot = F.one_hot(target, n).to(logits.dtype)
    q = (1 - smoothing) * onehot + smoothing / n
    p_t = logp.gather(1, target[:, None]).exp()
    w = torch.where(onehot.bool(), (1 - p_t) ** gamma, torch.ones_like(logp))
    return -(w * q * logp).sum(1).mean()


class FedFocalSite(FineTuneSite):
    def base_loss(self, h, text, labels):
        s = LOGIT_SCALE * h @ F.normalize(text, dim=1)[labels].t()
        g, eps = self.m.opt["gamma"], self.m.opt["smoothing"]
        return 0.5 * (focal_smoothed(s, g, eps) + focal_smoothed(s.t(), g, eps))


class FedFocal(FineTuneMethod):
    name = "fedfocal"
    site_class = FedFocalSite
    options = {**FineTuneMethod.options, "gamma": 1.0, "smoothing": 0.1}
    # smoothing 1 would make every target uniform: nothing left to learn
    option_rules = {**FineTuneMethod.option_rules, "gamma": NON_NEGATIVE, "smoothing": Bound(0.0, below=1.0)}
    option_help = {
        **FineTuneMethod.option_help,
        "gamma": "focal exponent on the target entry",
        "smoothing": "label smoothing of the contrastive targets",
    }

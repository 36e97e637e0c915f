"""FACMIC (docs/algorithms.md §2): a feature attention module trained with the CLIP contrastive loss plus
LMMD domain adaptation toward an unlabelled reference set, aggregated by sample size.

Options (defaults reproduce the reference code, §2.6):
- lr 5e-5, weight_decay 0.02 (Adam, coupled L2), optimiser state kept across rounds.
- local_steps 199 (the code's n_iter break for BT/SC); local_epochs 0. Set local_epochs 1 for the paper's
  one epoch per round (local_epochs set alone replaces the default local_steps; both non-zero is refused).
- lmmd_weight 1.0 (scaled by 0.1 for batch sizes <= 8, as the paper does).
- bandwidth "mean" (code) or "median" (paper).
- masked_target False: True applies the attention to the target features too (paper reading).
Aggregation weights n_k = 32·⌊n_train_k/32⌋ (the batches a drop_last loader yields, paper Eq. 8).
Pseudo-labels of the target batch come from the attention in train mode, so that batch also moves the
BatchNorm running statistics, once per step as in the reference code (those statistics travel and are averaged).
The reference set itself is chosen by the engine: held-out unlabelled training images by default,
the global test set with `transductive` (only to match the paper's numbers).

Under record-level DP (fedmedclip.privacy) the attention module is trained by DP-SGD on per-example losses:
CE over the class prompts instead of the batch contrastive loss, and LMMD's per-example source-target term
(each labelled example pulled toward the reference examples pseudo-labelled with its class, the bandwidth from
the reference batch alone); the source-source term, which couples a batch's examples, is left out. Its BatchNorm
normalises with the statistics of the step's reference batch instead of the site's own batch (BatchNorm's
running statistics, which travel, move with those batches), and the pseudo-labels come from it without gradient.
`masked_target` is refused (its gradient runs through the reference batch, summed over the labelled examples). The reference set is the server's, sent to every site:
DP-SGD protects the site's labelled examples, not it (docs/privacy.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbone import LOGIT_SCALE
from ..errors import ConfigError
from ..losses import (
    contrastive_loss,
    lmmd_example_loss,
    lmmd_loss,
    prompt_cross_entropy,
    reference_alignment,
)
from ..modules import FacmicAttention, adapt
from ..privacy.dpsgd import reference_normalised, track_reference_statistics
from ..seeding import seeded
from .base import NON_NEGATIVE, POSITIVE, LocalStepsMethod, SiteTrainer, batch_stream, clip_adam, generator


class FacmicSite(SiteTrainer):
    def __init__(self, method: Facmic, data, index):
        super().__init__(method, data, index)
        if data.reference_x is None or len(data.reference_x) == 0:
            raise ConfigError(
                "FACMIC needs an unlabelled reference set: use --reference-fraction > 0 or --transductive"
            )
        self.attention = method.new_global()
        self.optimiser = clip_adam(self.attention.parameters(), method.opt)
        self.dp = method.dp_plan(data) if method.private else None

    def shared_module(self):
        return self.attention

    def train_round(self, round_index):
        ctx, opt = self.m.ctx, self.m.opt
        if self.dp is not None:
            return self._train_round_private(round_index)
        x, y, ref = self.data.train_x, self.data.train_y, self.data.reference_x
        b = min(ctx.batch_size, len(y))
        steps = self.m.steps_per_round(len(y))
        lam = self.m.lmmd_weight(len(y))
        source = batch_stream(len(y), b, generator(ctx.seed, "batches", self.index, round_index))
        target = batch_stream(len(ref), b, generator(ctx.seed, "reference", self.index, round_index))
        text_n = F.normalize(ctx.text_features, dim=1)
        self.attention.train()
        total = 0.0
        for _ in range(steps):
            idx, tidx = next(source), next(target)
            f, labels, ft = x[idx], y[idx], ref[tidx]
            if len(tidx) != len(idx):  # the reference set is smaller than a batch
                ft = ft[torch.arange(len(idx)) % len(ft)]
            h = adapt(self.attention, f)
            if opt["masked_target"]:
                # One forward pass of the target batch gives both the masked target features and, detached,
                # the pseudo-labels: BatchNorm's running statistics move once per target batch, as in the
                # reference (a second pass would give the same values but move them twice).
                z = adapt(self.attention, ft)
                q = torch.softmax(LOGIT_SCALE * z.detach() @ text_n.t(), dim=1)
            else:
                with torch.no_grad():
                    q = torch.softmax(LOGIT_SCALE * adapt(self.attention, ft) @ text_n.t(), dim=1)
                z = F.normalize(ft, dim=1)
            loss = contrastive_loss(h, ctx.text_features, labels) + lam * lmmd_loss(
                h, z, labels, q, ctx.num_classes, opt["bandwidth"]
            )
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            self.optimiser.step()
            total += loss.item()
        return {"loss": total / max(steps, 1), "steps": steps}

    def _example_loss(self, mods, f, labels, reference, target, target_weights, bw, lam):
        """One labelled example's loss under DP-SGD (the module docstring says how it differs)."""
        h = F.normalize(reference_normalised(mods["attention"].net, f, reference) * f, dim=1)
        return prompt_cross_entropy(h, self.m.ctx.text_features, labels) + lam * lmmd_example_loss(
            h, labels, target, target_weights, bw
        )

    def _train_round_private(self, round_index):
        ctx, opt = self.m.ctx, self.m.opt
        y, ref = self.data.train_y, self.data.reference_x
        b = min(ctx.batch_size, len(y))
        lam = self.m.lmmd_weight(len(y))
        target = batch_stream(len(ref), b, generator(ctx.seed, "reference", self.index, round_index))
        text_n = F.normalize(ctx.text_features, dim=1)
        self.attention.eval()

        def step_arguments():
            ft = ref[next(target)]
            # The reference batch moves BatchNorm's running statistics, once per step as in the reference code.
            track_reference_statistics([self.attention], lambda: self.attention(ft))
            with torch.no_grad():
                q = torch.softmax(LOGIT_SCALE * adapt(self.attention, ft) @ text_n.t(), dim=1)
                z = F.normalize(ft, dim=1)
                weights, bw = reference_alignment(z, q, opt["bandwidth"])
            return ft, z, weights, bw, lam

        return self.private_round(
            round_index, {"attention": self.attention}, self._example_loss, self.optimiser, step_arguments
        )

    def resumable_parts(self):
        return {"attention": self.attention, "optimiser": self.optimiser}


class Facmic(LocalStepsMethod):
    name = "facmic"
    weighting = "samples"
    default_preprocessing = "clip"
    group = "cached"
    compare_references = ("local", "centralized")
    exportable = True
    dp_sgd = True
    site_class = FacmicSite
    options = {
        "lr": 5e-5,
        "weight_decay": 0.02,
        **LocalStepsMethod.options,
        "lmmd_weight": 1.0,
        "bandwidth": "mean",
        "masked_target": False,
    }
    option_rules = {
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        **LocalStepsMethod.option_rules,
        "lmmd_weight": NON_NEGATIVE,
        "bandwidth": ("mean", "median"),
    }
    option_help = {
        "lr": "Adam learning rate (coupled L2; the optimiser state persists across rounds)",
        "weight_decay": "Adam L2 weight decay",
        **LocalStepsMethod.option_help,
        "lmmd_weight": "weight of the LMMD adaptation loss (x0.1 for batches of 8 or fewer)",
        "bandwidth": "LMMD kernel bandwidth: mean (code) or median (paper)",
        "masked_target": "apply the attention to the target features too (paper reading)",
    }

    def __init__(self, ctx):
        super().__init__(ctx)
        self.check_local_steps("FACMIC")
        if self.private and self.opt["masked_target"]:
            raise ConfigError(
                "FACMIC with masked_target=true is not available with DP-SGD: its gradient runs through the "
                "reference batch, summed over the labelled examples, so no example's contribution can be clipped"
            )

    def lmmd_weight(self, n_train: int) -> float:
        """λ, scaled by 0.1 for batches of 8 or fewer, as the paper does."""
        return self.opt["lmmd_weight"] * (0.1 if min(self.ctx.batch_size, n_train) <= 8 else 1.0)

    def aggregation_counts(self, n_train):
        # Paper Eq. 8 as coded (§2.4): the samples a drop_last loader yields, b·⌊n/b⌋; a site smaller
        # than one batch still trains on all it has (batch = n), so it keeps its n.
        b = self.ctx.batch_size
        return [n if n < b else b * (n // b) for n in n_train]

    def new_global(self):
        with seeded(self.seed_for("global")):
            return FacmicAttention(self.ctx.feature_dim)

"""FedMedCLIP (docs/algorithms.md §3): a masked FAM travels; each site keeps a masked MLP; a class-wise
KL lets them teach each other; local prediction is an uncertainty-weighted ensemble.

Options (defaults follow the reference code, §8 of docs/algorithms.md):
- lr_fam 5e-5, lr_mlp 1e-3 (README values; the argparse defaults were 5e-4 / 1e-4), lr_decay 0.97 per round,
  weight_decay 0.02; AdamW re-created every round.
- local_epochs 1; kd_weight 0.04; kd_temperature 2.0.
- kd_adaptive False: True weights the two KL directions by the uncertainty share α (the commented-out intent).
- entropy "code" (log-softmax of probabilities) or "shannon", for the ensemble weight.
- mask_rule "code" (row magnitude rule, thresholds inert) or "dst" (element-wise, learnable thresholds, reset
  to 0 whenever a site receives the global module, as the reference's clients do).

Under record-level DP (`--dp-target-epsilon` / `--dp-noise-multiplier`, fedmedclip.privacy) the FAM and the
private MLP are both trained by DP-SGD (the FAM's distillation reads the MLP's predictions, so an MLP trained
without DP would leak into what travels): Poisson-sampled batches, per-example losses (CE over the class
prompts instead of the batch contrastive loss, CE of the MLP, and the per-example symmetric KL over classes
instead of the class-wise KL over the batch), the MLP's BatchNorm normalising with the statistics of a batch
of the unlabelled reference set instead of the site's own batch (its running statistics move with those
batches), the FAM's and the MLP's parts of each example's gradient clipped separately to C/sqrt(2), and the same
optimiser and schedule. DP-specific options (`dp_*`, no effect without DP) size the private training for the
noise: the non-private MLP's 3 dim^2 parameters (51k at the tiny width) take noise of norm about eight times their
clipped mean gradient per step and stay near chance, so under DP the private MLP is a linear head (dp_mlp_depth 0)
on the FAM's output standardised with reference-set statistics, trained with larger expected batches (256) for 4
expected epochs per round (fewer, less noisy steps: sigma grows more slowly than the batch), at lr 1e-2 (the FAM,
whose 2 dim^2 parameters get mostly noise, at 1e-5: AdamW would random-walk it by about lr per step); its
logits are multiplied by dp_logit_scale at prediction only, so the uncertainty-weighted ensemble does not hand
its examples to the zero-shot half (whose logits are 100 cos). The sampling rate and the steps come from these
options through the site's plan, so the accountant composes exactly the steps taken."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..losses import (
    ENTROPIES,
    classwise_kl,
    contrastive_loss,
    ensemble,
    ensemble_weight,
    prompt_cross_entropy,
    samplewise_kl,
)
from ..modules import MASK_RULES, FeatureAdaptationModule, MaskedLinear, PrivateMLP, adapt
from ..privacy.dpsgd import reference_normalised, track_reference_statistics
from ..seeding import seeded
from .base import (
    CLIP_ADAM,
    MAX_LOCAL_EPOCHS,
    NON_NEGATIVE,
    POSITIVE,
    Bound,
    Method,
    SiteData,
    SiteTrainer,
    batch_stream,
    generator,
    strip_prefix,
    zero_shot_probs,
)

SHARED_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


class FedMedClipSite(SiteTrainer):
    def __init__(self, method: FedMedClip, data: SiteData, index: int):
        super().__init__(method, data, index)
        ctx, opt = method.ctx, method.opt
        with seeded(method.seed_for("site", index)):
            self.fam = FeatureAdaptationModule(ctx.feature_dim, opt["mask_rule"])
            self.mlp = method.new_mlp()
        self.text = ctx.text_features
        self.dp = method.dp_plan(data) if method.private else None
        if self.dp is not None and opt["mask_rule"] == "code":
            # The code rule's thresholds get exactly zero gradient (algorithms.md §3.1): under DP-SGD they would
            # get noise alone, drift, and mask rows out. Frozen, they stay at 0 as without DP.
            for module in (self.fam, self.mlp):
                for layer in module.modules():
                    if isinstance(layer, MaskedLinear):
                        layer.threshold.requires_grad_(False)

    def load_shared(self, state):
        self.fam.load_state_dict(state, strict=False)
        # Thresholds do not travel; receiving the global module resets them to its value, 0 (docs/algorithms.md
        # §3.6), so with mask_rule=dst (where they learn) the sites start every round from the global masks.
        with torch.no_grad():
            for layer in (self.fam.fc1, self.fam.fc2):
                layer.threshold.zero_()

    def shared_module(self):
        return self.fam

    def train_round(self, round_index):
        ctx, opt = self.m.ctx, self.m.opt
        decay = opt["lr_decay"] ** (round_index - 1)
        # Re-created every round, as in the reference code: moments reset, lr decays.
        optimiser = torch.optim.AdamW(
            [
                {
                    "params": self.fam.parameters(),
                    "lr": opt["lr_fam" if self.dp is None else "dp_lr_fam"] * decay,
                },
                {
                    "params": self.mlp.parameters(),
                    "lr": opt["lr_mlp" if self.dp is None else "dp_lr_mlp"] * decay,
                },
            ],
            weight_decay=opt["weight_decay"],
            **CLIP_ADAM,
        )
        if self.dp is not None:
            return self._train_round_private(round_index, optimiser)
        x, y = self.data.train_x, self.data.train_y
        steps = self.m.steps_per_round(len(y))
        stream = batch_stream(len(y), ctx.batch_size, generator(ctx.seed, "batches", self.index, round_index))
        self.fam.train()
        self.mlp.train()
        text_n = F.normalize(self.text, dim=1)
        total = 0.0
        for _ in range(steps):
            idx = next(stream)
            f, labels = x[idx], y[idx]
            h = adapt(self.fam, f)
            z = self.mlp(h)
            sim = h @ text_n.t()
            alpha = None
            if opt["kd_adaptive"]:
                with torch.no_grad():
                    p_fam = torch.softmax(100 * sim, dim=1)
                    alpha = ensemble_weight(p_fam, torch.softmax(z, dim=1), opt["entropy"]).mean()
            loss = (
                contrastive_loss(h, self.text, labels)
                + F.cross_entropy(z, labels)
                + opt["kd_weight"] * classwise_kl(z, sim, opt["kd_temperature"], alpha)
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item()
        return {"loss": total / max(steps, 1), "steps": steps}

    def _example_loss(self, mods, f, labels, text_n, reference):
        """One example's loss under DP-SGD (the module docstring says how it differs)."""
        opt = self.m.opt
        h = adapt(mods["fam"], f)
        z = reference_normalised(mods["mlp"].net, h, adapt(mods["fam"], reference))
        sim = h @ text_n.t()
        alpha = None
        if opt["kd_adaptive"]:
            with torch.no_grad():
                alpha = ensemble_weight(
                    torch.softmax(100 * sim, dim=1), torch.softmax(z, dim=1), opt["entropy"]
                )
        return (
            prompt_cross_entropy(h, self.text, labels)
            + F.cross_entropy(z, labels)
            + opt["kd_weight"] * samplewise_kl(z, sim, opt["kd_temperature"], alpha)
        )

    def _train_round_private(self, round_index, optimiser):
        ref = self.data.reference_x
        if ref is None or len(ref) < 2:
            raise ConfigError(
                "FedMedCLIP with DP-SGD normalises its MLP with reference-set statistics: it needs an "
                "unlabelled reference set (--reference-fraction > 0)"
            )
        self.fam.eval()
        self.mlp.eval()
        text_n = F.normalize(self.text, dim=1)
        references = batch_stream(
            len(ref), self.m.ctx.batch_size, generator(self.m.ctx.seed, "reference", self.index, round_index)
        )

        def step_arguments():
            reference = ref[next(references)]
            track_reference_statistics([self.mlp], lambda: self.mlp(adapt(self.fam, reference)))
            return text_n, reference

        mods = {"fam": self.fam, "mlp": self.mlp}
        return self.private_round(round_index, mods, self._example_loss, optimiser, step_arguments)

    @torch.no_grad()
    def probs(self, x):
        self.fam.eval()
        self.mlp.eval()
        h = adapt(self.fam, x)
        p_mlp = torch.softmax(self.mlp(h), dim=1)
        return ensemble(zero_shot_probs(h, self.text), p_mlp, self.m.opt["entropy"])

    def resumable_parts(self):
        return {"fam": self.fam, "mlp": self.mlp}

    def private_modules(self):
        return {"mlp": self.mlp}

    def model_tensors(self, own_shared=False):
        # The site predicts with its own FAM (its masks and thresholds included), so the whole FAM is part of
        # its model, whatever the federation mode.
        tensors = super().model_tensors(own_shared=False)
        tensors.update(
            {f"fam.{k}": v.detach().clone().contiguous() for k, v in self.fam.state_dict().items()}
        )
        return tensors


# The deepest private MLP under DP-SGD (3 is the non-private shape; each layer is dim^2 parameters more noise), and
# the largest expected Poisson batch.
MAX_DP_MLP_DEPTH, MAX_DP_BATCH_SIZE = 16, 1_000_000


class FedMedClip(Method):
    name = "fedmedclip"
    weighting = "equal"
    default_preprocessing = "squash"
    group = "cached"
    compare_references = ("local", "centralized")
    exportable = True
    dp_sgd = True
    site_class = FedMedClipSite
    options = {
        "lr_fam": 5e-5,
        "lr_mlp": 1e-3,
        "lr_decay": 0.97,
        "weight_decay": 0.02,
        "local_epochs": 1,
        "kd_weight": 0.04,
        "kd_temperature": 2.0,
        "kd_adaptive": False,
        "entropy": "code",
        "mask_rule": "code",
        "dp_batch_size": 256,
        "dp_epochs": 4.0,
        "dp_mlp_depth": 0,
        "dp_lr_mlp": 1e-2,
        "dp_lr_fam": 1e-5,
        "dp_logit_scale": 10.0,
    }
    option_rules = {
        "lr_fam": POSITIVE,
        "lr_mlp": POSITIVE,
        "lr_decay": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        # 0 would train nothing and still report a federated run
        "local_epochs": Bound(1, most=MAX_LOCAL_EPOCHS),
        "kd_weight": NON_NEGATIVE,
        "kd_temperature": POSITIVE,
        "entropy": tuple(ENTROPIES),
        "mask_rule": MASK_RULES,
        # the expected batch is at most a site's training set (the sampling rate is at most 1): beyond a million
        # it only says the same thing
        "dp_batch_size": Bound(1, most=MAX_DP_BATCH_SIZE),
        "dp_epochs": Bound(0, strict=True, most=MAX_LOCAL_EPOCHS),
        "dp_mlp_depth": Bound(0, most=MAX_DP_MLP_DEPTH),
        "dp_lr_mlp": POSITIVE,
        "dp_lr_fam": POSITIVE,
        "dp_logit_scale": POSITIVE,
    }
    option_help = {
        "lr_fam": "learning rate of the FAM (AdamW, re-created every round)",
        "lr_mlp": "learning rate of the private MLP",
        "lr_decay": "learning-rate factor per round (lr x decay^(round-1))",
        "weight_decay": "AdamW decoupled weight decay",
        "local_epochs": "passes over the site's training split per round",
        "kd_weight": "weight of the class-wise KL between the MLP and the FAM zero-shot logits",
        "kd_temperature": "temperature of that KL",
        "kd_adaptive": "weight the two KL directions by the uncertainty share (the reference's commented-out intent)",
        "entropy": "uncertainty of the ensemble weight: code (log-softmax of probabilities) or shannon",
        "mask_rule": "code (row magnitude mask, thresholds inert) or dst (element-wise, learnable thresholds)",
        "dp_batch_size": "under DP-SGD only: expected Poisson batch (sampling rate batch/n_train, at most 1); "
        "larger batches average the noise sigma C over more examples while sigma grows slowly",
        "dp_epochs": "under DP-SGD only: expected passes over the training split per round "
        "(steps per round = round(epochs x n_train / batch)); the accountant composes the steps taken",
        "dp_mlp_depth": "under DP-SGD only: hidden layers of the private MLP, input standardised with reference-set "
        "statistics (0: a linear head, 4 x (dim+1) parameters, whose gradient the noise does not swamp; 3: the "
        "non-private shape, 3 dim^2 parameters)",
        "dp_lr_mlp": "under DP-SGD only: learning rate of the private MLP (the linear head learns with fewer, "
        "noisier steps than the non-private MLP)",
        "dp_lr_fam": "under DP-SGD only: learning rate of the FAM (AdamW moves each coordinate whose gradient is "
        "mostly noise by about lr per step, so the FAM random-walks and the head reading it must follow)",
        "dp_logit_scale": "under DP-SGD only: factor on the private MLP's logits at prediction (not in training): "
        "the uncertainty-weighted ensemble compares the MLP's confidence with the zero-shot's (logit scale 100), "
        "and the DP-trained head's logits are an order of magnitude smaller than the non-private MLP's",
    }

    def new_mlp(self) -> PrivateMLP:
        """The site's private MLP: the non-private shape, or under DP-SGD the `dp_mlp_depth` one."""
        c = self.ctx
        if not self.private:
            return PrivateMLP(c.feature_dim, c.num_classes, self.opt["mask_rule"])
        return PrivateMLP(
            c.feature_dim,
            c.num_classes,
            self.opt["mask_rule"],
            self.opt["dp_mlp_depth"],
            input_norm=True,
            logit_scale=self.opt["dp_logit_scale"],
        )

    def dp_batch_size(self):
        return self.opt["dp_batch_size"]

    def dp_steps_per_round(self, n_train):
        return max(1, round(self.opt["dp_epochs"] * n_train / min(self.opt["dp_batch_size"], n_train)))

    def steps_per_round(self, n_train):
        return self.opt["local_epochs"] * max(1, n_train // self.ctx.batch_size)

    def new_global(self):
        with seeded(self.seed_for("global")):
            return FeatureAdaptationModule(self.ctx.feature_dim, self.opt["mask_rule"])

    def shared_state(self, module):
        return {k: v.detach().clone() for k, v in module.state_dict().items() if k in SHARED_KEYS}

    def predictor_parts(self, model, site):
        from ..errors import FedMedClipError

        if site is None:
            # The global module: a fresh FAM holding the communicated fc weights; its thresholds never
            # travel and stay at their initial zeros, as in the server's own evaluation.
            fam = self.new_global()
            missing, unexpected = fam.load_state_dict(model.global_state(), strict=False)
            if unexpected or any(not k.endswith("threshold") for k in missing):
                raise FedMedClipError(
                    f"global.safetensors does not hold a FAM: missing {missing}, unexpected {unexpected}"
                )
            return fam, None, self.opt["entropy"]
        state = model.site(site)
        if state is None:
            raise FedMedClipError(
                f"model/site_{site}.safetensors is missing: a FedMedCLIP site's MLP stays at that site "
                "(its own state store, model/site_<name>.safetensors); copy it into the run's model/ folder to export it"
            )
        fam = FeatureAdaptationModule(self.ctx.feature_dim, self.opt["mask_rule"])
        mlp_state = strip_prefix(state, "mlp.")
        # Trained with or without DP (model.json does not say), the MLP's own tensors give its shape.
        mlp = PrivateMLP.for_state(
            self.ctx.feature_dim, self.ctx.num_classes, self.opt["mask_rule"], mlp_state
        )
        fam.load_state_dict(strip_prefix(state, "fam."))
        mlp.load_state_dict(mlp_state)
        return fam, mlp, self.opt["entropy"]

"""DP-SGD at a site (Abadi et al. 2016): Poisson-sampled batches, each example's gradient clipped to norm C,
Gaussian noise of std sigma*C added to the sum, divided by the expected batch size, then the method's own
optimiser step. Per-example gradients come from torch.func (vmap over grad), cheap on cached features.

What a method gives: its trainable modules, and a per-example loss: a function of the modules and ONE example
(tensors with a batch dimension of 1) plus per-step tensors that hold no training example (the class prompts,
FACMIC's reference batch). A loss that couples the examples of a batch (the CLIP contrastive loss, FedMedCLIP's
class-wise KL over the batch, BatchNorm in training mode) has no per-example gradient to clip, so methods
use per-example forms under DP and run their modules in eval mode; a BatchNorm layer normalises with the
statistics of a reference-set batch carried through the same layers (`reference_normalised`), which also
move its running statistics (`track_reference_statistics`): never with the site's own examples.
With several modules (FedMedCLIP's FAM and MLP) each module's part of an example's gradient is clipped to
C/sqrt(modules), so an example's whole contribution stays within C.

The randomness that the guarantee rests on (which examples a step samples, and the noise) must be unknown to
everyone else, the server included: it is drawn from a 256-bit key taken from the operating system when the
site first trains, kept in the site's private state (its checkpoint) and never sent. Draws are a function of
(key, round, step), so a resumed site continues exactly. torch's generator is not a cryptographic generator
(Opacus without `secure_mode` is in the same position); docs/privacy.md says so.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from ..modules import MaskedLinear
from ..seeding import derive_seed
from .accounting import SitePlan

log = logging.getLogger("fedmedclip.privacy")

KEY_BYTES = 32


class _PerExampleLoss(nn.Module):
    def __init__(self, modules: dict[str, nn.Module], loss: Callable):
        super().__init__()
        self.mods = nn.ModuleDict(modules)
        self.loss = loss

    def forward(self, *args):
        return self.loss(self.mods, *args)


def per_example_gradients(
    modules: dict[str, nn.Module], loss: Callable, examples: tuple[torch.Tensor, ...], shared: tuple = ()
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({parameter name: [B, *shape] gradients}, [B] losses): `loss(modules, *example_i, *shared)` for each
    example i alone (its tensors with a batch dimension of 1). Names are `<module>.<parameter>`."""
    from torch.func import functional_call, grad_and_value, vmap

    wrapper = _PerExampleLoss(modules, loss)
    params = {k: p.detach() for k, p in wrapper.named_parameters() if p.requires_grad}
    buffers = dict(wrapper.named_buffers())

    def one(p, *example):
        return functional_call(wrapper, (p, buffers), tuple(e.unsqueeze(0) for e in example) + tuple(shared))

    grads, losses = vmap(grad_and_value(one), in_dims=(None,) + (0,) * len(examples))(params, *examples)
    return {k.removeprefix("mods."): g for k, g in grads.items()}, losses


def clip_per_example(
    grads: dict[str, torch.Tensor], clip: float, groups: int = 1
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each example's gradient scaled to norm at most `clip`; returns the clipped per-example gradients and
    each example's norm before clipping. With `groups` > 1 (parameter names `<group>.<rest>`, one group per
    module), each group's part is clipped on its own to clip / sqrt(groups), so the whole stays within
    `clip` and a module whose gradients are small (FedMedCLIP's MLP beside its FAM) keeps its share."""
    bound = clip / groups**0.5
    names = sorted({k.split(".", 1)[0] for k in grads}) if groups > 1 else [""]
    if len(names) != groups:
        raise ValueError(f"{groups} clipping groups asked, the gradients name {names}")
    out, total = {}, 0.0
    for name in names:
        part = {k: g for k, g in grads.items() if groups == 1 or k.split(".", 1)[0] == name}
        flat = [g.reshape(g.shape[0], -1) for g in part.values()]
        sq = sum((f.double() ** 2).sum(dim=1) for f in flat)
        total = total + sq
        scale = (bound / (torch.sqrt(sq).to(flat[0].dtype) + 1e-6)).clamp(max=1.0)
        out.update({k: g * scale.view(-1, *([1] * (g.dim() - 1))) for k, g in part.items()})
    return {k: out[k] for k in grads}, torch.sqrt(total).to(next(iter(grads.values())).dtype)


def reference_normalised(layers: nn.Sequential, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`layers(x)` with every BatchNorm normalising by the statistics of `reference` (a batch of the
    reference set, carried through the same layers) instead of x's own batch: BatchNorm's training-mode
    behaviour, gradient through the statistics included, with statistics that hold no example of the site,
    so each example's output depends on that example alone (what DP-SGD's per-example gradients need)."""
    for layer in layers:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            mean, var = reference.mean(dim=0), reference.var(dim=0, unbiased=False)

            def norm(t, layer=layer, mean=mean, var=var):
                t = (t - mean) / torch.sqrt(var + layer.eps)
                return t * layer.weight + layer.bias if layer.affine else t

            x, reference = norm(x), norm(reference)
        else:
            x, reference = layer(x), layer(reference)
    return x


def track_reference_statistics(modules: list[nn.Module], forward: Callable[[], object]) -> None:
    """Move the running statistics of the BatchNorm layers in `modules` (what they normalise with at
    prediction) with one forward pass over a reference batch, as training mode would with a batch of the
    site's own; the modules are left in eval mode."""
    for mod in modules:
        mod.train()
    with torch.no_grad():
        forward()
    for mod in modules:
        mod.eval()


def trainable(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """The parameters DP-SGD trains, named `<module>.<parameter>` as `per_example_gradients` names them."""
    return {f"{m}.{k}": p for m, mod in modules.items() for k, p in mod.named_parameters() if p.requires_grad}


def new_key() -> torch.Tensor:
    return torch.frombuffer(bytearray(os.urandom(KEY_BYTES)), dtype=torch.uint8).clone()


class DPSGD:
    """A site's DP-SGD: sampling, per-example clipping, noise, the step budget and the privacy ledger.
    `state_dict()` (the key and the steps taken) belongs to the site's private checkpoint."""

    def __init__(self, plan: SitePlan, site: str):
        self.plan, self.site = plan, site
        self.key = new_key()
        self.steps = 0  # DP-SGD steps taken in all rounds: what the accountant composes
        self.stopped_at: int | None = None  # the round in which the budget stopped training

    # -- state
    def state_dict(self) -> dict:
        return {"key": self.key.clone(), "steps": self.steps, "stopped_at": self.stopped_at or 0}

    def load_state_dict(self, state: dict) -> None:
        self.key = state["key"].clone()
        self.steps = int(state["steps"])
        self.stopped_at = int(state["stopped_at"]) or None

    # -- randomness only this site knows
    def generator(self, *parts) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(bytes(self.key.tolist()), *parts))

    def sample(self, n: int, round_index: int, step: int) -> torch.Tensor:
        """Poisson sampling: each of the n training examples joins the step's batch with probability q."""
        gen = self.generator("sample", round_index, step)
        return torch.nonzero(torch.rand(n, generator=gen) < self.plan.sample_rate).flatten()

    # -- the budget
    def may_step(self, round_index: int) -> bool:
        """False once one more step would take epsilon above the budget (said once, in the site's log)."""
        budget = self.plan.budget_steps
        if budget is None or self.steps < budget:
            return True
        if self.stopped_at is None:
            self.stopped_at = round_index
            log.warning(
                "%s: round %d: privacy budget reached after %d DP-SGD steps (epsilon %.4g of %.4g at delta %g): "
                "one more step would exceed it, so this site trains no further; it sends the module it received",
                self.site,
                round_index,
                self.steps,
                self.epsilon(),
                self.plan.budget,
                self.plan.delta,
            )
        return False

    def epsilon(self) -> float:
        return self.plan.epsilon(self.steps)

    # -- one step
    def noisy_gradient(
        self,
        modules: dict[str, nn.Module],
        loss: Callable,
        examples: tuple[torch.Tensor, ...],
        shared: tuple,
        round_index: int,
        step: int,
    ) -> tuple[dict[str, torch.Tensor], float]:
        """(sum of clipped per-example gradients + N(0, (sigma C)^2)) / expected batch, per parameter, and the
        batch's mean loss (nan for an empty batch)."""
        params = trainable(modules)
        if len(examples[0]):
            grads, losses = per_example_gradients(modules, loss, examples, shared)
            clipped, _ = clip_per_example(grads, self.plan.clip, groups=len(modules))
            summed = {k: clipped[k].sum(dim=0) for k in params}
            mean_loss = float(losses.mean())
        else:  # Poisson sampling may draw an empty batch: the step is then noise alone
            summed = {k: torch.zeros_like(p) for k, p in params.items()}
            mean_loss = float("nan")
        gen = self.generator("noise", round_index, step)
        std = self.plan.noise_multiplier * self.plan.clip
        denominator = self.plan.sample_rate * self.plan.n_train
        return {
            k: (s + torch.normal(0.0, std, s.shape, generator=gen, dtype=s.dtype)) / denominator
            for k, s in summed.items()
        }, mean_loss

    def step(
        self,
        modules: dict[str, nn.Module],
        loss: Callable,
        examples: tuple[torch.Tensor, ...],
        shared: tuple,
        optimiser: torch.optim.Optimizer,
        round_index: int,
        step: int,
    ) -> float:
        """One DP-SGD step with the method's optimiser; returns the batch's mean loss."""
        for mod in modules.values():
            for layer in mod.modules():
                if isinstance(layer, MaskedLinear):  # what the layer's training-mode forward would do
                    layer.reset_if_collapsed()
        noisy, mean_loss = self.noisy_gradient(modules, loss, examples, shared, round_index, step)
        optimiser.zero_grad(set_to_none=True)
        for name, p in trainable(modules).items():
            p.grad = noisy[name]
        optimiser.step()
        self.steps += 1
        return mean_loss

    def report(self) -> dict:
        """What the site reports (a metric report: docs/privacy.md): its plan and epsilon so far."""
        p = self.plan
        return {
            "epsilon": self.epsilon(),
            "delta": p.delta,
            "steps": self.steps,
            "planned_steps": p.planned_steps,
            "noise_multiplier": p.noise_multiplier,
            "clip": p.clip,
            "sample_rate": p.sample_rate,
            "n_train": p.n_train,
            "accountant": p.accountant,
            "budget": p.budget,
            "stopped_at_round": self.stopped_at,
        }

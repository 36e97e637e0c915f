"""What a federated method provides to the engine. One method per module in this package."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..aggregation import weighted_average
from ..backbone import LOGIT_SCALE
from ..errors import ConfigError, shown
from ..flags import is_finite_number
from ..modules import adapt
from ..seeding import derive_seed, generator  # noqa: F401 - the methods' helpers, re-exported here


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
    # Differential privacy (fedmedclip.privacy): record-level DP-SGD at each site needs the rounds to plan
    # its noise before any training.
    privacy: Any = None  # fedmedclip.privacy.PrivacySettings, or None
    rounds: int = 1


def batch_stream(n: int, batch_size: int, gen: torch.Generator):
    """An endless stream of shuffled index batches (drop_last; reshuffled at each pass)."""
    b = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - b + 1, b):
            yield perm[i : i + b]


@dataclass(frozen=True)
class Bound:
    """A numeric method option's range: at least `low` (above it when `strict`), below `below`, and at most
    `most` (an option that sizes a site's work or memory declares it: a billion local epochs ran forever, an MLP
    100000 layers deep took 7 GB and then failed)."""

    low: float
    strict: bool = False
    below: float = math.inf
    most: float = math.inf

    def problem(self, value) -> str | None:
        if value < self.low or (self.strict and value == self.low):
            return f"must be {'above' if self.strict else 'at least'} {self.low:g}"
        if value >= self.below:
            return f"must be below {self.below:g}"
        if value > self.most:
            return f"must be at most {_number(self.most)}"
        return None

    def describe(self) -> str:
        """The range as `fedmedclip methods` shows it, e.g. "at least 1, at most 1,000"."""
        parts = [f"{'above' if self.strict else 'at least'} {self.low:g}"]
        if self.below != math.inf:
            parts.append(f"below {self.below:g}")
        if self.most != math.inf:
            parts.append(f"at most {_number(self.most)}")
        return ", ".join(parts)


def _number(value: float) -> str:
    """1,000,000 rather than 1e+06 for a whole number."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


POSITIVE, NON_NEGATIVE = Bound(0.0, strict=True), Bound(0.0)
# The most of an option that sizes a site's work per round: passes over its training split, optimiser steps.
MAX_LOCAL_EPOCHS, MAX_LOCAL_STEPS = 1_000, 100_000


def option_problem(value, default, rule) -> str | None:
    """Why `value` cannot stand for an option whose default is `default` and whose rule is `rule` (a Bound, a
    tuple of the allowed strings, or None), or None when it can. The default's type is the option's type: a
    --method-opt value is parsed as JSON, so a typo must not travel on as a string, a NaN or a list."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            return "must be an integer"
    elif isinstance(default, float):
        if not is_finite_number(value):  # 10**400 too: no float holds it
            return "must be a finite number"
    elif isinstance(default, str):
        if not isinstance(value, str):
            return "must be a string"
        if rule is not None and value not in rule:
            return f"must be one of {', '.join(rule)}"
        return None
    return rule.problem(value) if isinstance(rule, Bound) else None


# Adam's moments as CLIP is trained, which the reference codes keep for every module they train.
CLIP_ADAM = {"betas": (0.9, 0.98), "eps": 1e-6}


def clip_adam(params, opt: dict) -> torch.optim.Adam:
    """Adam (coupled L2) with CLIP's moments, at a method's `lr` and `weight_decay` options."""
    return torch.optim.Adam(params, lr=opt["lr"], weight_decay=opt["weight_decay"], **CLIP_ADAM)


def zero_shot_probs(h: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """softmax_c(100 · cos(ĥ, t_c)) for already-normalised ĥ."""
    return torch.softmax(LOGIT_SCALE * h @ F.normalize(text, dim=1).t(), dim=1)


class SiteTrainer:
    """A site's side of a method: private state plus the local copy of the shared module."""

    dp: Any = None  # its DP-SGD (fedmedclip.privacy.dpsgd.DPSGD) under record-level DP, else None

    def __init__(self, method: Method, data: SiteData, index: int):
        self.m, self.data, self.index = method, data, index

    def shared_module(self) -> nn.Module:
        """The site's copy of the shared module, which the defaults below receive, send and predict through."""
        raise NotImplementedError

    def load_shared(self, state: dict[str, torch.Tensor]) -> None:
        self.shared_module().load_state_dict(state)

    def shared_update(self) -> dict[str, torch.Tensor]:
        return self.m.shared_state(self.shared_module())

    def train_round(self, round_index: int) -> dict:
        """Local training for round `round_index` (1-based); returns stats such as the mean loss."""
        raise NotImplementedError

    def private_round(
        self, round_index: int, modules: dict[str, nn.Module], example_loss, optimiser, step_arguments
    ) -> dict:
        """A round of DP-SGD on `modules`: up to the plan's steps, each on a Poisson batch of the site's labelled
        examples with the loss `example_loss(modules, f, labels, *step_arguments())`, stopping where the privacy
        budget would be exceeded. Its stats: the mean loss of its non-empty batches (0 when it took no step: a site
        whose budget is spent still reports a finite loss), its steps and its epsilon so far."""
        x, y = self.data.train_x, self.data.train_y
        losses = []
        for step in range(self.m.dp_steps_per_round(len(y))):
            if not self.dp.may_step(round_index):
                break
            shared = step_arguments()
            idx = self.dp.sample(len(y), round_index, step)
            losses.append(
                self.dp.step(modules, example_loss, (x[idx], y[idx]), shared, optimiser, round_index, step)
            )
        finite = [v for v in losses if v == v]
        return {
            "loss": sum(finite) / len(finite) if finite else 0.0,
            "steps": len(losses),
            "epsilon": self.dp.epsilon(),
        }

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Local prediction: by default the global rule through the site's module; a method with a rule of its
        own overrides it (e.g. FedMedCLIP's ensemble)."""
        return self.m.global_probs(self.shared_module(), x)

    def resumable_parts(self) -> dict[str, Any]:
        """The private modules and optimiser a resume restores, by name (each has state_dict/load_state_dict)."""
        raise NotImplementedError

    def _resumed(self) -> dict[str, Any]:
        return {**self.resumable_parts(), **({"dp": self.dp} if self.dp is not None else {})}

    def state_dict(self) -> dict:
        """Everything private needed to resume: modules, optimiser state and, under DP, the privacy ledger."""
        return {name: part.state_dict() for name, part in self._resumed().items()}

    def load_state_dict(self, state: dict) -> None:
        for name, part in self._resumed().items():
            part.load_state_dict(state[name])

    def privacy_report(self) -> dict | None:
        """This site's DP-SGD ledger (epsilon so far, its plan), None without record-level DP."""
        return self.dp.report() if self.dp is not None else None

    def private_modules(self) -> dict[str, nn.Module]:
        """Modules that never leave the site but belong to the exported model (e.g. the MLP)."""
        return {}

    def model_tensors(self, own_shared: bool = False) -> dict[str, torch.Tensor]:
        """This site's part of the exported model (`model/site_<name>.safetensors`): its private modules as
        `<module>.<key>`; with `own_shared` (local-only training, where the site's shared module never reached
        the global file) also its shared module as `attention.<key>`."""
        tensors = {
            f"{name}.{k}": v.detach().clone().contiguous()
            for name, m in self.private_modules().items()
            for k, v in m.state_dict().items()
        }
        if own_shared:
            tensors.update({f"attention.{k}": v.contiguous() for k, v in self.shared_update().items()})
        return tensors


class Method:
    """Server-side description of a method."""

    name: str = ""
    weighting: str = "samples"  # aggregation rule: "samples" or "equal"
    default_preprocessing: str = "clip"
    # True: SiteData carries preprocessed pixels instead of cached features, because the method trains
    # the image encoder (no feature cache possible); the engine then also fills ctx.backbone/prompts.
    needs_images: bool = False
    # True: the local loss regularises toward the round's global model (FedProx, MOON), so the method has no
    # meaning without a federation (`--federation local|centralized` refuse it).
    needs_global_model: bool = False
    # Its group in `fedmedclip compare`: "cached" (frozen CLIP, trains on cached features) or "finetune"
    # (trains CLIP itself), and the references (`--federation local|centralized`) the `cached` group runs.
    group: str = "cached"
    compare_references: tuple[str, ...] = ()
    options: dict = {}  # name -> default (its type is the option's type)
    option_help: dict = {}  # name -> one line of help (`fedmedclip methods` prints them)
    option_rules: dict = {}  # name -> Bound of a numeric option, or the tuple of a string option's values
    site_class: type[SiteTrainer]  # what `new_site` builds: site_class(method, data, index)
    # Whether a run directory of this method can be rebuilt into a predictor (`predictor_parts`) and exported.
    exportable: bool = False
    # Whether its sites can train with record-level DP-SGD (fedmedclip.privacy): the method then trains on
    # per-example losses under DP (see its module's docstring); others refuse --dp-target-epsilon.
    dp_sgd: bool = False
    # False when nothing travels (zero-shot): client-level DP and secure aggregation have nothing to protect.
    sends_parameters: bool = True

    def __init__(self, ctx: MethodContext):
        self.check_options(ctx.options)
        self.ctx = ctx
        self.opt = self.resolved(ctx.options)
        if self.private and not self.dp_sgd:
            raise ConfigError(
                f"{self.name} does not support record-level differential privacy (DP-SGD is implemented for "
                "the methods that train small modules on cached features: "
                f"{', '.join(dp_sgd_methods())}); drop --dp-target-epsilon / --dp-noise-multiplier"
            )

    @classmethod
    def check_options(cls, given: dict) -> None:
        """Refuse unknown options and values of the wrong type or out of range, naming the option (before any
        work: TrainConfig.validate calls it too)."""
        unknown = sorted(set(given) - set(cls.options))
        if unknown:
            raise ConfigError(
                f"unknown option(s) for {cls.name}: {', '.join(unknown)}; known: "
                + (", ".join(f"{k} (default {v})" for k, v in cls.options.items()) or "none")
            )
        for name, value in given.items():
            problem = option_problem(value, cls.options[name], cls.option_rules.get(name))
            if problem:
                help_text = cls.option_help.get(name)
                raise ConfigError(
                    f"{cls.name} option {name}={shown(value)} {problem}"
                    + (f" ({help_text})" if help_text else "")
                )

    @classmethod
    def resolved(cls, given: dict) -> dict:
        """The options it runs with when the user set `given` (results.json's `method_options`)."""
        return {**cls.options, **given}

    @property
    def private(self) -> bool:
        """Record-level DP-SGD at the sites."""
        return self.ctx.privacy is not None and self.ctx.privacy.record_level

    def steps_per_round(self, n_train: int) -> int:
        """The optimiser steps a site with `n_train` training examples takes per round."""
        raise NotImplementedError

    def dp_batch_size(self) -> int:
        """The expected Poisson batch under DP-SGD (the plan's sampling rate is this / n_train)."""
        return self.ctx.batch_size

    def dp_steps_per_round(self, n_train: int) -> int:
        """The DP-SGD steps a site with `n_train` training examples plans per round."""
        return self.steps_per_round(n_train)

    def dp_plan(self, data: SiteData):
        """This site's DP-SGD plan (noise multiplier, step budget) from its own training-set size."""
        from ..privacy.accounting import plan_site
        from ..privacy.dpsgd import DPSGD

        n = data.n_train
        plan = plan_site(
            self.ctx.privacy,
            n,
            self.dp_batch_size(),
            self.dp_steps_per_round(n),
            self.ctx.rounds,
            f"site {data.name}",
        )
        return DPSGD(plan, data.name)

    def new_global(self) -> nn.Module:
        """The server's copy of the shared module, seeded."""
        raise NotImplementedError

    def shared_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The entries of the shared module that travel."""
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def seed_for(self, *parts) -> int:
        """A seed of this run and method for `parts` (e.g. "global"), stable across processes."""
        return derive_seed(self.ctx.seed, self.name, *parts)

    def new_site(self, data: SiteData, index: int) -> SiteTrainer:
        return self.site_class(self, data, index)

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
        """Prediction at the global site, where no private module exists: zero-shot through the module. The
        default serves methods whose shared module is an attention a(f) on the cached feature f:
        softmax(100 cos(n(a(f) f), t_c))."""
        module.eval()
        return zero_shot_probs(adapt(module, x), self.ctx.text_features)

    def predictor_parts(self, model: ModelFiles, site: str | None) -> tuple[nn.Module, nn.Module | None, str]:
        """The head of the exported predictor for `site` (None: the global model), rebuilt from a run's
        model/ files: (attention a(f), private MLP or None, entropy rule of the ensemble). The predictor is
        softmax(100 cos(n(a(f) f), t_c)), ensembled with the MLP's softmax when there is one. The default
        serves methods whose shared module is all a site holds: the global module, or with
        `--federation local` the site's own module (its `attention.*` tensors)."""
        attention = self.new_global()
        own = model.site(site) if site is not None and model.federation == "local" else None
        if own is not None:
            attention.load_state_dict(strip_prefix(own, "attention."))
        else:
            attention.load_state_dict(model.global_state())
        return attention, None, "code"


class LocalStepsMethod(Method):
    """A method on the local schedule of the FACMIC reference, which FACMIC and the baselines that fine-tune CLIP
    share: a fixed number of steps per round (the reference's n_iter break) or, instead, whole passes over the
    training split. Its options spread these `options` and `option_help` into their own, and its constructor
    calls `check_local_steps`."""

    options = {"local_steps": 199, "local_epochs": 0}
    option_rules = {
        "local_steps": Bound(0, most=MAX_LOCAL_STEPS),
        "local_epochs": Bound(0, most=MAX_LOCAL_EPOCHS),
    }
    option_help = {
        "local_steps": "training steps per round (the reference's 199); 0 with local_epochs",
        "local_epochs": "passes over the training split per round instead of local_steps",
    }

    @classmethod
    def resolved(cls, given):
        """An option the user sets takes effect: local_epochs alone replaces the default local_steps (which would
        otherwise win)."""
        opt = super().resolved(given)
        if given.get("local_epochs") and "local_steps" not in given:
            opt["local_steps"] = 0
        return opt

    def check_local_steps(self, label: str) -> None:
        """Refuse the two options as `resolved` settled them when both are set (ambiguous) or neither, naming the
        method `label`."""
        opt = self.opt
        if opt["local_steps"] and opt["local_epochs"]:
            raise ConfigError(
                f"{label} got local_steps={opt['local_steps']} and local_epochs={opt['local_epochs']}: "
                "set one of them (the other 0)"
            )
        if not (opt["local_steps"] or opt["local_epochs"]):
            raise ConfigError(f"{label} needs local_steps > 0 or local_epochs > 0")

    def steps_per_round(self, n_train):
        """local_steps, or local_epochs passes of drop_last batches."""
        b = min(self.ctx.batch_size, n_train)
        return self.opt["local_steps"] or self.opt["local_epochs"] * max(1, n_train // b)


def dp_sgd_methods() -> list[str]:
    from . import METHODS

    return [name for name, cls in METHODS.items() if cls.dp_sgd]


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@dataclass
class ModelFiles:
    """A run's model/ folder as a method rebuilds its predictor from it (fedmedclip.inference)."""

    directory: Any  # pathlib.Path
    meta: dict  # model.json

    @property
    def federation(self) -> str:
        return self.meta.get("federation", "federated")

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        from ..errors import FedMedClipError

        path = self.directory / name
        if not path.is_file():
            raise FedMedClipError(f"model file {str(path)!r} is missing: the run directory is incomplete")
        return load_file(str(path))

    def global_state(self) -> dict[str, torch.Tensor]:
        return self._load("global.safetensors")

    def site(self, site: str) -> dict[str, torch.Tensor] | None:
        """A site's own part (model/site_<name>.safetensors), None when the run has none for it."""
        return (
            self._load(f"site_{site}.safetensors")
            if (self.directory / f"site_{site}.safetensors").is_file()
            else None
        )

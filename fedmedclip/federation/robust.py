"""How the server combines the updates it accepted, and the absolute bound each update must keep.

`mean` is the method's own rule (its weighted average). The robust rules are for small or untrusted
federations, where one site's update can move a mean anywhere: `median` (coordinate-wise, as Flower's
FedMedian), `trimmed-mean` (coordinate-wise, the largest and smallest `trim` share of the values dropped, at
least one of each when three or more updates arrive; Flower's FedTrimmedAvg), `krum` (the single update
closest to its n - f - 2 nearest others, f = the most faulty sites n allows, (n - 3) // 2; Blanchard et al.
2017). Robust rules ignore the sample weights and need three or more updates to differ from the mean; the
absolute bound holds with any number.

Integer entries (counters) keep the server's previous value, as in every method's own rule."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

TRIM_SHARE = 0.2
# The fewest sites a robust rule is declared for: with one or two updates each is the mean (the median of two
# is their mean, krum has no others to compare), so a federation of fewer sites is refused up front
# (`check_robust_sites`, TrainConfig.validate); a round that closes with fewer updates (a quorum below three
# after a timeout) still combines them so.
MIN_ROBUST_SITES = 3
# The absolute bound on an update, when none is given: this many times the norm of the method's initial
# global module. Honest rounds measured on the synthetic set with the tiny backbone move the module by at most
# 0.68x its initial norm (FACMIC's first round; FedMedCLIP 0.005x, FedCLIP 0.006x, FedAvg 0.04x).
DEFAULT_BOUND_FACTOR = 2.0


def check_robust_sites(aggregator: str, sites: int, where: str = "--sites") -> None:
    """ConfigError unless `aggregator` is the mean or the federation's `sites` (as `where` gives them) are enough
    for it to differ from the mean."""
    if aggregator != "mean" and sites < MIN_ROBUST_SITES:
        raise ConfigError(
            f"--aggregator {aggregator} needs {MIN_ROBUST_SITES} or more sites, and {where} gives {sites}: with "
            "fewer it is the mean of their updates; use --aggregator mean (the method's own rule) or more sites"
        )


def float_norm(state: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in state.values() if v.is_floating_point()))


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The L2 norm of a - b over the float entries."""
    return math.sqrt(
        sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a if a[k].is_floating_point())
    )


def default_bound(initial: dict[str, torch.Tensor]) -> float | None:
    """The bound fixed in a run's manifest when the operator gives none; None for a module with nothing to
    bound (no float parameters)."""
    if not any(v.is_floating_point() and v.numel() for v in initial.values()):
        return None
    norm = float_norm(initial)
    if norm == 0:
        raise ConfigError(
            "the method's initial global module is all zeros, so no update bound follows from its scale: "
            "give --max-update-norm"
        )
    return DEFAULT_BOUND_FACTOR * norm


def clip_to(state: dict, reference: dict, bound: float, norm: float) -> dict:
    """`state` moved toward `reference` so that its distance to it is `bound` (norm = the current one)."""
    scale = bound / norm
    return {
        k: (reference[k].double() + scale * (v.double() - reference[k].double())).to(v.dtype)
        if v.is_floating_point()
        else v
        for k, v in state.items()
    }


def robust_aggregate(name: str, previous: dict, states: list[dict]) -> dict:
    """`median`, `trimmed-mean` or `krum` over the float entries of `states`."""
    n = len(states)
    if name == "krum":
        return _krum(previous, states)
    out = {}
    for k, prev in previous.items():
        if not prev.is_floating_point():
            out[k] = prev.clone()
            continue
        stacked = torch.stack([s[k].double() for s in states]).sort(dim=0).values
        if name == "median":
            value = stacked[n // 2] if n % 2 else (stacked[n // 2 - 1] + stacked[n // 2]) / 2
        elif name == "trimmed-mean":
            cut = max(1, int(TRIM_SHARE * n)) if n >= 3 else 0
            value = stacked[cut : n - cut].mean(dim=0)
        else:
            raise ConfigError(f"unknown aggregator {name!r}")
        out[k] = value.to(torch.float32)
    return out


def _krum(previous: dict, states: list[dict]) -> dict:
    n = len(states)
    if n < 3:  # nothing to compare against: the one update, or the mean of two
        return robust_aggregate("median", previous, states)
    near = n - (n - 3) // 2 - 2
    d = [[distance(a, b) ** 2 for b in states] for a in states]
    scores = [sum(sorted(d[i][j] for j in range(n) if j != i)[:near]) for i in range(n)]
    chosen = states[min(range(n), key=lambda i: scores[i])]
    return {k: (v.clone() if not v.is_floating_point() else chosen[k].float()) for k, v in previous.items()}

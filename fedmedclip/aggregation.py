"""Server-side aggregation of decoded module states."""

from __future__ import annotations

import torch

from .errors import ConfigError

WEIGHTINGS = ("samples", "equal")
# How the server combines accepted updates: the method's own weighted mean, or a robust rule
# (fedmedclip/federation/robust.py).
AGGREGATORS = ("mean", "median", "trimmed-mean", "krum")


def aggregation_weights(sample_counts: list[int], rule: str) -> list[float]:
    """`samples`: w_k = n_k / Σn (FACMIC, FedAvg); `equal`: 1/K (FedMedCLIP, FedCLIP)."""
    if rule not in WEIGHTINGS:
        raise ConfigError(f"unknown aggregation weighting {rule!r}; choose one of {', '.join(WEIGHTINGS)}")
    if not sample_counts:
        raise ConfigError("nothing to aggregate: no site updates")
    if rule == "equal":
        return [1.0 / len(sample_counts)] * len(sample_counts)
    total = sum(sample_counts)
    if total <= 0:
        raise ConfigError("sample-size weighting needs at least one site with training samples")
    return [n / total for n in sample_counts]


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Average every float entry; integer counters are taken from the first state."""
    keys = list(states[0])
    for s in states[1:]:
        if list(s) != keys:
            raise ConfigError(f"site updates disagree on their parameters: {sorted(set(keys) ^ set(s))}")
    out = {}
    for k in keys:
        if states[0][k].is_floating_point():
            out[k] = sum(w * s[k].to(torch.float64) for w, s in zip(weights, states, strict=True)).to(
                torch.float32
            )
        else:
            out[k] = states[0][k].clone()
    return out

"""The plain weighted mean that tests hold the server's aggregates to, written apart from the product's own
aggregation (fedmedclip/aggregation.py) so that a fault there cannot hide in the expectation."""

from __future__ import annotations

import torch


def weighted_mean(states: dict[str, dict], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Σ_k w_k·u_k / Σ_k w_k over the given sites' float entries (weights renormalised over them), entry by
    entry, in float64."""
    total = sum(weights[s] for s in states)
    first = next(iter(states.values()))
    return {
        n: sum(weights[s] / total * st[n].double() for s, st in states.items()).float()
        for n, v in first.items()
        if v.is_floating_point()
    }

"""Client-level DP (DP-FedAvg, McMahan et al. 2018; adaptive clipping after Andrew et al. 2021): every site's
update, as its difference to the global module it received, is clipped to norm S; the clipped differences
are averaged with equal weights and Gaussian noise of std z*S is added to their sum. It hides what a whole site's
data contributed (each round's update replaced by no change, sensitivity S), not whether it took part (each
round's participants are public), which needs many sites: with 3-10 hospitals the noise drowns the signal
(docs/privacy.md).

- noise at the server (default): a trusted aggregator. Sites send their updates as usual; the server clips
  each one, adds the noise to the sum, and with `client_quantile` adapts S toward that quantile of the
  update norms, the count of unclipped updates itself noised (std sigma_b) so the adaptation is private too.
- noise at the sites: each site clips its own update to the fixed S and adds N(0, (z S)^2 / quorum), so any
  quorum of sites sums to at least the full noise: for an aggregator that sees only the sum (secure
  aggregation). The server then averages without clipping or noise.

The noise's randomness comes from a key only that party holds (`party_key`), kept in its private state."""

from __future__ import annotations

import logging
import math

import torch

from ..seeding import derive_seed
from .accounting import client_noise_split, gaussian_rounds_epsilon
from .dpsgd import KEY_BYTES, new_key
from .settings import PrivacySettings

log = logging.getLogger("fedmedclip.privacy")

KEY_NAME = "privacy/noise_key"


def party_key(store, name: str = KEY_NAME) -> bytes:
    """This party's secret key `name` (its noise key by default; secure aggregation keeps its per-run secret
    the same way) in its private object store, created from the OS on first use."""
    raw = store.get(name)
    if raw is None or len(raw) != KEY_BYTES:
        if raw is not None:  # damaged (a crash mid-write): a round redone with new noise is caught as changed
            log.warning("%s holds %d bytes, not a key: a new one is made", store.where(name), len(raw))
        raw = bytes(new_key().tolist())
        store.put(name, raw)
    return bytes(raw)


def _float_keys(state: dict) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def difference(update: dict, reference: dict) -> dict:
    return {k: update[k].double() - reference[k].double() for k in _float_keys(update)}


def norm(delta: dict) -> float:
    return math.sqrt(sum(float((v**2).sum()) for v in delta.values()))


def clip(delta: dict, bound: float) -> tuple[dict, float]:
    """`delta` scaled to norm at most `bound`; and its norm before."""
    n = norm(delta)
    scale = min(1.0, bound / (n + 1e-12))
    return {k: v * scale for k, v in delta.items()}, n


def gaussian(like: dict, std: float, key: bytes, *parts) -> dict:
    gen = torch.Generator().manual_seed(derive_seed(key, *parts))
    return {k: torch.normal(0.0, std, v.shape, generator=gen, dtype=torch.float64) for k, v in like.items()}


# How far above its expected norm a site's noise may be before the server takes its update for more than a
# clipped update and its noise: the norm of d independent Gaussians is within a few per cent of std * sqrt(d)
# for the thousands of entries a module has.
NOISE_NORM_MARGIN = 1.5


def site_noise_std(settings: PrivacySettings, quorum: int) -> float:
    """The standard deviation of each site's share of the noise: any quorum of sites sums to z S."""
    return float(settings.client_noise) * float(settings.client_clip) / math.sqrt(max(1, quorum))


def noised_update_bound(settings: PrivacySettings, template: dict) -> float:
    """The norm an honest site's update stays under when the sites add the noise: its clip S plus
    NOISE_NORM_MARGIN times the expected norm of its noise over the module's float entries (`template`: a
    state), at a quorum of one, the largest share (so the bound, which the run's manifest records, does not
    move with a restart's quorum). The server's default bound (twice the initial module's norm) rejected every
    such update, so that placement ran only with noise too small to protect anything."""
    entries = sum(v.numel() for v in template.values() if v.is_floating_point())
    return float(settings.client_clip) + NOISE_NORM_MARGIN * site_noise_std(settings, 1) * math.sqrt(entries)


class SiteClientPrivacy:
    """A site's part when the noise is added at the sites: clip its update, add its share of the noise."""

    def __init__(self, settings: PrivacySettings, quorum: int, key: bytes, site: str):
        self.bound = float(settings.client_clip)
        self.std = site_noise_std(settings, quorum)
        self.key, self.site = key, site

    def apply(self, update: dict, received: dict, round_index: int) -> tuple[dict, dict]:
        clipped, before = clip(difference(update, received), self.bound)
        noise = gaussian(clipped, self.std, self.key, "client-noise", self.site, round_index)
        out = dict(update)
        for k, v in clipped.items():
            out[k] = (received[k].double() + v + noise[k]).to(update[k].dtype)
        return out, {"norm": before, "clipped": before > self.bound}


class ClientPrivacy:
    """The server's part: clipped (server placement) equal-weight mean of the differences, noise, adaptive S."""

    def __init__(self, settings: PrivacySettings, sites: int, quorum: int, key: bytes):
        self.s = settings
        self.sites, self.quorum, self.key = sites, quorum, key
        self.z_update, self.sigma_b = client_noise_split(settings, sites)
        self.bound = float(settings.client_clip)  # S of the next aggregation

    def restore(self, info: dict | None) -> None:
        """S after a restart: what the last closed aggregation left (its `next_clip`)."""
        last = (info or {}).get("client_dp") or {}
        if isinstance(last.get("next_clip"), (int, float)) and math.isfinite(last["next_clip"]):
            self.bound = float(last["next_clip"])

    def aggregate(self, previous: dict, states: list[dict], round_index: int) -> tuple[dict, dict]:
        """The new global state from the present sites' decoded updates, and what the round record keeps."""
        deltas = [difference(s, previous) for s in states]
        bound = self.bound
        at_server = self.s.client_noise_at == "server"
        if at_server:  # each update clipped; its norm before, for adaptive clipping's count
            deltas, norms = zip(*(clip(d, bound) for d in deltas), strict=True)
        total = {k: sum(d[k] for d in deltas) for k in deltas[0]}
        # The norms stay here: the round record is published, and a statistic of single updates without noise
        # (with three sites, the median is one site's norm) is no output of the mechanism.
        new, info = self._noised(previous, total, len(states), round_index, at_server)
        if at_server and self.s.client_quantile is not None:
            unclipped = sum(1 for n in norms if n <= bound)
            gen = torch.Generator().manual_seed(derive_seed(self.key, "client-count", round_index))
            noisy = unclipped + float(torch.normal(0.0, self.sigma_b, (1,), generator=gen))
            self.bound = bound * math.exp(
                -self.s.client_clip_lr * (noisy / len(states) - self.s.client_quantile)
            )
        info["next_clip"] = self.bound
        return new, info

    def aggregate_mean(self, previous: dict, mean: dict, m: int, round_index: int) -> tuple[dict, dict]:
        """Under secure aggregation the server holds only the equal-weight mean of the m present sites'
        updates, each clipped to S by its site before masking (fedmedclip/federation/secure.py): the same
        noise on their sum. No single norm is known, so adaptive clipping is not either."""
        total = {k: v * m for k, v in difference(mean, previous).items()}
        new, info = self._noised(previous, total, m, round_index, at_server=True)
        info["next_clip"] = self.bound
        return new, info

    def _noised(self, previous: dict, total: dict, m: int, round_index: int, at_server: bool):
        """previous + (total + noise) / m, and the record's clip, noise multiplier, sites and epsilon."""
        std = self.z_update * self.bound if at_server else 0.0
        if std:
            noise = gaussian(total, std, self.key, "client-noise", round_index)
            total = {k: v + noise[k] for k, v in total.items()}
        new = {k: v.clone() for k, v in previous.items()}
        for k, v in total.items():
            new[k] = (previous[k].double() + v / m).to(previous[k].dtype)
        info = {
            "clip": self.bound,
            "noise_multiplier": float(self.s.client_noise),
            "sites": m,
            "epsilon": gaussian_rounds_epsilon(
                self.s.client_noise, round_index, self.s.delta, self.s.accountant
            ),
        }
        return new, info


def server_privacy(settings, counts: dict[str, int], quorum: int, store) -> ClientPrivacy | None:
    """At the server's start: delta checked against every site's training-set size (ConfigError naming the
    site), before any training; the client-level DP aggregation when on, else None. `store`: the server's
    private state (its noise key)."""
    from .accounting import check_delta

    if settings is None:
        return None
    if settings.record_level:
        for site, n in counts.items():
            check_delta(settings.delta, n, f"site {site}")
    if not settings.client_level:
        return None
    return ClientPrivacy(settings, len(counts), quorum, party_key(store))


def site_client_privacy(settings, manifest: dict, store, name: str) -> SiteClientPrivacy | None:
    """Client-level DP's part at a site when the sites add the noise, else None. `store`: the site's
    private state (its noise key)."""
    if settings is None or not settings.client_level or settings.client_noise_at != "sites":
        return None
    return SiteClientPrivacy(settings, int(manifest["quorum"]), party_key(store), name)

"""The privacy settings of a run (`TrainConfig.privacy`, set by the `--dp-*` flags), parsed and checked once.

Record level (DP-SGD at each site, docs/privacy.md): on when `target_epsilon` or `noise_multiplier` is set.
- `target_epsilon` alone: each site's noise multiplier is calibrated before any training so that its planned
  steps (rounds x its local steps) end at or below the target; `noise_multiplier` alone: that noise, epsilon
  reported; both: that noise, and `target_epsilon` is a budget a site stops at.
- `delta` (default 1e-5) must not exceed 1/n of the smallest site's training set (checked where n is known).
- `clip` (default 1.0): the per-example gradient norm bound C.
- `accountant`: rdp (default) or pld, both from dp-accounting.

Client level (DP-FedAvg with a clipped update per site and Gaussian noise on the sum, docs/privacy.md): on when
`client_noise` (the noise multiplier z) is set; `client_clip` the update norm bound S (fixed, or the initial
value with `client_quantile`: adaptive clipping toward that quantile of the sites' update norms, Andrew et al.
2021, with `client_clip_lr` and `client_count_noise`); `client_noise_at` server (a trusted aggregator adds
the noise to the sum) or sites (each site adds its share, for an aggregator that sees only the sum).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import ConfigError, shown
from ..flags import declared, is_finite_number, setting

DEFAULT_DELTA = 1e-5
DEFAULT_CLIP = 1.0
# The largest epsilon, noise multiplier or clip a setting may hold, and the largest magnitude of any number in a
# party's message (fedmedclip/federation/messages.py, which reads it from here): a setting above it would make a
# run fail after training (its reports refused), or overflow the accountant (a noise multiplier of 1e300).
LARGEST = 1e30
# The least noise multiplier a setting may hold (the calibration's floor too): below it dp-accounting's figure
# stops meaning anything (epsilon 5.5e300 at 1e-150, then 0.0 for a Poisson-sampled step at 1e-155, then a
# ZeroDivisionError), and above it epsilon is already in the millions per step.
MIN_NOISE_MULTIPLIER = 1e-3
ACCOUNTANTS = ("rdp", "pld")


@dataclass(frozen=True)
class AccountantLimits:
    """What an accountant composes within about a gigabyte and a few seconds: the least noise multiplier of one
    step, the largest target epsilon, and (pld) the most points of its privacy-loss grid, which the planned
    steps at the run's sampling rate and noise fill (fedmedclip.privacy.accounting.check_accountable)."""

    min_noise_multiplier: float
    max_epsilon: float
    max_points: int | None = None  # None: no grid (RDP's cost does not grow with the noise or the steps)


# rdp: a closed form per order, whatever the noise. pld discretises the privacy loss (1e-4 apart), whose range
# grows as 1/sigma^2 and with the steps: measured with dp-accounting 0.6 (one step, no subsampling), sigma 0.2
# takes 0.3 GB and 1.5 s, 0.1 0.7 GB and 3.4 s, 0.05 1.4 GB and 8 s, 0.001 asked for 301 GiB; 4 million points
# (sigma/sqrt(steps) = 0.085 without subsampling, e.g. 1000 steps at sampling rate 0.05 and sigma 0.3) about
# 0.5-0.7 GB and 5 s. A target epsilon of 1e30 made the calibration try ever smaller noise (6 GB and counting).
ACCOUNTANT_LIMITS = {
    "rdp": AccountantLimits(min_noise_multiplier=MIN_NOISE_MULTIPLIER, max_epsilon=LARGEST),
    "pld": AccountantLimits(min_noise_multiplier=0.2, max_epsilon=100.0, max_points=4_000_000),
}
NOISE_PLACEMENTS = ("server", "sites")


@dataclass(frozen=True)
class PrivacySettings:
    target_epsilon: float | None = setting(
        None,
        group="privacy",
        metavar="EPSILON",
        help="record-level DP-SGD at each site: the epsilon each site may spend (per site, at --dp-delta); each "
        "site's noise multiplier is calibrated to it for the planned rounds before any training, and a site stops "
        "before a step that would exceed it",
    )
    noise_multiplier: float | None = setting(
        None,
        group="privacy",
        metavar="SIGMA",
        help="record-level DP-SGD with this noise multiplier sigma (noise std sigma x --dp-clip per step) instead "
        "of a calibrated one; with --dp-target-epsilon that target is then a budget",
    )
    delta: float = setting(
        DEFAULT_DELTA,
        group="privacy",
        metavar="DELTA",
        help="delta of every (epsilon, delta) guarantee (default: 1e-5; must not exceed 1/n of the smallest site)",
    )
    clip: float = setting(
        DEFAULT_CLIP,
        group="privacy",
        metavar="C",
        help="DP-SGD's per-example gradient norm bound C (default: 1.0)",
    )
    accountant: str = setting(
        "rdp",
        group="privacy",
        choices=ACCOUNTANTS,
        help="privacy accountant of dp-accounting: rdp (default) or pld (tighter, much slower)",
    )
    client_noise: float | None = setting(
        None,
        group="privacy",
        metavar="Z",
        help="client-level DP: each site's update is clipped and Gaussian noise of this multiplier z (std z x the "
        "clip) is added to the sum; meant for federations of many sites (docs/privacy.md)",
    )
    client_clip: float = setting(
        DEFAULT_CLIP,
        group="privacy",
        metavar="S",
        help="client-level DP: the update norm bound S (the initial one with --dp-client-quantile) (default: 1.0)",
    )
    client_quantile: float | None = setting(
        None,
        group="privacy",
        metavar="GAMMA",
        help="client-level DP with adaptive clipping (Andrew et al. 2021): the clip follows this quantile of the "
        "sites' update norms, e.g. 0.5",
    )
    client_clip_lr: float = setting(
        0.2,
        group="privacy",
        metavar="ETA",
        help="adaptive clipping's learning rate (geometric update; default: 0.2)",
    )
    client_count_noise: float | None = setting(
        None,
        group="privacy",
        metavar="SIGMA_B",
        help="adaptive clipping: noise std on the count of unclipped updates (default: sites / 20)",
    )
    client_noise_at: str = setting(
        "server",
        group="privacy",
        choices=NOISE_PLACEMENTS,
        help="client-level DP: who adds the noise: server (a trusted aggregator, on the sum; default) or sites "
        "(each its share, for an aggregator that sees only the sum)",
    )

    @property
    def record_level(self) -> bool:
        return self.target_epsilon is not None or self.noise_multiplier is not None

    @property
    def client_level(self) -> bool:
        return self.client_noise is not None

    @property
    def enabled(self) -> bool:
        return self.record_level or self.client_level

    @classmethod
    def from_config(cls, value: dict | None) -> PrivacySettings:
        """Parse `TrainConfig.privacy`; ConfigError names the first bad entry."""
        value = dict(value or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(
                f"unknown privacy setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        for d in declared(cls):
            if value.get(d.name, 0) is None and not d.optional:  # null is unset only where None is
                flag = f"--dp-{d.name.replace('_', '-')}"
                raise ConfigError(
                    f"{flag} has no value (null): give one, or leave it out for its default {d.default!r}"
                )
        s = cls(**{k: v for k, v in value.items() if v is not None})
        s.check()
        return s

    def to_config(self) -> dict:
        """The non-default entries: what `TrainConfig.privacy` stores (empty for a run without DP)."""
        default = PrivacySettings()
        return {k: v for k, v in asdict(self).items() if v != getattr(default, k)}

    def _changed(self, *names: str) -> list[str]:
        """Those of `names` set to something else than their defaults."""
        defaults = PrivacySettings()
        return [k for k in names if getattr(self, k) != getattr(defaults, k)]

    def check(self) -> None:
        def positive(name: str, v, allow_zero: bool = False) -> None:
            if v is None:
                return
            if not is_finite_number(v) or v < 0 or (v == 0 and not allow_zero):
                raise ConfigError(f"--dp-{name.replace('_', '-')} must be a positive number, got {shown(v)}")
            if v > LARGEST:
                raise ConfigError(
                    f"--dp-{name.replace('_', '-')} must be at most {LARGEST:g}, got {shown(v)}"
                )

        for name in ("accountant", "client_noise_at"):
            if not isinstance(getattr(self, name), str):  # unhashable or a number: named, before any lookup
                raise ConfigError(
                    f"--dp-{name.replace('_', '-')} must be a name, got {shown(getattr(self, name))}"
                )

        for name in ("target_epsilon", "noise_multiplier", "clip", "client_noise", "client_clip"):
            positive(name, getattr(self, name))
        for name in ("noise_multiplier", "client_noise"):
            value = getattr(self, name)
            if value is not None and value < MIN_NOISE_MULTIPLIER:
                raise ConfigError(
                    f"--dp-{name.replace('_', '-')} must be at least {MIN_NOISE_MULTIPLIER:g}, got {value!r}: with "
                    "less noise the accountant's epsilon means nothing (at 1e-155 it even reports 0)"
                )
        positive("client_clip_lr", self.client_clip_lr)
        positive("client_count_noise", self.client_count_noise, allow_zero=True)
        positive("delta", self.delta)
        if not self.delta < 1:
            raise ConfigError(f"--dp-delta must be below 1, got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"--dp-accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}"
            )
        self._check_accountant_limits()
        if self.client_noise_at not in NOISE_PLACEMENTS:
            raise ConfigError(
                f"--dp-client-noise-at must be one of {', '.join(NOISE_PLACEMENTS)}, got {self.client_noise_at!r}"
            )
        if self.client_quantile is not None and not (
            isinstance(self.client_quantile, (int, float)) and 0 < self.client_quantile < 1
        ):
            raise ConfigError(f"--dp-client-quantile must be in (0, 1), got {self.client_quantile!r}")
        if self.client_quantile is not None and self.client_noise_at == "sites":
            raise ConfigError(
                "adaptive clipping (--dp-client-quantile) needs the count of unclipped updates aggregated with "
                "its own noise at the server: use it with --dp-client-noise-at server"
            )
        if not self.client_level:
            changed = self._changed(
                "client_quantile", "client_count_noise", "client_clip", "client_clip_lr", "client_noise_at"
            )
            if changed:
                raise ConfigError(
                    f"--dp-{changed[0].replace('_', '-')} needs client-level DP: set --dp-client-noise too"
                )
        elif self.client_quantile is None:
            # A fixed clip has neither a learning rate nor a clipped-count: these would be silently ignored.
            changed = self._changed("client_count_noise", "client_clip_lr")
            if changed:
                raise ConfigError(
                    f"--dp-{changed[0].replace('_', '-')} is adaptive clipping's: set --dp-client-quantile too "
                    "(a fixed --dp-client-clip has no learning rate and counts no unclipped updates)"
                )
        if not self.record_level:
            changed = self._changed("clip", "accountant")
            if changed:
                raise ConfigError(
                    f"--dp-{changed[0]} needs record-level DP: set --dp-target-epsilon or --dp-noise-multiplier"
                )
        if self.delta != DEFAULT_DELTA and not self.enabled:
            raise ConfigError(
                "--dp-delta needs DP: set --dp-target-epsilon, --dp-noise-multiplier or --dp-client-noise"
            )

    def _check_accountant_limits(self) -> None:
        """The accountant's declared limits (ACCOUNTANT_LIMITS): what it cannot compose within about a gigabyte
        and a few seconds is refused here, naming it, not by a MemoryError after the data is read."""
        limits = ACCOUNTANT_LIMITS[self.accountant]
        other = (
            "" if self.accountant == "rdp" else " (or use --dp-accountant rdp, which composes any of them)"
        )
        for name in ("noise_multiplier", "client_noise"):
            value = getattr(self, name)
            if value is not None and value < limits.min_noise_multiplier:
                raise ConfigError(
                    f"--dp-{name.replace('_', '-')} {value:g} is below {limits.min_noise_multiplier:g}, the least "
                    f"noise the {self.accountant} accountant composes{other}"
                )
        if self.target_epsilon is not None and self.target_epsilon > limits.max_epsilon:
            raise ConfigError(
                f"--dp-target-epsilon {self.target_epsilon:g} is above {limits.max_epsilon:g}, the most the "
                f"{self.accountant} accountant calibrates to{other}"
            )

    def describe(self) -> str:
        parts = []
        if self.record_level:
            parts.append(
                "DP-SGD at each site ("
                + (f"target epsilon {self.target_epsilon:g}, " if self.target_epsilon is not None else "")
                + (
                    f"noise multiplier {self.noise_multiplier:g}, "
                    if self.noise_multiplier is not None
                    else ""
                )
                + f"clip {self.clip:g}, delta {self.delta:g}, {self.accountant})"
            )
        if self.client_level:
            clip = (
                f"adaptive clip from {self.client_clip:g} toward quantile {self.client_quantile:g}"
                if self.client_quantile is not None
                else f"clip {self.client_clip:g}"
            )
            parts.append(
                f"client-level DP (noise multiplier {self.client_noise:g}, {clip}, noise at the {self.client_noise_at})"
            )
        return "; ".join(parts) or "no differential privacy"

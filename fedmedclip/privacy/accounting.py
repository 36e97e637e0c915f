"""Privacy accounting, every figure from dp-accounting (RDP or PLD accountants and its calibration helper):
no formula of our own.

Record level: a site's DP-SGD is `steps` compositions of the Poisson-subsampled Gaussian mechanism with
sampling rate q = batch / n_train and noise multiplier sigma. Client level: one Gaussian mechanism per round
(every site takes part in every round, so no subsampling amplification is claimed)."""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass

from ..errors import ConfigError
from .settings import MIN_NOISE_MULTIPLIER, PrivacySettings

# Calibration searches sigma in [MIN_SIGMA, MAX_SIGMA]: a target that needs more noise than this is refused.
MIN_SIGMA, MAX_SIGMA = MIN_NOISE_MULTIPLIER, 1e4


def _accountant(kind: str):
    from dp_accounting import pld, rdp

    # dp-accounting logs (through absl) every fractional RDP order it drops as not converging; the figure it
    # returns already excludes them, so that is not news to our users.
    logging.getLogger("absl").setLevel(logging.ERROR)

    if kind == "rdp":
        return rdp.RdpAccountant()
    if kind == "pld":
        return pld.PLDAccountant()
    raise ConfigError(f"unknown accountant {kind!r}")


def _dpsgd_event(sample_rate: float, sigma: float, steps: int):
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(sigma)
    one = gaussian if sample_rate >= 1 else dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(one, int(steps))


@functools.lru_cache(maxsize=4096)
def dpsgd_epsilon(
    sample_rate: float, sigma: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """epsilon after `steps` DP-SGD steps at (sample_rate, sigma), for `delta`."""
    if steps <= 0:
        return 0.0
    return float(_accountant(accountant).compose(_dpsgd_event(sample_rate, sigma, steps)).get_epsilon(delta))


def gaussian_rounds_epsilon(sigma: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """epsilon of `rounds` Gaussian mechanisms of noise multiplier sigma (client-level DP, no sampling)."""
    return dpsgd_epsilon(1.0, sigma, rounds, delta, accountant)


@functools.lru_cache(maxsize=256)
def calibrate_sigma(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier whose `steps` steps end at or below `target_epsilon` (dp-accounting's
    `calibrate_dp_mechanism`, which guarantees epsilon <= target)."""
    import dp_accounting

    if steps <= 0:
        return MIN_SIGMA
    if dpsgd_epsilon(sample_rate, MAX_SIGMA, steps, delta, accountant) > target_epsilon:
        raise ConfigError(
            f"epsilon {target_epsilon:g} at delta {delta:g} cannot be reached in {steps} steps at sampling rate "
            f"{sample_rate:.4g} with any noise multiplier up to {MAX_SIGMA:g}: raise --dp-target-epsilon, or train "
            "fewer rounds or local steps"
        )
    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant),
        lambda s: _dpsgd_event(sample_rate, s, steps),
        target_epsilon,
        delta,
        tol=1e-4,
    )
    return max(float(sigma), MIN_SIGMA)


@functools.lru_cache(maxsize=256)
def max_steps(
    target_epsilon: float, delta: float, sample_rate: float, sigma: float, limit: int, accountant: str = "rdp"
) -> int:
    """The most steps (at most `limit`) at (sample_rate, sigma) that keep epsilon at or below `target_epsilon`
    (dp-accounting's calibration over the number of steps)."""
    import dp_accounting

    if dpsgd_epsilon(sample_rate, sigma, 1, delta, accountant) > target_epsilon:
        return 0
    if dpsgd_epsilon(sample_rate, sigma, limit, delta, accountant) <= target_epsilon:
        return limit
    return int(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(accountant),
            lambda t: _dpsgd_event(sample_rate, sigma, t),
            target_epsilon,
            delta,
            dp_accounting.ExplicitBracketInterval(1, limit),
            discrete=True,
        )
    )


@dataclass(frozen=True)
class SitePlan:
    """One site's DP-SGD plan, fixed before any training from its own training-set size."""

    n_train: int
    batch_size: int  # expected Poisson batch
    sample_rate: float
    noise_multiplier: float
    clip: float
    delta: float
    accountant: str
    steps_per_round: int
    planned_steps: int
    planned_epsilon: float
    budget: float | None  # the target epsilon, if any: no step that would exceed it is taken
    budget_steps: int | None  # the most steps within the budget (at most the planned steps)

    def epsilon(self, steps: int) -> float:
        return dpsgd_epsilon(self.sample_rate, self.noise_multiplier, steps, self.delta, self.accountant)

    def to_json(self) -> dict:
        return asdict(self)


def check_delta(delta: float, n_train: int, who: str) -> None:
    if n_train < 1:
        raise ConfigError(f"{who} has no training examples: nothing to train with DP-SGD")
    if delta > 1.0 / n_train:
        raise ConfigError(
            f"--dp-delta {delta:g} is above 1/n = {1.0 / n_train:.3g} for {who} ({n_train} training examples): "
            "delta must not exceed 1/n of the smallest site (a larger delta allows releasing an example outright)"
        )


def sample_rate(batch_size: int, n_train: int) -> float:
    """A site's Poisson sampling rate: its expected batch over its training-set size (the server checks a site's
    ledger against it)."""
    return min(1.0, batch_size / n_train)


def plan_site(
    settings: PrivacySettings,
    n_train: int,
    batch_size: int,
    steps_per_round: int,
    rounds: int,
    who: str = "a site",
) -> SitePlan:
    """The noise multiplier and step budget of a site, before any training. ConfigError when delta is above
    1/n or the target cannot be met."""
    check_delta(settings.delta, n_train, who)
    q = sample_rate(batch_size, n_train)
    planned = steps_per_round * rounds
    acct = settings.accountant
    if settings.noise_multiplier is not None:
        sigma = float(settings.noise_multiplier)
    else:
        sigma = calibrate_sigma(settings.target_epsilon, settings.delta, q, planned, acct)
    budget_steps = None
    if settings.target_epsilon is not None:
        budget_steps = max_steps(settings.target_epsilon, settings.delta, q, sigma, planned, acct)
    return SitePlan(
        n_train=int(n_train),
        batch_size=int(min(batch_size, n_train)),
        sample_rate=q,
        noise_multiplier=sigma,
        clip=float(settings.clip),
        delta=float(settings.delta),
        accountant=acct,
        steps_per_round=int(steps_per_round),
        planned_steps=int(planned),
        planned_epsilon=dpsgd_epsilon(
            q, sigma, planned if budget_steps is None else budget_steps, settings.delta, acct
        ),
        budget=settings.target_epsilon,
        budget_steps=budget_steps,
    )


def client_noise_split(settings: PrivacySettings, sites: int) -> tuple[float, float]:
    """(noise multiplier of the update sum, std of the noise on the clipped-count) for client-level DP. With
    adaptive clipping the count is a second Gaussian mechanism; both compose to one of multiplier z (Andrew
    et al. 2021, Thm 1): z_update = (z^-2 - sigma_b^-2)^-1/2. The paper's 2 sigma_b takes the count's
    sensitivity as 1/2 (indicators centred at 1/2, one site added or removed with the number of sites hidden);
    here each round's sites are public and a site's update replaced by no change counts as unclipped, so one
    site moves the count by up to 1."""
    z = float(settings.client_noise)
    if settings.client_quantile is None:
        return z, 0.0
    sigma_b = settings.client_count_noise if settings.client_count_noise is not None else sites / 20.0
    if sigma_b <= 0:
        raise ConfigError("--dp-client-count-noise must be positive with adaptive clipping")
    if not sigma_b > z:
        raise ConfigError(
            f"adaptive clipping spends part of the noise on the clipped-count: --dp-client-noise {z:g} must be "
            f"below the count noise {sigma_b:g} (--dp-client-count-noise)"
        )
    return (z**-2 - sigma_b**-2) ** -0.5, float(sigma_b)

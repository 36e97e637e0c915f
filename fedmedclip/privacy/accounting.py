"""Privacy accounting, every figure from dp-accounting (RDP or PLD accountants and its calibration helper):
no formula of our own.

Record level: a site's DP-SGD is `steps` compositions of the Poisson-subsampled Gaussian mechanism with
sampling rate q = batch / n_train and noise multiplier sigma. Client level: one Gaussian mechanism per round
(every site takes part in every round, so no subsampling amplification is claimed)."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass

from ..errors import ConfigError
from .settings import ACCOUNTANT_LIMITS, MIN_NOISE_MULTIPLIER, PrivacySettings

# Calibration searches sigma in [MIN_SIGMA, MAX_SIGMA] (pld from its own least noise, ACCOUNTANT_LIMITS): a target
# that needs more noise than this is refused.
MIN_SIGMA, MAX_SIGMA = MIN_NOISE_MULTIPLIER, 1e4
# The spacing of the privacy losses pld composes on (dp-accounting's PLDAccountant default).
PLD_INTERVAL = 1e-4
# pld's calibration searches no lower than this share of RDP's noise: measured, pld's is 0.89-0.95 of it (and
# its cost grows as the noise falls). Should a target be met below it, this noise is used (epsilon below the
# target).
PLD_BELOW_RDP = 0.7


class AccountantLimitError(ConfigError, ValueError):
    """A composition beyond the accountant's declared limits (ACCOUNTANT_LIMITS): one line (exit 2) before any
    training where a plan is made; where a figure is only reported (privacy.report.plan_bound), a ValueError like
    any other composition that has no figure."""


def _pld_grid(sample_rate: float, sigma: float) -> int:
    """The points of pld's grid for one step at (sample_rate, sigma): the range of the privacy loss that
    dp-accounting keeps (its own tail bounds, computed without building the grid) over PLD_INTERVAL."""
    from dp_accounting.pld import privacy_loss_mechanism

    loss = privacy_loss_mechanism.GaussianPrivacyLoss(sigma, sampling_prob=min(1.0, sample_rate))
    tail = loss.privacy_loss_tail()
    span = loss.privacy_loss(tail.lower_x_truncation) - loss.privacy_loss(tail.upper_x_truncation)
    return int(span / PLD_INTERVAL) + 1


@functools.lru_cache(maxsize=2)
def _pld_step_probabilities(sample_rate: float, sigma: float) -> tuple:
    """The grids of one subsampled step, as dp-accounting builds them (what a composition convolves)."""
    from dp_accounting.pld import privacy_loss_distribution

    pld = privacy_loss_distribution.from_gaussian_mechanism(
        sigma, sampling_prob=sample_rate, value_discretization_interval=PLD_INTERVAL
    )
    return tuple(pmf.to_dense_pmf()._probs for pmf in (pld._pmf_remove, pld._pmf_add))  # noqa: SLF001


@functools.lru_cache(maxsize=256)
def pld_points(sample_rate: float, sigma: float, steps: int) -> int:
    """The points of pld's grid for `steps` steps at (sample_rate, sigma), what its memory and time follow
    (about 100-170 bytes and 1 us each). Without subsampling dp-accounting composes the steps as one Gaussian of
    sigma / sqrt(steps); with it, it convolves one step's grid with itself, truncated where its Chernoff bound
    allows (computed here as it does, on that grid)."""
    steps = max(1, int(steps))
    if sample_rate >= 1:
        return _pld_grid(1.0, sigma / math.sqrt(steps))
    one = _pld_grid(sample_rate, sigma)
    limit = ACCOUNTANT_LIMITS["pld"].max_points
    if one * steps <= limit or one > limit:  # the untruncated composition fits, or not even one step does
        return one * steps
    from dp_accounting.pld import common

    try:
        grids = _pld_step_probabilities(sample_rate, sigma)
    except AttributeError:  # another dp-accounting's insides: the untruncated composition bounds it
        return one * steps
    widths = []
    for probs in grids:
        low, high = common.compute_self_convolve_bounds(probs, steps, 1e-15)
        widths.append(max(high - low + 1, len(probs)))
    return max(widths)


def check_accountable(accountant: str, sample_rate: float, sigma: float, steps: int, what: str = "") -> None:
    """AccountantLimitError where `accountant` cannot compose `steps` steps at (sample_rate, sigma) within its
    declared limits (privacy.settings.ACCOUNTANT_LIMITS; rdp has none that grows), naming it and the way out."""
    limits = ACCOUNTANT_LIMITS.get(accountant)
    if limits is None or limits.max_points is None or steps <= 0:
        return
    if sigma < limits.min_noise_multiplier:
        points = math.inf
    else:
        points = pld_points(sample_rate, sigma, steps)
    if points > limits.max_points:
        subject = f"{what} {sigma:g}" if what else f"noise multiplier {sigma:g}"
        raise AccountantLimitError(
            f"the {accountant} accountant cannot compose {steps:,} steps at {subject} and sampling rate "
            f"{sample_rate:.4g} within its limits (a privacy-loss grid of "
            + (
                f"{points:,} points, over {limits.max_points:,}"
                if math.isfinite(points)
                else "no bounded size"
            )
            + "): use --dp-accountant rdp, or more noise, or fewer rounds or local steps"
        )


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
    check_accountable(accountant, sample_rate, sigma, steps)  # pld: before it allocates what it cannot
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
    bracket = None
    if accountant == "pld":
        low, high = _pld_bracket(target_epsilon, delta, sample_rate, steps)
        if low >= high or dpsgd_epsilon(sample_rate, low, steps, delta, accountant) <= target_epsilon:
            return high if low >= high else low
        bracket = dp_accounting.ExplicitBracketInterval(low, high)
    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant),
        lambda s: _dpsgd_event(sample_rate, s, steps),
        target_epsilon,
        delta,
        bracket,
        tol=1e-4,
    )
    return max(float(sigma), MIN_SIGMA)


def _pld_bracket(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> tuple[float, float]:
    """Where pld's calibration searches: from the least noise it composes within its limits (its declared least
    noise multiplier, or PLD_BELOW_RDP of RDP's, raised toward `high` until the steps fit its grid) to RDP's
    calibration, whose epsilon is above pld's (more noise than pld needs; MAX_SIGMA where pld's figure is not
    below it). An unbounded search tried ever smaller noise (a target of 1e30: 6 GB and counting)."""
    least = ACCOUNTANT_LIMITS["pld"].min_noise_multiplier
    high = calibrate_sigma(target_epsilon, delta, sample_rate, steps, "rdp")
    if high <= least:  # the target allows less noise than pld composes: its least (epsilon below the target)
        return least, least
    if dpsgd_epsilon(sample_rate, high, steps, delta, "pld") > target_epsilon:
        high = MAX_SIGMA
    limit = ACCOUNTANT_LIMITS["pld"].max_points
    start = max(least, PLD_BELOW_RDP * high)
    for k in range(9):  # geometrically from there to `high`
        low = start * (high / start) ** (k / 8)
        if pld_points(sample_rate, low, steps) <= limit:
            return low, high
    return high, high  # fits only at `high` (checked when it is composed)


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

"""What the server watches in its answers (README, the OOD score): the share of the last `ood_window` images
flagged out_of_distribution, and drift: MMD^2 (Gaussian kernel, unbiased estimate with a zero diagonal)
between the last `drift_window` embeddings and the exported reference sample, with a permutation p-value
and threshold (Gretton et al. 2012, as alibi-detect's MMDDrift computes it; bench/bench_ood.py compares
the two)."""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from fedmedclip.onnx_contract import OodContract

from . import metrics
from .options import MonitorOptions

log = logging.getLogger("fedmedclip.serving")


def mmd2_permutation_test(
    reference: np.ndarray, window: np.ndarray, sigma: float, permutations: int, level: float, seed: int = 0
) -> tuple[float, float, float]:
    """(MMD^2, p-value, MMD^2 threshold at `level`) between two samples, from one Gaussian kernel matrix over
    their union with a zero diagonal; the p-value is the share of `permutations` random splits of the union
    whose MMD^2 is at least the observed one."""
    pooled = np.concatenate([reference, window]).astype(np.float64)
    sq = (pooled * pooled).sum(1)
    k = np.exp(-np.maximum(sq[:, None] + sq[None, :] - 2.0 * pooled @ pooled.T, 0.0) / (2.0 * sigma * sigma))
    np.fill_diagonal(k, 0.0)
    n, m = len(reference), len(window)

    def mmd2(order: np.ndarray) -> float:
        kk = k[np.ix_(order, order)]
        xx, yy, xy = kk[:n, :n], kk[n:, n:], kk[n:, :n]
        return xx.sum() / (n * (n - 1)) + yy.sum() / (m * (m - 1)) - 2.0 * xy.mean()

    observed = mmd2(np.arange(n + m))
    rng = np.random.default_rng(seed)
    null = np.array([mmd2(rng.permutation(n + m)) for _ in range(permutations)])
    threshold = float(np.sort(null)[::-1][min(int(level * permutations), permutations - 1)])
    return float(observed), float((observed <= null).mean()), threshold


class OutputMonitor:
    """The OOD window and the drift test of one model exported with its OOD score; the test runs on a thread
    of its own at most every `drift_every` new images, never on the event loop."""

    def __init__(self, model: str, ood: OodContract, options: MonitorOptions):
        self.model, self.ood, self.options = model, ood, options
        self._flags: deque[bool] = deque(maxlen=options.ood_window)
        self._recent: deque[np.ndarray] = deque(maxlen=options.drift_window)
        # Counts: flagged images in the window, images since the last drift test started, tests started.
        self._flagged = self._since = self._tests = 0
        self._drift: Future | None = None  # the drift test running or last run
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="drift")
        drift = (metrics.DRIFT_MMD2, metrics.DRIFT_P_VALUE, metrics.DRIFT_THRESHOLD)
        self._gauges = [gauge.labels(model) for gauge in drift]
        for gauge in (*self._gauges, metrics.OOD_WINDOW_RATE.labels(model)):
            gauge.set(float("nan"))
        metrics.OOD_FALSE_ALARM_RATE.labels(model).set(ood.false_alarm_rate)

    def observe(self, flags: np.ndarray, embeddings: np.ndarray) -> None:
        """One answer's out_of_distribution flags and embeddings. Only called on the event loop: no lock."""
        flagged = int(flags.sum())
        metrics.OOD_IMAGES.labels(self.model).inc(flagged)
        for flag in flags.tolist():  # a running count: the window may be long, the request is not
            if len(self._flags) == self._flags.maxlen:
                self._flagged -= self._flags[0]
            self._flags.append(flag)
        self._flagged += flagged
        if len(self._flags) == self._flags.maxlen:
            metrics.OOD_WINDOW_RATE.labels(self.model).set(self._flagged / len(self._flags))
        self._recent.extend(np.asarray(embeddings, np.float64))
        self._since += len(embeddings)
        idle = self._drift is None or self._drift.done()
        if idle and len(self._recent) == self._recent.maxlen and self._since >= self.options.drift_every:
            self._since, self._tests = 0, self._tests + 1
            self._drift = self._executor.submit(self._drift_test, np.stack(self._recent), self._tests)

    def _drift_test(self, sample: np.ndarray, seed: int) -> None:
        o = self.options
        try:
            result = mmd2_permutation_test(
                self.ood.reference, sample, self.ood.sigma, o.drift_permutations, o.drift_p_value, seed
            )
            for gauge, value in zip(self._gauges, result, strict=True):
                gauge.set(value)
            metrics.DRIFT_TESTS.labels(self.model).inc()
        except Exception:  # a failed test must not stop the server; the gauges keep their last value
            log.exception("drift test of model %r failed", self.model)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

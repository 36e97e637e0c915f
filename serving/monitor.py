"""What the server watches in the answers it gives: the share of images flagged out of distribution, and
whether the recent requests' features have drifted from the exporting party's data.

- `OodWindow`: the flags of the last `window` images; their mean is `fedmedclip_ood_window_rate`, next to the
  false-alarm rate the threshold was calibrated to (`fedmedclip_ood_false_alarm_rate`): in distribution the
  two agree, a rate several times the calibrated one means the server is being sent other scans.
- `DriftTest`: maximum mean discrepancy (MMD^2, Gaussian kernel, unbiased estimate with a zero diagonal)
  between the embeddings of the last `window` images and the exported reference sample, with a permutation
  p-value and the permutation threshold at level `p_value` (the test of Gretton et al. 2012, as alibi-detect's
  MMDDrift computes it; bench/bench_ood.py compares the two). It runs on a thread of its own at most every
  `every` new images, never on the event loop.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import metrics
from .options import MonitorOptions

log = logging.getLogger("fedmedclip.serving")


class OodWindow:
    def __init__(self, model: str, window: int, false_alarm_rate: float):
        self._flags: deque[bool] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._counter, self._rate = metrics.OOD_IMAGES.labels(model), metrics.OOD_WINDOW_RATE.labels(model)
        self._rate.set(float("nan"))
        metrics.OOD_FALSE_ALARM_RATE.labels(model).set(false_alarm_rate)

    def observe(self, flags: np.ndarray) -> None:
        with self._lock:
            self._flags.extend(flags.tolist())
            if len(self._flags) == self._flags.maxlen:
                self._rate.set(sum(self._flags) / len(self._flags))
        self._counter.inc(int(flags.sum()))


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


class DriftTest:
    def __init__(self, model: str, reference: np.ndarray, sigma: float, options: MonitorOptions):
        self.model, self.reference, self.sigma, self.options = (
            model,
            np.asarray(reference, np.float64),
            sigma,
            options,
        )
        self._recent: deque[np.ndarray] = deque(maxlen=options.drift_window)
        self._since = self._tests = 0  # images since the last test started; tests started
        self._lock = threading.Lock()
        self._running = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="drift")
        self._gauges = [
            g.labels(model) for g in (metrics.DRIFT_MMD2, metrics.DRIFT_P_VALUE, metrics.DRIFT_THRESHOLD)
        ]
        for gauge in self._gauges:
            gauge.set(float("nan"))

    def observe(self, embeddings: np.ndarray) -> None:
        with self._lock:
            self._recent.extend(np.asarray(embeddings, np.float64))
            self._since += len(embeddings)
            full = len(self._recent) == self._recent.maxlen
            if not full or self._since < self.options.drift_every or self._running:
                return
            self._running, self._since, self._tests = True, 0, self._tests + 1
            sample, seed = np.stack(self._recent), self._tests
        self._executor.submit(self._test, sample, seed)

    def _test(self, sample: np.ndarray, seed: int) -> None:
        o = self.options
        try:
            result = mmd2_permutation_test(
                self.reference, sample, self.sigma, o.drift_permutations, o.drift_p_value, seed
            )
            for gauge, value in zip(self._gauges, result, strict=True):
                gauge.set(value)
            metrics.DRIFT_TESTS.labels(self.model).inc()
        except Exception:  # a failed test must not stop the server; the gauges keep their last value
            log.exception("drift test of model %r failed", self.model)
        finally:
            with self._lock:
                self._running = False

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

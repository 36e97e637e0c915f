"""Metrics against sklearn's definitions, worked out by hand on small cases (algorithms.md §6)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmedclip.metrics import (
    accuracy,
    balanced_accuracy,
    classification_report,
    expected_calibration_error,
    expected_calibration_error_reference,
    macro_f1,
    reliability_bins,
)

# y_true has classes 0, 1, 2; class 3 is only ever predicted.
Y_TRUE = [0, 0, 1, 1, 2, 2, 2]
Y_PRED = [0, 1, 1, 1, 2, 0, 3]


def test_accuracy_by_hand():
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 7)
    assert accuracy([1, 1], [1, 1]) == 1.0
    assert math.isnan(accuracy([], []))


def test_balanced_accuracy_by_hand():
    # recalls: class 0 1/2, class 1 2/2, class 2 1/3; the predicted-only class 3 has no recall.
    assert balanced_accuracy(Y_TRUE, Y_PRED) == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)
    # imbalance: always predicting the majority class gives acc 0.8 but bacc 0.5
    assert accuracy([0, 0, 0, 0, 1], [0] * 5) == pytest.approx(0.8)
    assert balanced_accuracy([0, 0, 0, 0, 1], [0] * 5) == pytest.approx(0.5)


def test_macro_f1_by_hand_including_a_class_only_predicted():
    # per class F1 = 2TP / (#pred + #true):
    #   0: TP 1, pred 2, true 2 -> 0.5;   1: TP 2, pred 3, true 2 -> 0.8
    #   2: TP 1, pred 1, true 3 -> 0.5;   3: TP 0, pred 1, true 0 -> 0   (counts in the average)
    assert macro_f1(Y_TRUE, Y_PRED) == pytest.approx((0.5 + 0.8 + 0.5 + 0.0) / 4)
    # a class never predicted: its F1 is 0 and it counts too
    #   0: TP 2, pred 3, true 2 -> 0.8;   1: TP 1, pred 1, true 1 -> 1.0;  2: TP 0, pred 0, true 1 -> 0
    assert macro_f1([0, 0, 1, 2], [0, 0, 1, 0]) == pytest.approx((0.8 + 1.0 + 0.0) / 3)
    assert macro_f1([2, 2], [2, 2]) == 1.0


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_against_sklearn_when_available():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        y, p = rng.integers(0, 5, 40), rng.integers(0, 6, 40)
        assert balanced_accuracy(y, p) == pytest.approx(sk.balanced_accuracy_score(y, p))
        assert macro_f1(y, p) == pytest.approx(sk.f1_score(y, p, average="macro", zero_division=0))


def test_ece_by_hand():
    probs = [
        [0.95, 0.05],  # conf 0.95 bin (0.9,1], correct
        [0.08, 0.92],  # conf 0.92 bin (0.9,1], label 0: wrong
        [0.32, 0.68],  # conf 0.68 bin (0.6,0.7], correct
        [0.65, 0.35],  # conf 0.65 bin (0.6,0.7], label 1: wrong
        [0.58, 0.42],  # conf 0.58 bin (0.5,0.6], correct
    ]
    y = [0, 0, 1, 1, 0]
    # |0.935 - 1/2| * 2/5 + |0.665 - 1/2| * 2/5 + |0.58 - 1| * 1/5
    want = 0.435 * 0.4 + 0.165 * 0.4 + 0.42 * 0.2
    assert expected_calibration_error(probs, y) == pytest.approx(want)
    bins = reliability_bins(probs, y)
    assert bins["count"] == [0, 0, 0, 0, 0, 1, 2, 0, 0, 2]
    assert bins["confidence"][9] == pytest.approx(0.935)
    assert bins["accuracy"][9] == pytest.approx(0.5)
    assert len(bins["edges"]) == 11


def test_ece_bin_edges_are_right_closed():
    # A confidence exactly on an edge belongs to the bin it closes: (0.6, 0.7] and (0.5, 0.6];
    # 1.0 to the last bin; a perfectly calibrated set has ECE 0.
    e = np.linspace(0, 1, 11)
    probs = [[e[7], 1 - e[7]], [1 - e[7], e[7]], [e[6], 1 - e[6]], [1.0, 0.0]]
    bins = reliability_bins(probs, [0, 0, 0, 0])
    assert bins["count"] == [0, 0, 0, 0, 0, 1, 2, 0, 0, 1]
    assert bins["accuracy"][6] == pytest.approx(0.5) and bins["accuracy"][9] == 1.0
    assert expected_calibration_error([[1.0, 0.0], [0.0, 1.0]], [0, 1]) == pytest.approx(0.0)


def _ref_ece(probs, y, n_bins=10):
    n = len(y)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = []
        for p, t in zip(probs, y, strict=True):
            c = max(p)
            if (lo < c <= hi) or (b == 0 and c == lo):
                members.append((c, int(p.index(c)) == t))
        if members:
            conf = sum(c for c, _ in members) / len(members)
            acc = sum(ok for _, ok in members) / len(members)
            total += len(members) / n * abs(conf - acc)
    return total


def test_ece_random_against_loop_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 4, 200)
    assert expected_calibration_error(probs, y) == pytest.approx(_ref_ece(probs.tolist(), y.tolist()))


def test_classification_report_keys():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    rep = classification_report(probs, [0, 1, 1])
    assert set(rep) == {"acc", "bacc", "f1", "ece", "ece_reference", "n", "confusion"}
    assert rep["acc"] == pytest.approx(2 / 3) and rep["n"] == 3
    assert rep["bacc"] == pytest.approx(0.75)
    assert rep["ece_reference"] == pytest.approx(expected_calibration_error_reference(probs, [0, 1, 1]))


# ----------------------------------------------------------------------------- the reference code's ECE


def test_ece_reference_counts_a_saturated_confidence_only_in_the_bin_size():
    probs = [
        [1.0, 0.0],  # conf exactly 1.0, correct: in the last bin's count, not in its accuracy or confidence
        [0.95, 0.05],  # conf 0.95, label 1: wrong
        [0.65, 0.35],  # conf 0.65, correct
    ]
    y = [0, 1, 0]
    # ours: bin (0.9, 1]: conf (1 + 0.95)/2, acc 1/2, 2 of 3; bin (0.6, 0.7]: |0.65 - 1|, 1 of 3
    assert expected_calibration_error(probs, y) == pytest.approx(abs(0.975 - 0.5) * 2 / 3 + 0.35 / 3)
    # reference: the last bin counts 2 of 3, but its conf and acc come from 0.95 alone (wrong): |0.95 - 0|
    assert expected_calibration_error_reference(probs, y) == pytest.approx(0.95 * 2 / 3 + 0.35 / 3)
    # a bin holding only saturated confidences adds nothing, even with a wrong prediction in it
    assert expected_calibration_error_reference([[1.0, 0.0], [0.0, 1.0]], [1, 1]) == 0.0
    assert expected_calibration_error([[1.0, 0.0], [0.0, 1.0]], [1, 1]) == pytest.approx(0.5)
    assert math.isnan(expected_calibration_error_reference(np.zeros((0, 2)), []))


def _ref_ece_reference(probs, y, n_bins=10):
    """The quirk spelled out: n_b over [lo, hi) bins with the last closed; conf_b and acc_b over [lo, hi)."""
    n = len(y)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        confs = [max(p) for p in probs]
        count = sum(1 for c in confs if lo <= c < hi or (b == n_bins - 1 and c == 1.0))
        members = [
            (max(p), int(p.index(max(p))) == t) for p, t in zip(probs, y, strict=True) if lo <= max(p) < hi
        ]
        if count and members:
            conf = sum(c for c, _ in members) / len(members)
            acc = sum(ok for _, ok in members) / len(members)
            total += count / n * abs(conf - acc)
    return total


def test_ece_reference_random_with_saturated_rows_against_loop_reference():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(300, 4)).astype(np.float32) * 2
    logits[:60] *= 100  # like the 100-scaled cosine logits: float32 softmax saturates to exactly 1.0
    e = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))
    probs = (e / e.sum(1, keepdims=True)).astype(np.float32).astype(np.float64)
    assert (probs.max(1) == 1.0).sum() > 30
    y = rng.integers(0, 4, 300)
    want = _ref_ece_reference(probs.tolist(), y.tolist())
    assert expected_calibration_error_reference(probs, y) == pytest.approx(want)
    assert abs(expected_calibration_error(probs, y) - want) > 0.01  # the two really differ here

"""Classification metrics, computed directly (no scikit-learn dependency), matching sklearn's
definitions: balanced accuracy = mean recall over classes present in y_true; macro-F1 over the
union of true and predicted classes, 0 where undefined; ECE with 10 equal-width confidence bins, ours and
the reference code's variant (`ece_reference`, see `expected_calibration_error_reference`)."""

from __future__ import annotations

import numpy as np


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def balanced_accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    recalls = [(y_pred[y_true == c] == c).mean() for c in np.unique(y_true)]
    return float(np.mean(recalls)) if recalls else float("nan")


def macro_f1(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    scores = []
    for c in np.union1d(np.unique(y_true), np.unique(y_pred)):
        tp = np.sum((y_pred == c) & (y_true == c))
        denom = np.sum(y_pred == c) + np.sum(y_true == c)
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else float("nan")


def reliability_bins(probs, y_true, n_bins: int = 10) -> dict:
    """Per bin of max-class confidence (lo, hi], the first bin closed: count, mean confidence, accuracy."""
    probs, y_true = np.asarray(probs), np.asarray(y_true)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(which, weights=correct.astype(float), minlength=n_bins)
    safe = np.maximum(counts, 1)
    return {
        "edges": edges.tolist(),
        "count": counts.tolist(),
        "confidence": (conf_sum / safe).tolist(),
        "accuracy": (acc_sum / safe).tolist(),
    }


def expected_calibration_error(probs, y_true, n_bins: int = 10) -> float:
    """ECE = Σ_b (n_b / N) |conf_b − acc_b|."""
    b = reliability_bins(probs, y_true, n_bins)
    n = sum(b["count"])
    if n == 0:
        return float("nan")
    return float(
        sum(
            c / n * abs(cf - ac) for c, cf, ac in zip(b["count"], b["confidence"], b["accuracy"], strict=True)
        )
    )


def expected_calibration_error_reference(probs, y_true, n_bins: int = 10) -> float:
    """ECE as the reference code computes it (docs/algorithms.md §6, the quirk): bins are [lo, hi) except the
    last, [0.9, 1.0]; n_b is that histogram's count, so a confidence of exactly 1.0 is counted in the last bin,
    but the per-bin accuracy and mean confidence are taken over the samples with lo <= conf < hi only, so
    those 1.0s never count there (a bin holding only 1.0s contributes nothing). With logits scaled by 100
    many confidences saturate to exactly 1.0 in float32, and this variant can differ from ours by a lot:
    report it only to compare with the papers' numbers."""
    probs, y_true = np.asarray(probs), np.asarray(y_true)
    n = len(y_true)
    if n == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    counts = np.histogram(conf, bins=edges)[0]
    # np.digitize's left-closed bins: 1.0 (== the last edge) falls past the last bin and is dropped.
    which = np.digitize(conf, edges) - 1
    inside = (which >= 0) & (which < n_bins)
    members = np.bincount(which[inside], minlength=n_bins)
    conf_sum = np.bincount(which[inside], weights=conf[inside], minlength=n_bins)
    acc_sum = np.bincount(which[inside], weights=correct[inside], minlength=n_bins)
    safe = np.maximum(members, 1)
    gaps = np.where(members > 0, np.abs(conf_sum / safe - acc_sum / safe), 0.0)
    return float(np.sum(counts / n * gaps))


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts [true class, predicted class]."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def metrics_from_confusion(cm) -> dict[str, np.ndarray]:
    """acc, bacc and macro-F1 (the definitions above) of one confusion matrix [C, C] or a stack [B, C, C]."""
    cm = np.asarray(cm, dtype=float)
    single = cm.ndim == 2
    cm = cm[None] if single else cm
    n = cm.sum(axis=(1, 2))
    diag = np.diagonal(cm, axis1=1, axis2=2)
    true, pred = cm.sum(axis=2), cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = diag.sum(axis=1) / n
        recall = np.where(true > 0, diag / np.maximum(true, 1), np.nan)
        bacc = np.nanmean(np.where(true > 0, recall, np.nan), axis=1)
        seen = (true + pred) > 0
        f1 = np.where(seen, 2 * diag / np.maximum(true + pred, 1), 0.0)
        f1 = (f1 * seen).sum(axis=1) / seen.sum(axis=1)
    out = {"acc": acc, "bacc": bacc, "f1": f1}
    return {k: v[0] for k, v in out.items()} if single else out


def bootstrap_intervals(cm, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of acc, bacc and macro-F1 from a confusion matrix: the n test
    examples resampled with replacement (a multinomial draw over the matrix's cells), seeded."""
    cm = np.asarray(cm, dtype=np.int64)
    n = int(cm.sum())
    if n == 0:
        return {}
    draws = (
        np.random.default_rng(seed).multinomial(n, (cm / n).ravel(), size=n_boot).reshape(n_boot, *cm.shape)
    )
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    with np.errstate(all="ignore"):
        return {
            k: [float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi))]
            for k, v in metrics_from_confusion(draws).items()
        }


def classification_report(probs, y_true) -> dict:
    """acc, bacc (mean recall over classes present), f1 (macro), n, and two ECEs over 10 equal-width bins
    of the max-class confidence: `ece` (ours: bins (lo, hi], the first closed; every sample counts in its
    bin's confidence and accuracy) and `ece_reference` (the reference code's, where a confidence of exactly
    1.0 counts in the bin sizes but not in the per-bin accuracy or confidence: comparable with the papers'
    ECE; see `expected_calibration_error_reference`). `confusion`: counts [true][predicted], from which the
    model card draws its bootstrap intervals."""
    probs, y_true = np.asarray(probs), np.asarray(y_true)
    y_pred = probs.argmax(axis=1)
    return {
        "acc": accuracy(y_true, y_pred),
        "bacc": balanced_accuracy(y_true, y_pred),
        "f1": macro_f1(y_true, y_pred),
        "ece": expected_calibration_error(probs, y_true),
        "ece_reference": expected_calibration_error_reference(probs, y_true),
        "n": int(len(y_true)),
        "confusion": confusion_matrix(y_true, y_pred, probs.shape[1]).tolist(),
    }

"""The out-of-distribution score an exported model computes for every image, on the frozen CLIP features,
and the reference sample the server's drift test compares requests with.

Score (Lee et al., 2018, "A simple unified framework for detecting out-of-distribution samples"): the
Mahalanobis distance of the L2-normalised image feature u = f/|f| to the nearest of the class-conditional
Gaussians N(mu_c, Sigma) fitted on data the exporting party may see, with one covariance shared by the
classes and shrunk toward a scaled identity by the Ledoit-Wolf rule (CLIP features have hundreds of
dimensions, and a site may hold fewer images than that):

    score(x) = min_c (u - mu_c)^T Sigma^-1 (u - mu_c)

Calibration: the threshold is the conformal (1 - alpha) quantile of the scores of *held-out* in-distribution
images (never the ones the Gaussians were fitted on), so in-distribution images are flagged at a rate of
about alpha, the stated false-alarm rate. Both go into the ONNX metadata.

Drift reference: a PCA projection (fitted on the same features) to `embedding_dims` dimensions is a second
output of the graph, `drift_embedding`; up to `reference_size` held-out images' embeddings and the Gaussian kernel
bandwidth (median heuristic, as alibi-detect computes it) go into the metadata for the server's MMD test.

Which data: a site fits on its own training split (with its labels) and calibrates on its validation and test
splits; the server, for the global model, on its global test and reference images, split in two at random,
with the exported model's own predictions as classes (the reference set is unlabelled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import FedMedClipError

METHOD = "mahalanobis-shared-covariance"
DEFAULT_FALSE_ALARM_RATE = 0.05


class OodHead(nn.Module):
    """features [N, D] -> (ood_score [N], embedding [N, K]); traced into the exported graph."""

    def __init__(
        self, whiten: torch.Tensor, centres: torch.Tensor, pca_mean: torch.Tensor, pca: torch.Tensor
    ):
        super().__init__()
        self.register_buffer("whiten", whiten.float().contiguous())  # [D, D]: Sigma^-1/2
        self.register_buffer("centres", centres.float().contiguous())  # [C', D]: mu_c @ whiten
        self.register_buffer("pca_mean", pca_mean.float().contiguous())  # [D]
        self.register_buffer("pca", pca.float().contiguous())  # [D, K]

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
        z = u @ self.whiten
        distances = ((z[:, None, :] - self.centres[None, :, :]) ** 2).sum(-1)
        return distances.min(dim=1).values, (u - self.pca_mean) @ self.pca


@dataclass
class OodFit:
    head: OodHead
    threshold: float
    false_alarm_rate: float
    reference: np.ndarray  # float32 [R, K]
    sigma: float
    calibration: dict  # what it was fitted and calibrated on, and how (for the metadata)


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(covariance, shrinkage) of centred rows `x` [N, D]: (1 - s) S + s mu I with mu = tr(S)/D and the
    Ledoit-Wolf (2004) shrinkage s = min(beta^2, delta^2) / delta^2 (the estimate sklearn's ledoit_wolf gives)."""
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    delta2 = ((s - mu * np.eye(d)) ** 2).sum() / d
    beta2 = ((x**2).sum(1) ** 2).sum() / n**2 - (s**2).sum() / n
    shrinkage = 0.0 if delta2 == 0 else min(beta2 / d, delta2) / delta2
    return (1 - shrinkage) * s + shrinkage * mu * np.eye(d), float(shrinkage)


def median_bandwidth(x: np.ndarray) -> float:
    """Gaussian kernel bandwidth by the median heuristic, as alibi-detect's `sigma_median` on a sample with
    itself: sqrt(m / 2), m the lower middle of the off-diagonal squared distances."""
    sq = np.maximum((x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2.0 * x @ x.T, 0.0)
    off = np.sort(sq[~np.eye(len(x), dtype=bool)])
    return float(np.sqrt(0.5 * off[len(off) // 2 - 1]))


def conformal_threshold(scores: np.ndarray, false_alarm_rate: float) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest held-out score: an exchangeable in-distribution score is
    above it with probability at most alpha."""
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - false_alarm_rate))
    if rank > n:
        raise FedMedClipError(
            f"{n} held-out images cannot calibrate a false-alarm rate of {false_alarm_rate:g}: it needs at least "
            f"{math.ceil(1 / false_alarm_rate) - 1}; use a larger --ood-false-alarm-rate or more data"
        )
    return float(np.sort(scores)[rank - 1])


def fit_ood(
    fit_features: torch.Tensor,
    fit_classes: torch.Tensor,
    calibration_features: torch.Tensor,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    embedding_dims: int = 32,
    reference_size: int = 256,
    described: dict | None = None,
    seed: int = 0,
) -> OodFit:
    """Fit the class Gaussians on `fit_features` (raw CLIP features [N, D]) with `fit_classes` [N], and
    calibrate the threshold on `calibration_features` (held-out, in distribution)."""
    if not 0 < false_alarm_rate < 1:
        raise FedMedClipError(f"the OOD false-alarm rate must be in (0, 1), got {false_alarm_rate}")
    f = fit_features.double().numpy()
    if len(f) < 2:
        raise FedMedClipError(f"the OOD score needs at least 2 images to fit on, got {len(f)}")
    if not np.isfinite(f).all() or not torch.isfinite(calibration_features).all():
        raise FedMedClipError("refusing to fit the OOD score on non-finite features")
    u = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    classes = fit_classes.numpy()
    present = np.unique(classes)
    means = np.stack([u[classes == c].mean(0) for c in present])
    centred = u - means[np.searchsorted(present, classes)]
    cov, shrinkage = ledoit_wolf(centred)
    eigval, eigvec = np.linalg.eigh(cov)
    whiten = eigvec / np.sqrt(np.maximum(eigval, eigval.max() * 1e-9))  # Sigma^-1/2 (up to a rotation)

    pca_mean = u.mean(0)
    _, _, vt = np.linalg.svd(u - pca_mean, full_matrices=False)
    k = min(embedding_dims, vt.shape[0])
    pca = vt[:k].T
    head = OodHead(*(torch.from_numpy(a) for a in (whiten, means @ whiten, pca_mean, pca)))

    with torch.no_grad():
        scores, embedding = head(calibration_features.float())
    threshold = conformal_threshold(scores.numpy().astype(np.float64), false_alarm_rate)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(embedding))[:reference_size])
    reference = embedding.numpy()[pick].astype(np.float32)
    if len(reference) < 2:
        raise FedMedClipError("the drift reference needs at least 2 held-out images")
    calibration = {
        **(described or {}),
        "fit_images": int(len(f)),
        "fit_classes": int(len(present)),
        "calibration_images": int(len(calibration_features)),
        "covariance_shrinkage": round(shrinkage, 6),
        "embedding_dims": int(k),
        "reference_images": int(len(reference)),
    }
    return OodFit(
        head,
        threshold,
        false_alarm_rate,
        reference,
        median_bandwidth(reference.astype(np.float64)),
        calibration,
    )


def split_for_calibration(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random half of `n` rows to fit on, the other half to calibrate on (the server's images)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])

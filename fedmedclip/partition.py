"""Splitting the training pool across simulated hospital sites.

Schemes: iid (equal random shares), dirichlet (per class, p ~ Dir(alpha * 1_K)), natural (a site
column). Each site is then split train/val/test (8:1:1 by default); the official test split is the
global test set; an optional stratified fraction of the pool is held out as the unlabelled reference
set (FACMIC's domain-adaptation target), for every method alike so partitions compare fairly.
The manifest lists image ids, so it reproduces exactly from its seed."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import ImageSet
from .errors import ConfigError, DataError, shown
from .features import canonical_digest

SCHEMES = ("iid", "dirichlet", "natural")
LOCAL_SPLITS = ("train", "val", "test")
# The fewest training-pool images a site may get, whatever the scheme: a site of one or two images leaves a
# local split of at most one image, and training on it ended in a BatchNorm traceback.
MIN_SITE_IMAGES = 10


@dataclass
class Partition:
    scheme: str
    alpha: float | None
    seed: int
    split_ratio: tuple[float, float, float]
    reference_fraction: float
    class_names: list[str]
    sites: dict[str, dict[str, list[str]]]  # site -> {"train"|"val"|"test": [image ids]}
    reference: list[str]
    global_test: list[str]
    counts: dict  # site -> split -> class -> n

    @property
    def site_names(self) -> list[str]:
        return list(self.sites)

    def to_json(self) -> dict:
        body = {
            "scheme": self.scheme,
            "alpha": self.alpha,
            "seed": self.seed,
            "split_ratio": list(self.split_ratio),
            "reference_fraction": self.reference_fraction,
            "class_names": self.class_names,
            "sites": self.sites,
            "reference": self.reference,
            "global_test": self.global_test,
            "counts": self.counts,
        }
        return {**body, "digest": canonical_digest(body)}

    @property
    def digest(self) -> str:
        return self.to_json()["digest"]

    def save(self, path: str | Path) -> None:
        from .federation.storage import atomic_write_bytes

        atomic_write_bytes(path, json.dumps(self.to_json(), indent=1).encode())

    @classmethod
    def load(cls, path: str | Path) -> Partition:
        d = json.loads(Path(path).read_text())
        return cls(
            d["scheme"],
            d["alpha"],
            d["seed"],
            tuple(d["split_ratio"]),
            d["reference_fraction"],
            d["class_names"],
            d["sites"],
            d["reference"],
            d["global_test"],
            d["counts"],
        )


def dirichlet_split(
    labels: np.ndarray, num_sites: int, alpha: float, rng, min_size: int = MIN_SITE_IMAGES
) -> list[np.ndarray]:
    """Positions of `labels` per site; per class p ~ Dir(alpha), split by cumulative p. Redrawn until
    every site holds at least `min_size` samples (small alpha can leave a site empty)."""
    min_size = min(min_size, len(labels) // (num_sites * 2))
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            p = rng.dirichlet(alpha * np.ones(num_sites))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k] += chunk.tolist()
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ConfigError(
        f"could not draw a Dirichlet(alpha={alpha}) partition giving every site {min_size} samples"
    )


def _stratified_holdout(labels: np.ndarray, fraction: float, rng) -> np.ndarray:
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        keep += idx[: int(round(fraction * len(idx)))].tolist()
    return np.sort(np.array(keep, dtype=np.int64))


def valid_split(shares) -> bool:
    """Three train,val,test shares: each a finite number of at least 0, train above 0, summing to 1."""
    return (
        len(shares) == 3
        and all(math.isfinite(x) and x >= 0 for x in shares)
        and shares[0] > 0
        and abs(sum(shares) - 1) <= 1e-6
    )


def make_partition(
    image_set: ImageSet,
    scheme: str = "iid",
    num_sites: int | None = 3,
    alpha: float | None = None,
    seed: int = 0,
    split_ratio: tuple[float, float, float] = (0.8, 0.1, 0.1),
    reference_fraction: float = 0.1,
) -> Partition:
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "dirichlet" and (alpha is None or alpha <= 0):
        raise ConfigError("the dirichlet partition needs --alpha > 0 (smaller alpha = more skew)")
    if not valid_split(split_ratio):
        raise ConfigError(
            f"split ratio {split_ratio} must be three non-negative train:val:test shares summing to 1"
        )
    if not 0 <= reference_fraction < 0.5:
        raise ConfigError(f"reference fraction {reference_fraction} must be in [0, 0.5)")
    rng = np.random.default_rng(seed)
    pool = image_set.split("train")
    global_test = [r.image_id for r in image_set.split("test")]
    if not global_test:
        raise DataError(f"{image_set.source}: no global test images (a Testing/ folder or split=test rows)")
    labels = image_set.labels(pool)

    ref_pos = (
        _stratified_holdout(labels, reference_fraction, rng) if reference_fraction > 0 else np.array([], int)
    )
    remaining = np.setdiff1d(np.arange(len(pool)), ref_pos)
    rem_labels = labels[remaining]

    if scheme == "natural":
        site_of = [pool[i].site for i in remaining]
        if any(s is None for s in site_of):
            raise DataError("the natural partition needs a site for every training image (a `site` column)")
        names = sorted(set(site_of))
        if num_sites not in (None, len(names)):
            raise ConfigError(
                f"--sites {num_sites} but the data names {len(names)} sites: {', '.join(map(shown, names))}"
            )
        groups = [remaining[[s == n for s in site_of]] for n in names]
        short = [
            f"{shown(n)} ({len(g)})" for n, g in zip(names, groups, strict=True) if len(g) < MIN_SITE_IMAGES
        ]
        if short:
            raise DataError(
                f"{image_set.source}: the natural partition needs at least {MIN_SITE_IMAGES} training-pool "
                "images per site once the reference set is held out, as iid and dirichlet do; too few at: "
                f"{', '.join(short)}. Merge or drop those sites, or fix their site names"
            )
    else:
        if not num_sites or num_sites < 1:
            raise ConfigError("--sites must be at least 1")
        if len(remaining) < num_sites * MIN_SITE_IMAGES:
            raise DataError(f"{len(remaining)} training images are too few for {num_sites} sites")
        names = [f"site_{k}" for k in range(num_sites)]
        if scheme == "iid":
            groups = [np.sort(g) for g in np.array_split(rng.permutation(remaining), num_sites)]
        else:
            groups = [remaining[p] for p in dirichlet_split(rem_labels, num_sites, alpha, rng)]

    sites, counts = {}, {}
    for name, group in zip(names, groups, strict=True):
        perm = rng.permutation(group)
        n = len(perm)
        n_val, n_test = int(round(n * split_ratio[1])), int(round(n * split_ratio[2]))
        parts = {
            "train": perm[: n - n_val - n_test],
            "val": perm[n - n_val - n_test : n - n_test],
            "test": perm[n - n_test :],
        }
        if len(parts["train"]) == 0:
            raise DataError(f"{name} has no training images after the {split_ratio} split")
        sites[name] = {s: [pool[i].image_id for i in sorted(parts[s])] for s in LOCAL_SPLITS}
        counts[name] = {
            s: {
                image_set.class_names[c]: int(v)
                for c, v in sorted(Counter(labels[parts[s]].tolist()).items())
            }
            for s in LOCAL_SPLITS
        }
    return Partition(
        scheme,
        alpha if scheme == "dirichlet" else None,
        seed,
        tuple(float(x) for x in split_ratio),
        reference_fraction,
        list(image_set.class_names),
        sites,
        [pool[i].image_id for i in ref_pos],
        global_test,
        counts,
    )

"""A deterministic synthetic multi-site scan set for the demo and tests (no ../shared needed).

Each image is a brain-like ellipse on black. Classes differ by structure (none, a bright round
lesion, a ring lesion, a diffuse streak); sites differ by acquisition (contrast curve, noise level,
a smooth bias field of site-specific direction), so a site is a domain, as in real hospitals."""

from __future__ import annotations

import csv
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ConfigError, shown

MIN_SIZE, MAX_SIZE = 8, 4096  # image side in pixels
# Each keyword has its bounds, and together they are bounded too: per_class_per_site 100000 with 64 sites of
# 4096^2 images was 25.6 million images. 200,000 images (as many as the defaults' 1080 times 185), and 2^31
# pixels (2 GiB of 8-bit pixels to render and compress: 128 images of 4096^2, or 233,000 of 96^2) at most.
MAX_IMAGES, MAX_PIXELS = 200_000, 2**31


@dataclass(frozen=True)
class Between:
    """What a keyword of `generate` accepts, declared on it (`Annotated[int, Between(1, 64)]`): an integer from
    `low` to `high` (None: no upper bound)."""

    low: int
    high: int | None = None

    def describe(self) -> str:
        return f"from {self.low} to {self.high}" if self.high is not None else f"of at least {self.low}"


CLASSES = ("diffuse_lesion", "normal", "ring_lesion", "round_lesion")

# (gamma, noise std, bias-field strength, bias-field angle) per acquisition domain.
_SITE_SHIFTS = [
    (1.0, 0.04, 0.15, 0.0),
    (0.7, 0.08, 0.30, 2.1),
    (1.4, 0.06, 0.25, 4.2),
    (0.85, 0.10, 0.20, 1.0),
    (1.2, 0.05, 0.35, 3.0),
]
_GLOBAL_SHIFT = (1.05, 0.07, 0.22, 5.3)


def _render(cls: str, shift, size: int, rng: np.random.Generator) -> np.ndarray:
    gamma, noise, bias, angle = shift
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    cx, cy = rng.normal(0, 0.03, 2)
    head = ((xx - cx) / 0.8) ** 2 + ((yy - cy) / 0.9) ** 2 <= 1
    img = np.where(head, 0.45 + 0.1 * np.cos(6 * xx) * np.sin(5 * yy), 0.0)
    lx, ly = rng.uniform(-0.25, 0.25, 2)
    r = np.hypot(xx - lx, yy - ly)
    radius = rng.uniform(0.28, 0.4)
    if cls == "round_lesion":
        img = img + 0.55 * (r < radius)
    elif cls == "ring_lesion":
        img = img + 0.55 * ((r < radius) & (r > radius * 0.55)) - 0.35 * (r <= radius * 0.55)
    elif cls == "diffuse_lesion":
        # Several thin bright streaks across the tissue: a texture rather than a blob.
        theta = rng.uniform(0, np.pi)
        across = -(xx - lx) * np.sin(theta) + (yy - ly) * np.cos(theta)
        img = img + 0.45 * (np.cos(across * 40) > 0.6) * (r < radius * 1.6)
    img = img * head
    field = 1 + bias * (np.cos(angle) * xx + np.sin(angle) * yy)
    img = np.clip(img * field, 0, 1) ** gamma
    img = np.clip(img + rng.normal(0, noise, img.shape), 0, 1)
    return (img * 255).astype(np.uint8)


def generate(
    out_dir: str | Path,
    sites: typing.Annotated[int, Between(1, 64)] = 3,
    per_class_per_site: typing.Annotated[int, Between(1, 100_000)] = 80,
    test_per_class: typing.Annotated[int, Between(1, 100_000)] = 30,
    size: typing.Annotated[int, Between(MIN_SIZE, MAX_SIZE)] = 96,
    seed: typing.Annotated[int, Between(0)] = 0,
) -> Path:
    """Write PNGs and `manifest.csv` (path,label,site,split) to out_dir; returns the manifest path.
    Deterministic: the same arguments always give byte-identical files. Its keywords (after `out_dir`), with
    what each accepts, are the options of `--synthetic` and the flags of `fedmedclip synth` (`arguments()`)."""
    # Checked before anything is written: size 0 was a traceback from Pillow, size 1 divided by zero, a huge
    # size a MemoryError, a negative seed numpy's, and no sites or no images wrote a set that no run can use.
    check_arguments({k: v for k, v in locals().items() if k != "out_dir"})  # first: its arguments alone
    out = Path(out_dir)
    manifest = out / "manifest.csv"
    rows = []
    rng = np.random.default_rng(seed)
    plan = [
        (f"site_{k}", _SITE_SHIFTS[k % len(_SITE_SHIFTS)], "train", per_class_per_site) for k in range(sites)
    ]
    plan.append(("global", _GLOBAL_SHIFT, "test", test_per_class))
    for site, shift, split, n in plan:
        for cls in CLASSES:
            folder = out / split / site / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rel = f"{split}/{site}/{cls}/{i:04d}.png"
                Image.fromarray(_render(cls, shift, size, rng), mode="L").save(out / rel)
                rows.append((rel, cls, site if split == "train" else "", split))
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "site", "split"])
        w.writerows(rows)
    return manifest


def arguments() -> dict[str, Between]:
    """generate's keywords after `out_dir`, each with what it accepts, from its own signature."""
    hints = typing.get_type_hints(generate, include_extras=True)
    names = list(inspect.signature(generate).parameters)[1:]
    return {name: next(m for m in hints[name].__metadata__ if isinstance(m, Between)) for name in names}


def defaults() -> dict[str, int]:
    """generate's keywords after `out_dir` with their defaults."""
    return {k: p.default for k, p in list(inspect.signature(generate).parameters.items())[1:]}


def check_arguments(args: dict, where: str = "synthetic data") -> None:
    """ConfigError (prefixed `where`: the flag that set them) unless `args` are keywords `generate` takes, each
    an integer within its declared bounds."""
    accepted = arguments()
    unknown = sorted(str(k) for k in args if k not in accepted)
    if unknown:
        raise ConfigError(
            f"{where}: unknown option(s) {', '.join(map(repr, unknown))}; the generator takes "
            f"{', '.join(accepted)}"
        )
    for name, value in args.items():
        bounds = accepted[name]
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < bounds.low
            or (bounds.high is not None and value > bounds.high)
        ):
            raise ConfigError(f"{where}: {name} must be an integer {bounds.describe()}, got {shown(value)}")
    given = {**defaults(), **args}
    images = len(CLASSES) * (given["sites"] * given["per_class_per_site"] + given["test_per_class"])
    pixels = images * given["size"] ** 2
    if images > MAX_IMAGES or pixels > MAX_PIXELS:
        raise ConfigError(
            f"{where}: {given['sites']} sites x {len(CLASSES)} classes x {given['per_class_per_site']} images, "
            f"and {len(CLASSES)} x {given['test_per_class']} test images, of {given['size']}x{given['size']} pixels "
            f"make {images:,} images and {pixels:,} pixels; the generator makes at most {MAX_IMAGES:,} images "
            f"and {MAX_PIXELS:,} pixels: lower per_class_per_site, test_per_class, sites or size"
        )

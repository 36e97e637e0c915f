"""PNG plots of a run: accuracy per round, and a reliability diagram."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _nan(values) -> list[float]:
    """Rounds where a site was absent (or no site has a validation split) have None: drawn as gaps."""
    return [float("nan") if v is None else v for v in values]


def _save(fig, path: Path) -> None:
    """Written whole or not at all, like every final file of a run (a temporary file of this write's own,
    renamed: two processes drawing the same plot never tear each other's file)."""
    from .federation.storage import atomic_write_bytes

    # tight_layout leaves a placeholder layout engine on the figure, for which savefig draws it twice (a dry run
    # for the layout, then the pixels). The layout is done: without the engine the same bytes cost a sixth less.
    fig.set_layout_engine(None)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_accuracy(history: list[dict], path: Path, title: str = "", selected: int | None = None) -> None:
    """Accuracy per round: global test, each site's own test, the mean site validation, the selected round."""
    rounds = [r["round"] for r in history]
    fig, ax = plt.subplots(figsize=(8.6, 4.2))
    ax.plot(rounds, [r["global"]["acc"] for r in history], "k-o", ms=3, lw=2, label="global test")
    for i, site in enumerate(history[0]["sites"]):
        ys = _nan(r["sites"][i]["acc"] for r in history)
        ax.plot(rounds, ys, "-", lw=1, alpha=0.8, label=f"{site['site']} local test")
    val = _nan(r["val_acc_mean"] for r in history)
    if any(v == v for v in val):
        ax.plot(rounds, val, "--", color="grey", lw=1, label="mean site validation")
    if selected is not None:
        ax.axvline(selected, color="tab:red", lw=1, ls=":", label=f"selected round {selected}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    # Outside the axes: inside, it covered the curves' right ends (the rounds that matter most).
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def plot_reliability(bins: dict, path: Path, title: str = "") -> None:
    edges = bins["edges"]
    width = edges[1] - edges[0]
    centres = [e + width / 2 for e in edges[:-1]]
    acc = [a if c else 0 for a, c in zip(bins["accuracy"], bins["count"], strict=True)]
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    ax.bar(centres, acc, width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for x, n in zip(centres, bins["count"], strict=True):
        if n:
            ax.text(x, 0.02, str(n), ha="center", fontsize=7, color="white")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)

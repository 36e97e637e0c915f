"""PNG plots of a run: accuracy per round, and a reliability diagram."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_accuracy(history: list[dict], path: Path, title: str = "") -> None:
    rounds = [r["round"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(rounds, [r["global"]["acc"] for r in history], "k-o", ms=3, lw=2, label="global test")
    for i, site in enumerate(history[0]["sites"]):
        ys = [r["sites"][i]["acc"] for r in history]
        ax.plot(rounds, ys, "-", lw=1, alpha=0.8, label=f"{site['site']} local test")
    val = [r["val_acc_mean"] for r in history]
    ax.plot(rounds, val, "--", color="grey", lw=1, label="mean site validation")
    selected = rounds[max(range(len(val)), key=lambda i: (val[i], -i))]  # first best, as the engine selects
    ax.axvline(selected, color="tab:red", lw=1, ls=":", label=f"selected round {selected}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    fig.savefig(path, dpi=110)
    plt.close(fig)

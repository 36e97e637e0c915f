"""What a round leaves behind, written once for every runtime: the round record (results.json's `history`),
best-round selection, results.json itself, and the model directory. The in-process simulator
(`fedmedclip train`), the mailbox server (`fedmedclip server run`) and the Kubeflow pipeline all call these.

Reports are computed where the data is: the server evaluates the global module on the global test set; each
site evaluates its own predictor (with the round's global module loaded) on its own validation and test splits
and sends only the metrics. Selection reads validation metrics only, never a test split.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import ConfigDict, Field, StringConstraints

from ..codec.secure import SUFFIX as SECURE_SUFFIX
from ..errors import CheckpointError, ConfigError
from ..metrics import classification_report, reliability_bins
from ..paths import lock_folder
from .checkpoint import Body, parse_body
from .messages import Message
from .storage import atomic_write_bytes

SELECTION_BEST_VAL = "best client-mean validation accuracy"
SELECTION_BEST_VAL_MEDIAN = "best client-median validation accuracy (robust aggregator)"
SELECTION_LAST = "last round (no site has a validation split)"
SUMMARY_KEYS = ("acc", "bacc", "f1", "ece", "ece_reference")


# ---------------------------------------------------------------- files
@contextlib.contextmanager
def only_writer(out: str | Path):
    """This process alone writes the run directory `out` while it runs (`train`, `compare`, `server run`): an
    advisory lock on the directory itself (a lock file would make a new run's directory non-empty). Two runs of
    one --out at once both found it empty, or both resumed it, and wrote the same checkpoints and files: the
    loser failed on a torn file or a misleading 'redoing it gave another update', and a second `server run`
    deleted the first one's temporary files as a crash's leftovers. The second is refused in one line
    (ConfigError). Where the file system has no locks, the run goes on without one."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)

    def refuse() -> None:
        raise ConfigError(
            f"another process is writing the run directory {str(out)!r} (a `train`, `compare` or `server run` "
            "of it still running): wait for it to end, or pass another --out"
        )

    try:
        with lock_folder(out, on_wait=refuse):
            yield
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # a run refused before it wrote anything leaves no directory behind
        raise


def atomic_write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=indent, allow_nan=False).encode())


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous() for k, v in tensors.items()}))


# ---------------------------------------------------------------- reports
def _clean(report: dict | None) -> dict | None:
    """JSON-safe: a metric that is undefined (no sample of any class) becomes None, never NaN."""
    if report is None:
        return None
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in report.items()}


def evaluate_global(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """The server's report of a round: metrics and reliability bins on the global test set."""
    p, y = probs.numpy(), labels.numpy()
    return {"report": _clean(classification_report(p, y)), "reliability": reliability_bins(p, y)}


def evaluate_site(trainer, data) -> dict:
    """A site's report of a round: its own predictor on its own validation and test splits (metrics only)."""

    def report(x, y):
        return _clean(classification_report(trainer.probs(x).numpy(), y.numpy())) if len(y) else None

    return {"val": report(data.val_x, data.val_y), "test": report(data.test_x, data.test_y)}


# ---------------------------------------------------------------- the round record
def round_record(
    r: int,
    global_report: dict,
    site_names: list[str],
    site_reports: dict[str, dict | None],
    present: list[str],
    losses: dict[str, float],
    bytes_up: dict[str, int],
    bytes_down: dict[str, int],
    seconds: float,
    rejected: dict[str, str] | None = None,
    finished_at: float | None = None,
) -> dict:
    """One entry of results.json's `history`. Sites absent from the round (or without a report) have None
    metrics; `val_acc_mean` averages the validation accuracy of the sites that have a validation split,
    and is None when none has. `finished_at` (unix seconds, default now) is when the round closed: what
    `fedmedclip track` stamps its metrics with when it logs the run afterwards."""
    rows = []
    for name in site_names:
        rep = site_reports.get(name) or {}
        test, val = rep.get("test"), rep.get("val")
        rows.append(
            {
                "site": name,
                "acc": test["acc"] if test else None,
                "bacc": test["bacc"] if test else None,
                "val_acc": val["acc"] if val else None,
            }
        )
    val = [row["val_acc"] for row in rows if row["val_acc"] is not None]
    present_losses = [losses[s] for s in present if s in losses]
    return {
        "round": r,
        "global": {k: global_report["report"][k] for k in ("acc", "bacc")},
        "sites": rows,
        "sites_present": list(present),
        "rejected": dict(rejected or {}),
        "val_acc_mean": float(np.mean(val)) if val else None,
        "validation_sites": [row["site"] for row in rows if row["val_acc"] is not None],
        "train_loss": float(np.mean(present_losses)) if present_losses else None,
        "bytes_up": [bytes_up.get(s) for s in site_names],
        "bytes_down": [bytes_down.get(s) for s in site_names],
        "seconds": float(seconds),
        "finished_at": round(time.time() if finished_at is None else float(finished_at), 3),
    }


# What every reader of a history or of a round's reports indexes (`round_record`, `evaluate_global`): those keys
# are declared, the rest let be (a record gains entries with the run's options: `client_dp`, `epsilon_max`, ...).
class _Indexed(Message):
    model_config = ConfigDict(extra="ignore")


class GlobalAccuracy(_Indexed):
    acc: float
    bacc: float | None


class SiteRow(_Indexed):
    val_acc: float | None


class RoundRecord(_Indexed):
    round: int
    global_: GlobalAccuracy = Field(alias="global")
    sites: list[SiteRow]
    sites_present: list
    rejected: dict
    val_acc_mean: float | None
    validation_sites: list
    train_loss: float | None
    bytes_up: list
    bytes_down: list
    seconds: float


class GlobalReport(_Indexed):
    report: dict
    reliability: dict


class RoundReports(_Indexed):
    global_: GlobalReport = Field(alias="global")
    sites: dict  # by site: its `evaluate_site`, or None


RoundKey = Annotated[str, StringConstraints(pattern=r"^[0-9]+$")]  # a round number, as a JSON object's key


class Progress(Body):
    """A checkpoint's record of the run's progress (the server's and a reference run's alike)."""

    round: int
    history: list[RoundRecord]
    reports: dict[RoundKey, RoundReports]
    best_round: int | None
    best_val: float | None


def check_progress(body: dict, declared: type[Progress] = Progress) -> Progress:
    """`body` parsed against `declared`, or CheckpointError naming what is missing, of another type, or does not
    fit together (reports and selected round of its history): what a party reads back is checked so, not indexed
    into a traceback at every restart."""
    progress = parse_body(declared, body)
    rounds = [rec.round for rec in progress.history]
    missing = [r for r in rounds if str(r) not in progress.reports]
    if missing:
        raise CheckpointError(f"body.reports lacks round {missing[0]} of its history")
    if progress.best_round is not None and progress.best_round not in rounds:
        raise CheckpointError(f"body.best_round {progress.best_round} is no round of its history")
    return progress


def selects_by_median(aggregator: str) -> bool:
    """Whether rounds are ranked by the median of the sites' validation accuracies: under a robust aggregator,
    the operator's word that a site may lie. Each site reports its own accuracy, and with the mean one site
    reporting 1.0 for the round it wants and 0.0 for the others chose the selected model alone (a third of the
    mean with three sites); the median of three or more stays between honest sites' figures."""
    return aggregator != "mean"


def selection_key(record: dict, median: bool = False, validators=()) -> tuple[int, float] | None:
    """How a round ranks for selection: first by how many sites reported validation metrics in it, then by
    their mean validation accuracy; `median`: by the median over `validators` alone. None for a round without
    validation metrics (never selected by them).

    A mean over fewer sites is not comparable with one over every site: a round in which a weak site was
    absent would win by that alone. So a round in which every site with a validation split reported beats
    every round with fewer (and those are compared only among themselves when no round had every site).
    The selected round is then one whose metrics and model parts exist at every site.

    Not under a robust aggregator, where the count was one site's to set (reporting its validation in the
    round it wanted and in no other picked that round). There every site that has reported validation in the
    run so far (`validators`: `validation_sites_of` the history, and this round's) counts in every round, a
    missing report as 0: with three or more, neither one site's figure nor its absence moves the median out of
    the honest sites' range, and a round missing a weak site still cannot win by its absence."""
    v = record.get("val_acc_mean")
    if v is None:
        return None
    if median:
        given = {row["site"]: row["val_acc"] for row in record["sites"]}
        counted = sorted(set(validators) | {s for s, acc in given.items() if acc is not None})
        return 0, float(np.median([given.get(s) or 0.0 for s in counted]))
    return len(record.get("validation_sites") or ()), v


def validation_sites_of(history: list[dict]) -> set[str]:
    """Every site that reported validation metrics in some round of `history`."""
    return {site for rec in history for site in rec.get("validation_sites") or ()}


def round_of(history: list[dict], r: int | None) -> dict | None:
    """The record of round r in `history` (None for None)."""
    return None if r is None else next(rec for rec in history if rec["round"] == r)


def is_better(record: dict, best: dict | None, median: bool = False, validators=()) -> bool:
    """Whether `record` replaces `best` (the record of the round selected so far, or None) as the selected
    round: the first maximum of `selection_key`, both keys taken over the same `validators`."""
    key = selection_key(record, median, validators)
    return key is not None and (best is None or key > selection_key(best, median, validators))


def selection_of(history: list[dict], best_round: int | None, median: bool = False) -> tuple[int, str]:
    """The selected round and how it was selected. `best_round` is the running best by validation."""
    if best_round is None:
        return history[-1]["round"], SELECTION_LAST
    return best_round, SELECTION_BEST_VAL_MEDIAN if median else SELECTION_BEST_VAL


def _site_mean(rows: list[dict]) -> dict:
    valid = [r for r in rows if r.get("n")]
    out = {}
    for k in SUMMARY_KEYS:
        vals = [r[k] for r in valid if r.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    return out


def site_rows(site_names: list[str], site_reports: dict[str, dict | None]) -> dict:
    rows = [{"site": n, **((site_reports.get(n) or {}).get("test") or {"n": 0})} for n in site_names]
    return {"sites": rows, "site_mean": _site_mean(rows)}


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def build_results(
    *,
    cfg,
    partition,
    backbone: dict,
    preprocessing: dict,
    method_options: dict,
    history: list[dict],
    reports: dict[int, dict],
    best_round: int | None,
    timing: dict,
    features: dict,
    extra: dict | None = None,
) -> dict:
    """results.json (docs/contracts.md). `reports[r]` = {"global": evaluate_global(...), "sites": {name:
    evaluate_site(...) or None}} for every round r of `history`."""
    selected, how = selection_of(history, best_round, selects_by_median(cfg.aggregator))
    last = history[-1]["round"]
    names = partition.site_names
    ups = [b for rec in history for b in rec["bytes_up"] if b is not None]
    downs = [b for rec in history for b in rec["bytes_down"] if b is not None]
    # Under secure aggregation the updates travel in the uplink codec's secure form, and each site also sends
    # the protocol's objects (its key advertisement, shares and unmasking answer), counted apart.
    codec_up, secure = cfg.codec_up, {}
    if cfg.secure_aggregation:
        codec_up += SECURE_SUFFIX
        sent = [
            b
            for rec in history
            for b in (rec.get("secure_aggregation") or {}).get("protocol_bytes_up", {}).values()
        ]
        secure = {"secure_aggregation_bytes_up_per_site_per_round": _mean(sent) or 0.0}
    results = {
        "method": cfg.method,
        "federation": cfg.federation,
        "partition": {
            "scheme": cfg.partition,
            "alpha": cfg.alpha,
            "seed": cfg.seed,
            "digest": partition.digest,
        },
        "sites": len(names),
        "site_names": names,
        "rounds": cfg.rounds,
        "backbone": backbone,
        "preprocessing": preprocessing,
        "method_options": method_options,
        "metrics": {
            "selection": how,
            "selection_sites": next(rec for rec in history if rec["round"] == selected)["validation_sites"],
            "best_round": selected,
            "global": reports[selected]["global"]["report"],
            **site_rows(names, reports[selected]["sites"]),
            "last_round": {
                "round": last,
                "global": reports[last]["global"]["report"],
                **site_rows(names, reports[last]["sites"]),
            },
        },
        "reliability": reports[selected]["global"]["reliability"],
        "history": history,
        "comm": {
            "codec": cfg.codec_up,
            "codec_up": codec_up,
            "codec_down": cfg.codec_down,
            "bytes_up_per_site_per_round": _mean(ups) or 0.0,
            "bytes_down_per_site_per_round": _mean(downs) or 0.0,
            "total_bytes": int(sum(ups) + sum(downs)),
            **secure,
        },
        "timing": {"seconds_per_round": _mean(rec["seconds"] for rec in history), **timing},
        "features": features,
        **(extra or {}),
    }
    return results


def write_results(out: str | Path, results: dict, title: str) -> None:
    """results.json and the plots, each written atomically."""
    from ..plots import plot_accuracy, plot_reliability

    out = Path(out)
    atomic_write_json(out / "results.json", results)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    best = results["metrics"]["best_round"]
    plot_accuracy(results["history"], out / "plots" / "accuracy.png", title=title, selected=best)
    plot_reliability(
        results["reliability"],
        out / "plots" / "reliability.png",
        title=f"{results['method']}: global test (round {best})",
    )


def write_model_dir(
    directory: str | Path,
    received_global: dict[str, torch.Tensor],
    text_features: torch.Tensor,
    meta: dict,
    site_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """model/: the selected round's global module (as the sites received it), the prompt embeddings, each
    given site's own part, and model.json. Everything is finite (the callers only hold validated state)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(directory / "global.safetensors", received_global)
    save_safetensors(directory / "text_features.safetensors", {"text_features": text_features})
    for name, tensors in (site_tensors or {}).items():
        if tensors:
            save_safetensors(directory / f"site_{name}.safetensors", tensors)
    atomic_write_json(directory / "model.json", meta)

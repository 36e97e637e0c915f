"""Which round a run selects when sites were absent from some rounds (docs/contracts.md, "Selection"): a round's
mean validation accuracy over fewer sites is not compared with one over more, so a round in which a weak site
was absent cannot win by its absence; among rounds with as many sites, the first best mean wins."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SYNTH
from test_composition_audit import SITES, aggregate_round, moved, send, start_server, train_sizes

from fedmedclip.config import TrainConfig
from fedmedclip.federation.records import (
    evaluate_global,
    is_better,
    round_of,
    round_record,
    validation_sites_of,
)
from fedmedclip.preparation import prepare

RUN = "audit"


def metrics(acc: float) -> dict:
    return {"acc": acc, "bacc": acc, "f1": acc, "ece": 0.1, "ece_reference": 0.1, "n": 10}


def site_report(r: int, site: str, val_acc: float, provenance: dict) -> dict:
    return {
        "format": 1,
        "run_id": RUN,
        "round": r,
        "site": site,
        "val": metrics(val_acc),
        "test": metrics(val_acc),
        "provenance": provenance,
    }


# Round 2 lacks the weak site_1: over the sites present its mean (0.70) beats every round with all three.
VALIDATION = {
    1: {"site_0": 0.60, "site_1": 0.20, "site_2": 0.60},
    2: {"site_0": 0.70, "site_2": 0.70},
    3: {"site_0": 0.65, "site_1": 0.25, "site_2": 0.65},
}


@pytest.fixture(scope="module")
def prepared(synthetic_cache):
    cfg = TrainConfig(
        rounds=len(VALIDATION),
        synthetic=SYNTH,
        cache_dir=str(synthetic_cache),
        out="unused",
        codec_up="fp32-zlib",
    ).validate()
    return cfg, prepare(cfg, progress=False)


def test_a_round_without_a_weak_site_does_not_win_the_selection(prepared, tmp_path):
    """The server runs three rounds (quorum 2) with the sites' reports above: it selects round 3, the best of
    the rounds every site took part in, and reports every site's metrics of that round."""
    cfg, p = prepared
    server = start_server(cfg, p, tmp_path, quorum=2, round_timeout=0)
    sizes = train_sizes(p)
    for r, reports in VALIDATION.items():
        for k, s in enumerate(reports):
            send(server, s, moved(server, k, 0.01), sizes[s])
        aggregate_round(server)
        assert server.info["present"] == list(reports)
        for s, acc in reports.items():
            server.mb.put_json(server.mb.report_key(r, s), site_report(r, s, acc, p.stores[s].provenance))
        while server.round == r and not server.finished:
            server.poll()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [h["val_acc_mean"] for h in results["history"]] == pytest.approx([1.4 / 3, 0.70, 1.55 / 3])
    assert results["metrics"]["best_round"] == 3
    assert results["metrics"]["selection_sites"] == SITES
    assert [row["acc"] for row in results["metrics"]["sites"]] == [0.65, 0.25, 0.65]


# ----------------------------------------------------------------------------- the rule on round records
GLOBAL = evaluate_global(torch.eye(4), torch.arange(4))


def history(*rounds: dict[str, float | None]) -> list[dict]:
    """Round records whose sites reported the given validation accuracies (None: the site has no validation
    split); a site missing from a round's dict was absent from that round."""
    out = []
    for r, vals in enumerate(rounds, 1):
        reports = {
            s: {"val": None if v is None else metrics(v), "test": metrics(0.5)} for s, v in vals.items()
        }
        zeros = dict.fromkeys(vals, 0)
        out.append(round_record(r, GLOBAL, SITES, reports, list(vals), {}, zeros, zeros, 0.0))
    return out


def selected(records: list[dict], median: bool = False) -> int | None:
    """The round the server selects, round by round as it does (`median`: under a robust aggregator)."""
    best = None
    for k, rec in enumerate(records):
        if is_better(rec, round_of(records, best), median, validation_sites_of(records[: k + 1])):
            best = rec["round"]
    return best


def test_under_a_robust_aggregator_one_site_picks_no_round_by_what_it_reports_or_withholds():
    """site_2 lies. Ranked by how many reported, then the median of those who did: reporting nothing in round
    1 and 0.0 in round 2 (honest 0.6 then 0.5) picked round 2; with honest site_1 absent from round 2 (honest
    0.3), site_2's 1.0 made the median of two 0.65 and picked it. Every site that has reported validation
    counts in every round, a missing report as 0: round 1 both times."""
    honest = {"site_0": 0.6, "site_1": 0.6}
    assert selected(history({**honest, "site_2": None}, {"site_0": 0.5, "site_1": 0.5, "site_2": 0.0})) == 2
    assert (
        selected(history({**honest, "site_2": None}, {"site_0": 0.5, "site_1": 0.5, "site_2": 0.0}), True)
        == 1
    )
    absent = history({**honest, "site_2": 0.0}, {"site_0": 0.3, "site_2": 1.0})
    assert selected(absent, True) == 1
    # ... and a round missing a weak site does not win by its absence (the median of those who reported: 0.6)
    weak = history({"site_0": 0.7, "site_1": 0.3, "site_2": 0.5}, {"site_0": 0.7, "site_2": 0.5})
    assert selected(weak, True) == 1


def test_rounds_are_compared_only_with_rounds_of_as_many_sites():
    full, without_1 = {"site_0": 0.5, "site_1": 0.3, "site_2": 0.5}, {"site_0": 0.9, "site_2": 0.9}
    # A site that joins late: the rounds before it joined are not compared with those after.
    assert selected(history(without_1, without_1, full, {**full, "site_0": 0.6})) == 4
    # A site absent from every round: the others are compared among themselves, first best wins.
    assert selected(history({"site_0": 0.4, "site_2": 0.4}, without_1, without_1)) == 2
    # A site without a validation split counts in no round; the others are compared as usual.
    no_val = {"site_0": 0.5, "site_1": None, "site_2": 0.5}
    assert selected(history(no_val, {**no_val, "site_0": 0.7}, no_val)) == 2
    # Without any validation metrics no round is selected by them (the run then takes its last round).
    assert selected(history(dict.fromkeys(SITES), dict.fromkeys(SITES))) is None

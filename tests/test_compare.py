"""The comparison grid: parsing, outputs, and resuming without redoing finished cells."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import SYNTH, error_lines

from fedmedclip import compare, engine
from fedmedclip.cli import main
from fedmedclip.errors import ConfigError
from fedmedclip.methods import method_groups


def test_parse_methods_and_partitions():
    assert compare.parse_methods("fedmedclip,facmic@local") == [
        ("fedmedclip", "federated"),
        ("facmic", "local"),
    ]
    assert ("fedavg", "federated") in compare.parse_methods("all")
    finetune = method_groups()["finetune"]
    assert finetune == ["fedavg", "fedprox", "moon", "fedfocal"]
    assert all(m not in finetune for m, _ in compare.parse_methods("cached"))
    assert ("facmic", "centralized") in compare.parse_methods("cached")
    assert compare.parse_partitions("iid,dirichlet:0.50") == [
        ("iid", "iid", None),
        ("dirichlet:0.5", "dirichlet", 0.5),
    ]
    with pytest.raises(ConfigError, match="unknown method"):
        compare.parse_methods("fedsgd")
    with pytest.raises(ConfigError, match="concentration"):
        compare.parse_partitions("dirichlet")


def test_method_options_are_routed():
    grid = ["facmic", "fedmedclip"]
    opts = {"facmic.local_steps": 5, "lr_fam": 1e-4}
    assert compare.options_for("facmic", opts, grid) == {"local_steps": 5}
    assert compare.options_for("fedmedclip", opts, grid) == {"lr_fam": 1e-4}
    with pytest.raises(ConfigError, match="no option"):
        compare.options_for("facmic", {"facmic.nope": 1}, grid)


def grid_args(tmp_path, cache):
    return [
        "-q",
        "compare",
        "--methods",
        "zeroshot,fedclip@centralized",
        "--partitions",
        "iid,dirichlet:0.5",
        "--seeds",
        "2",
        "--rounds",
        "1",
        "--out",
        str(tmp_path / "grid"),
        "--cache-dir",
        str(cache),
        "--synthetic",
        json.dumps(SYNTH),  # tiny images for every cell
    ]


def test_grid_writes_outputs_and_resumes_without_rerunning(tmp_path, monkeypatch, synthetic_cache):
    cache = synthetic_cache
    calls = []
    real_train = engine.train
    monkeypatch.setattr(engine, "train", lambda cfg, **kw: calls.append(cfg.out) or real_train(cfg, **kw))

    assert main(grid_args(tmp_path, cache)) == 0
    out = tmp_path / "grid"
    assert len(calls) == 2 * 2 * 2
    summary = json.loads((out / "comparison.json").read_text())
    assert {(r["method"], r["partition"]) for r in summary["summary"]} == {
        (m, p) for m in ("zeroshot", "fedclip@centralized") for p in ("iid", "dirichlet:0.5")
    }
    row = summary["summary"][0]
    assert row["seeds"] == 2 and row["global_acc"]["n"] == 2 and row["bytes_per_site_per_round"]["mean"] >= 0
    table = (out / "comparison.md").read_text()
    assert "| iid | zeroshot |" in table and "±" in table
    assert (out / "comparison.png").stat().st_size > 0

    # Second invocation: every cell is finished, nothing trains, the table is rebuilt identically.
    calls.clear()
    assert main(grid_args(tmp_path, cache)) == 0
    assert calls == []
    assert (out / "comparison.md").read_text() == table

    # An interrupted cell (its run started, no results.json) resumes; the others stay untouched.
    cell = out / "runs" / "zeroshot" / "iid" / "seed1"
    (cell / "results.json").unlink()
    assert main(grid_args(tmp_path, cache)) == 0
    assert calls == [str(cell)]


def test_a_finished_cell_with_other_settings_is_an_error(tmp_path, monkeypatch, synthetic_cache):
    from fedmedclip.config import TrainConfig

    base = TrainConfig(rounds=1, synthetic=SYNTH, cache_dir=str(synthetic_cache))
    cells = compare.build_cells([("zeroshot", "federated")], [("iid", "iid", None)], [0])
    compare.run_grid(base, cells, tmp_path / "g", {}, progress=False)
    base.rounds = 2
    with pytest.raises(ConfigError, match="another configuration"):
        compare.run_grid(base, cells, tmp_path / "g", {}, progress=False)
    # --report-only checks the settings too, and runs nothing.
    with pytest.raises(ConfigError, match="another configuration"):
        compare.run_grid(base, cells, tmp_path / "g", {}, progress=False, report_only=True)
    base.rounds = 1
    calls = []
    monkeypatch.setattr(engine, "train", lambda cfg, **kw: calls.append(cfg.out))
    more = cells + compare.build_cells([("zeroshot", "federated")], [("iid", "iid", None)], [1])
    records = compare.run_grid(base, more, tmp_path / "g", {}, progress=False, report_only=True)
    assert calls == [] and [r["seed"] for r in records] == [0]  # the unfinished seed 1 is left out


def _one_cell_args(tmp_path, cache) -> list[str]:
    args = grid_args(tmp_path, cache)
    args[args.index("zeroshot,fedclip@centralized")] = "zeroshot"
    args[args.index("iid,dirichlet:0.5")] = "iid"
    args[args.index("--seeds") + 1] = "1"
    return args


@pytest.fixture(scope="module")
def one_finished_cell(tmp_path_factory, synthetic_cache):
    """A grid of one finished zero-shot cell, run once: each damage below is done to a copy of it."""
    tmp = tmp_path_factory.mktemp("one-cell")
    assert main(_one_cell_args(tmp, synthetic_cache)) == 0
    return tmp / "grid"


@pytest.mark.parametrize(
    "name, content, why",
    [
        ("results.json", '{"metrics":', "Expecting value"),
        ("results.json", "[]", "a JSON object expected, got list"),
        ("results.json", "{}", "no 'metrics'"),
        ("config.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("config.json", None, "missing"),
    ],
    ids=["results-cut", "results-list", "results-empty", "config-deep", "config-missing"],
)
def test_a_damaged_finished_cell_is_named_in_one_line(
    tmp_path, capsys, synthetic_cache, one_finished_cell, name, content, why
):
    """A finished cell whose results.json or config.json was damaged: the grid stops with one line naming
    the cell and the file (it was a traceback: JSONDecodeError, KeyError in the summary, RecursionError)."""
    args = _one_cell_args(tmp_path, synthetic_cache)
    shutil.copytree(one_finished_cell, tmp_path / "grid")
    assert main([*args, "--report-only"]) == 0  # the copy is the finished grid
    (cell,) = {p.parent for p in (tmp_path / "grid").rglob("results.json")}
    if content is None:
        (cell / name).unlink()
    else:
        (cell / name).write_text(content)
    capsys.readouterr()
    assert main([*args, "--report-only"]) == 2
    text = capsys.readouterr().err
    err = error_lines(text)
    assert len(err) == 1 and err[0].startswith(f"error: {cell}: its {name} is unreadable (") and why in err[0]
    assert err[0].endswith("delete that cell to redo it") and "Traceback" not in text

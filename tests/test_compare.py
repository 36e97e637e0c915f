"""The comparison grid: parsing, outputs, and resuming without redoing finished cells."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import SYNTH, error_lines

from fedmedclip import cli as cli_module
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


def test_a_finished_cell_with_other_settings_is_an_error(tmp_path, monkeypatch, synthetic_cache, caplog):
    from fedmedclip.config import TrainConfig

    base = TrainConfig(rounds=1, synthetic=SYNTH, cache_dir=str(synthetic_cache))
    cells = compare.build_cells([("zeroshot", "federated")], [("iid", "iid", None)], [0])
    with caplog.at_level("INFO", logger="fedmedclip"):
        compare.run_grid(base, cells, tmp_path / "g", {}, progress=False)
    # what is coming is said before it starts (a bare `compare` started 144 cells without a word)
    assert "compare: 1 cells (1 methods x 1 partitions x 1 seeds), 1 to run, 1 rounds each;" in caplog.text
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
        (
            "results.json",
            lambda r: r["metrics"]["global"].update(bacc="high"),
            'metrics.global.bacc is "high"',
        ),
        ("results.json", lambda r: r["comm"].update(bytes_up_per_site_per_round=[1]), "comm.bytes_up"),
        ("results.json", lambda r: r["metrics"].update(site_mean="x"), "string indices must be integers"),
    ],
    ids=[
        "results-cut",
        "results-list",
        "results-empty",
        "config-deep",
        "config-missing",
        "results-word-for-number",
        "results-list-for-number",
        "results-word-for-object",
    ],
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
    elif callable(content):  # a number edited into another type
        edited = json.loads((cell / name).read_text())
        content(edited)
        (cell / name).write_text(json.dumps(edited))
    else:
        (cell / name).write_text(content)
    capsys.readouterr()
    assert main([*args, "--report-only"]) == 2
    text = capsys.readouterr().err
    err = error_lines(text)
    assert len(err) == 1 and err[0].startswith(f"error: {cell}: its {name} is unreadable (") and why in err[0]
    assert err[0].count("unreadable") == 1, err[0]
    assert err[0].endswith("delete that cell to redo it") and "Traceback" not in text


@pytest.mark.parametrize(
    "methods, extra, stray, message",
    [
        (
            "fedmedclip,fedavg",
            ["--dp-target-epsilon", "5"],
            None,
            "fedavg (iid, seed 0): fedavg does not support record-level differential privacy",
        ),
        ("zeroshot", [], "zeroshot/iid/seed1", "zeroshot (iid, seed 1): "),
        (
            "zeroshot,fedprox@local",
            [],
            None,
            "fedprox@local (iid, seed 0): fedprox regularises toward a global",
        ),
    ],
    ids=["no-dp-sgd", "cell-not-empty", "no-global-model"],
)
def test_a_cell_the_grid_cannot_run_stops_it_before_any_cell_trains(
    tmp_path, capsys, synthetic_cache, methods, extra, stray, message
):
    """A cell the grid cannot run (fedavg has no DP-SGD; a cell's folder holds something else; fedprox with no
    global model) was refused only when its turn came, after the cells before it had trained. Every cell is checked first: one line names the
    cell and why, and no cell has run."""
    args = _one_cell_args(tmp_path, synthetic_cache)
    args[args.index("zeroshot")] = methods
    args[args.index("--seeds") + 1] = "2"
    grid = tmp_path / "grid"
    if stray:
        (grid / "runs" / stray).mkdir(parents=True)
        (grid / "runs" / stray / "notes.txt").write_text("not a run")
    assert main([*args, *extra]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: compare cell {message}"), err
    assert not extra or extra[0] in err[0]
    # A stray folder: what to do in compare's terms (engine's "pass --resume" is no flag of compare).
    assert not stray or err[0].endswith(
        "holds files but no run of it (no config.json): remove them, or give the grid another --out"
    )
    assert not list(grid.rglob("config.json"))  # nothing started


def test_the_grids_options_for_updates_are_not_applied_where_none_is_sent(tmp_path):
    """--secure-aggregation, client-level DP and the codecs protect or encode the updates the sites send: a
    reference cell (NAME@local) or zeroshot sends none, and a single `train` refuses them there. The grid
    refused them mid-way, after the cells before had trained; it runs those cells without them, as it did
    with --aggregator, and says so."""
    from fedmedclip.config import TrainConfig

    grid = ["fedmedclip", "zeroshot"]
    base = TrainConfig(
        out="",
        codec_up="int8-zlib",
        codec_down="fp32-zlib",
        secure_aggregation=True,
        secagg_threshold=3,
        privacy={"client_noise": 1.0, "client_clip": 2.0},
    ).validate()
    plans = {
        cell.label: compare._cell_config(base, cell, tmp_path, {}, grid)
        for cell in compare.build_cells(
            [("fedmedclip", "federated"), ("fedmedclip", "local"), ("zeroshot", "federated")],
            [("iid", "iid", None)],
            [0],
        )
    }
    cfg, not_applied = plans["fedmedclip"]
    assert not_applied == [] and cfg.secure_aggregation and cfg.codec_up == "int8-zlib"
    sent = ["--secure-aggregation", "--secagg-threshold 3", "--dp-client-noise 1.0", "--dp-client-clip 2.0"]
    cfg, not_applied = plans["fedmedclip@local"]
    assert not_applied == [*sent, "--codec-up int8-zlib", "--codec-down fp32-zlib"]
    assert (cfg.secure_aggregation, cfg.secagg_threshold, cfg.privacy) == (False, None, {})
    assert (cfg.codec_up, cfg.codec_down) == ("fp16-zlib", "fp16-zlib")
    cfg, not_applied = plans["zeroshot"]  # federated: its (empty) payloads still travel with the codecs
    assert not_applied == sent and cfg.codec_up == "int8-zlib"
    assert base.secure_aggregation and base.privacy == {"client_noise": 1.0, "client_clip": 2.0}

    records = [{"method": label, "not_applied": not_applied} for label, (_, not_applied) in plans.items()] + [
        {"method": "zeroshot", "not_applied": plans["zeroshot"][1]}
    ]
    note = compare.not_applied_note(records)
    assert note.count("\n") == 4 and "Not applied to fedmedclip@local (" in note
    assert "Not applied to zeroshot (" in note and "`--codec-up int8-zlib`" in note


def test_the_table_says_which_cells_ran_without_the_grids_options(
    tmp_path, synthetic_cache, one_finished_cell
):
    """The finished zero-shot cell matches a grid asking for --secure-aggregation and client-level DP (zeroshot
    sends nothing, so it runs without them; the grid was refused), and the outputs say what it ran without."""
    args = _one_cell_args(tmp_path, synthetic_cache)
    shutil.copytree(one_finished_cell, tmp_path / "grid")
    assert main([*args, "--secure-aggregation", "--dp-client-noise", "1", "--report-only"]) == 0
    table = (tmp_path / "grid" / "comparison.md").read_text()
    assert table.endswith(
        "\nNot applied to zeroshot (no update sent to the server; `train` refuses them there): "
        "`--secure-aggregation`, `--dp-client-noise 1.0`.\n"
    )
    (cell,) = json.loads((tmp_path / "grid" / "comparison.json").read_text())["cells"]
    assert cell["not_applied"] == ["--secure-aggregation", "--dp-client-noise 1.0"]


def test_a_reference_run_recorded_with_a_codec_still_resumes(tmp_path):
    """A --federation local run (or compare cell) started before its codecs were refused recorded them; they
    never acted, so it resumes, and a finished cell matches, without them."""
    from fedmedclip.config import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    old = TrainConfig(out=str(run), federation="local", codec_up="int8-zlib")
    (run / "config.json").write_text(json.dumps(old.to_json()))
    engine.check_resumable(TrainConfig(out=str(run), federation="local").validate(), run, resume=True)
    with pytest.raises(ConfigError, match="drop --codec-up"):
        old.validate()


def test_a_grid_is_not_written_into_a_train_run_or_synthetic_data_over_a_folder(
    tmp_path, capsys, synthetic_cache
):
    """`compare --out RUN` of a `train` run directory wrote its cells' runs/ into it, and `synth DIR` wrote its
    images and manifest over whatever DIR held (a run, older images left beside a new manifest). Both are
    refused in one line, the folder untouched."""
    run = tmp_path / "grid"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert main(_one_cell_args(tmp_path, synthetic_cache)) == 2
    assert "is the run directory of a `train`" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    assert main(["-q", "synth", str(run), "--per-class", "1"]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_an_interrupted_grid_says_to_rerun_the_same_command(tmp_path, monkeypatch, capsys):
    """compare has no --resume: rerunning the same command is what resumes (finished cells kept). An
    interrupted grid gave train's advice, "rerun with --resume"; train keeps it."""

    def interrupted(cfg, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train", interrupted)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(_one_cell_args(tmp_path, tmp_path / "cache")) == 130
    err = capsys.readouterr().err
    assert "rerun the same compare command" in err and "--resume" not in err, err
    train = [
        "-q",
        "train",
        "--rounds",
        "1",
        "--out",
        str(tmp_path / "run"),
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert main(train) == 130
    assert "rerun with --resume" in capsys.readouterr().err
    # a command with nothing to resume says only that it was interrupted (every one said "--resume")
    monkeypatch.setattr(cli_module, "run_command", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["methods"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_the_table_names_the_selected_round_as_the_results_do(one_finished_cell):
    """The table called the selected round "best mean site validation accuracy", results.json and the console
    "best client-mean validation accuracy" (SELECTION_BEST_VAL): one wording."""
    from fedmedclip.federation.records import SELECTION_BEST_VAL

    (results,) = one_finished_cell.rglob("results.json")
    assert json.loads(results.read_text())["metrics"]["selection"] == SELECTION_BEST_VAL
    table = " ".join((one_finished_cell / "comparison.md").read_text().split())
    assert f"(selected round: {SELECTION_BEST_VAL})" in table and "mean site validation" not in table

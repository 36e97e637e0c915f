"""The promotion options are declared once (mlops/promotion.py, PromotionPolicy): `fedmedclip promote` and
`pipeline run|submit` and `demo` take them from that one declaration (same flags, help, default and type), a
field added to it reaches both, and a budget of 0 means no budget for both (mlops/registry.py, promote)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from onnx_fixtures import make_tiny_onnx
from run_fixtures import make_run_dir

from fedmedclip.cli import build_parser
from fedmedclip.errors import ConfigError
from fedmedclip.flags import PIPELINE, PROMOTE, add_config_arguments, declared, options_from_args, setting
from mlops.promotion import PromotionPolicy

PIPELINE_COMMANDS = (("pipeline", "run"), ("pipeline", "submit"), ("demo",))


def _command(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[name]
    return parser


def _flags(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    """flag -> what the parser does with it and says about it."""
    return {
        flag: (a.dest, a.help, a.default, a.type, a.metavar, a.nargs, a.const)
        for a in parser._actions
        for flag in a.option_strings
    }


def test_promote_and_the_pipeline_take_each_promotion_option_from_its_one_declaration():
    from pipelines.cli import RunParameters, pipeline_arguments, validated_config

    parser = build_parser()
    promote = _flags(_command(parser, "promote"))
    for path in PIPELINE_COMMANDS:
        pipeline = _flags(_command(parser, *path))
        for d in declared(PromotionPolicy):
            (flag,) = d.flags
            assert promote[flag] == pipeline[flag], (path, flag)
    assert promote["--max-epsilon"][2] == 0.0 and promote["--alias"][0] == "promote_alias"
    # the pipeline's parameters are the policy's and its own
    assert issubclass(RunParameters, PromotionPolicy)

    given = ["--alias", "staging", "--allow-different-data", "--max-epsilon", "8"]
    args = parser.parse_args(["promote", "fmc", "--version", "3", *given])
    policy = options_from_args(args, PromotionPolicy)
    assert policy == PromotionPolicy("staging", False, True, 8.0)
    with pytest.raises(ConfigError, match="--max-epsilon must be a finite number"):
        PromotionPolicy(max_epsilon=float("nan"))  # as the register task makes it from its parameters
    # a negative budget is no budget anything meets: refused as the flag it is, not as every version's DP
    with pytest.raises(ConfigError, match="--max-epsilon must be at least 0.0, got -1"):
        PromotionPolicy(max_epsilon=-1.0)
    args = parser.parse_args(["pipeline", "submit", "--host", "h", *given])
    params = pipeline_arguments(args, validated_config(args))
    assert {k: params[k] for k in dataclasses.asdict(policy)} == dataclasses.asdict(policy)


def test_a_promotion_field_added_to_the_policy_reaches_both_commands():
    @dataclasses.dataclass
    class Extended(PromotionPolicy):
        min_rounds: int = setting(0, group="promotion", help="refuse a version trained in fewer rounds")

    for command in (PROMOTE, PIPELINE):
        parser = argparse.ArgumentParser(exit_on_error=False)
        add_config_arguments(parser, command, Extended)
        assert "refuse a version trained in fewer rounds" in parser.format_help(), command
        got = options_from_args(parser.parse_args(["--min-rounds", "5", "--allow-worse"]), Extended)
        assert (got.min_rounds, got.allow_worse, got.max_epsilon) == (5, True, 0.0), command


def test_a_budget_of_zero_is_no_budget(mlops_stack, tmp_path, capsys):
    """`promote`'s default --max-epsilon (0, the pipeline's default too) promotes a version trained without DP;
    a positive budget refuses it."""
    from mlops import cli as mlops_cli
    from mlops.registry import PrivacyRefused, promote, register_model
    from mlops.rundir import log_run_dir

    uri, name = mlops_stack.tracking_uri, "fmc-budget"
    run_id = log_run_dir(make_run_dir(tmp_path / "plain"), "test-budget", tracking_uri=uri)
    # with its ONNX file: a version without one is never promoted
    version = register_model(run_id, name, make_tiny_onnx(tmp_path / "model.onnx"), tracking_uri=uri).version
    with pytest.raises(PrivacyRefused, match="without record-level differential privacy"):
        promote(name, version, PromotionPolicy(max_epsilon=8.0), uri)
    assert promote(name, version, PromotionPolicy(max_epsilon=0.0), uri).alias == "champion"
    parser = argparse.ArgumentParser(prog="fedmedclip")
    mlops_cli.register(parser.add_subparsers(dest="command"))
    # (another alias: promoting the @champion version to @champion again changes nothing, and says so)
    argv = ["promote", name, "--version", version, "--alias", "staging", "--tracking-uri", uri]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert "is now @staging" in capsys.readouterr().out


def test_a_version_whose_metric_is_not_a_finite_number_is_never_promoted(mlops_stack, tmp_path):
    """Whoever may register may write a version's tags: a promotion metric of NaN compared as no worse than the
    holder's (`nan < 0.6` is False) and took the alias; a word made promote end in a traceback. Either is now no
    metric: refused as a candidate, and a holder without one is not compared without --allow-worse."""
    from mlflow import MlflowClient

    from mlops.registry import PromotionRefused, promote, register_model
    from mlops.rundir import log_run_dir
    from mlops.tracking import PROMOTION_METRIC, TrackingError

    uri, name = mlops_stack.tracking_uri, "fmc-finite"
    run_id = log_run_dir(make_run_dir(tmp_path / "plain"), "test-finite", tracking_uri=uri)
    holder = register_model(run_id, name, make_tiny_onnx(tmp_path / "model.onnx"), tracking_uri=uri)
    assert promote(name, holder.version, tracking_uri=uri).alias == "champion"
    client = MlflowClient(uri)
    experiment = client.get_run(run_id).info.experiment_id
    for value in ("nan", "inf", "high", "5.0"):
        # the holder's tags and this metric, from a run without metrics (a run's metric is read first)
        tags = {**holder.tags, PROMOTION_METRIC: value}
        run = client.create_run(experiment).info
        source = f"{run.artifact_uri}/model"
        candidate = client.create_model_version(name, source, run_id=run.run_id, tags=tags).version
        with pytest.raises(TrackingError, match=f"version {candidate} has no {PROMOTION_METRIC} from 0 to 1"):
            promote(name, candidate, tracking_uri=uri)
    assert client.get_registered_model(name).aliases["champion"] == holder.version
    client.set_registered_model_alias(name, "champion", candidate)  # a holder with such a metric
    with pytest.raises(
        PromotionRefused, match=f"version {candidate}\\) has no {PROMOTION_METRIC} from 0 to 1"
    ):
        promote(name, holder.version, tracking_uri=uri)


def test_a_privacy_budget_is_an_epsilon_and_a_delta():
    """The same run reports a smaller epsilon at a larger delta: --max-epsilon alone let a version at a looser
    delta through (q=0.14, sigma 2, 250 steps: epsilon 6.0 at delta 1e-5, 3.9 at 4e-3). --max-delta bounds it,
    and is refused without --max-epsilon."""
    from mlops.registry import PrivacyRefused, check_privacy_budget

    loose = {"dp.mode": "record", "dp.epsilon": "3.896", "dp.delta": "0.004"}
    check_privacy_budget("m", "1", loose, 4.0)  # what the gate let through
    with pytest.raises(
        PrivacyRefused, match=r"under --max-delta 1e-05: its delta 0.004 is above it \(epsilon"
    ):
        check_privacy_budget("m", "1", loose, 4.0, 1e-5)
    check_privacy_budget("m", "1", {**loose, "dp.delta": "1e-05", "dp.epsilon": "3.5"}, 4.0, 1e-5)
    # an edited tag float() still reads (whitespace, CR) is written as the number it read, the epsilon escaped
    with pytest.raises(PrivacyRefused) as refused:
        check_privacy_budget(
            "m", "1", {**loose, "dp.delta": "\r0.5\n", "dp.epsilon": "3.5" + " " * 10_000}, 4.0, 1e-5
        )
    assert "its delta 0.5 is above it" in str(refused.value) and len(str(refused.value)) < 400, refused.value
    # No delta, or a negative one (a tag edited in the registry): the message said "its delta (none) is unknown
    # 1e-05", and "-1 is above --max-delta".
    for tag, said in ((None, "None"), ("-1", "'-1'"), ("nan", "'nan'")):
        damaged = {"dp.mode": "record", "dp.epsilon": "3.5", **({"dp.delta": tag} if tag else {})}
        with pytest.raises(PrivacyRefused) as refused:
            check_privacy_budget("m", "1", damaged, 4.0, 1e-5)
        assert str(refused.value).endswith(
            f"--max-delta 1e-05: its delta {said} is unknown or not a probability"
        )
    with pytest.raises(ConfigError, match="--max-delta is half of a privacy budget: give --max-epsilon"):
        PromotionPolicy(max_delta=1e-5)
    assert PromotionPolicy(max_epsilon=4.0, max_delta=1e-5).max_delta == 1e-5


def test_promote_refuses_an_empty_alias_in_one_line(tmp_path, monkeypatch, capsys):
    """`promote --alias ''` reached MLflow (whose error said "alias name cannot be empty"): refused before any
    server is asked, in one line. The pipeline's '' (register only) is the register task's, not promote's."""
    from conftest import error_lines

    from fedmedclip.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FEDMEDCLIP_STACK_DIR", str(tmp_path / "no-stack"))  # no server to find
    assert main(["promote", "fmc", "--version", "1", "--alias", ""]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == ["error: --alias must not be empty: promote moves an alias"], err

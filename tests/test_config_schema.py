"""One declaration per configuration field (fedmedclip/flags.py): the schema snapshot, every command's flags
derived from it, and a field added in one place (the README's example) reaching every command, the pipeline's
settings, the extraction's cache key, the run manifest and the MLflow parameters."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedmedclip.config import TrainConfig
from fedmedclip.errors import ConfigError
from fedmedclip.federation.runner import SiteOptions
from fedmedclip.federation.server import ServerOptions, make_manifest
from fedmedclip.flags import (
    COMMANDS,
    COMPARE,
    PIPELINE,
    PUBLISH,
    SITE,
    TRAIN,
    add_config_arguments,
    config_from_args,
    declared,
    from_parameters,
    options_from_args,
    schema,
    setting,
    to_parameters,
)

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = Path(__file__).with_name("config_schema.json")
UPDATE = "FEDMEDCLIP_UPDATE_SCHEMA"


def test_the_schema_matches_its_snapshot():
    """Every declared field with its type, default, help, group, commands, flags, choices, whether extraction
    depends on it and how it enters the resume key: changing any of them changes this file."""
    from components.run_parameters import RunParameters
    from pipelines.pipeline import CompileOptions

    # The core's declarations, and the pipeline's own parameters and compile options.
    fresh = json.dumps(
        schema(TrainConfig, ServerOptions, SiteOptions, RunParameters, CompileOptions), indent=1
    )
    fresh += "\n"
    if os.environ.get(UPDATE):
        SNAPSHOT.write_text(fresh)
    assert SNAPSHOT.read_text() == fresh, (
        f"the configuration's declaration changed: review the diff, then `{UPDATE}=1 pytest "
        "tests/test_config_schema.py` rewrites tests/config_schema.json"
    )


def _subcommand(parser: argparse.ArgumentParser, path: str) -> argparse.ArgumentParser:
    for word in path.split():
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[word]
    return parser


def _declared_flags(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    """dest -> the flags and help of each argument (a command's own `--out` shares a field's flag, not its help)."""
    return {a.dest: (tuple(a.option_strings), a.help) for a in parser._actions}


@pytest.mark.parametrize(
    ("command", "cli"),
    [("train", "train"), ("server run", "server run"), (SITE, "site run"), (PIPELINE, "pipeline run"),
     (PIPELINE, "pipeline submit"), ("compare", "compare"), (PUBLISH, "data publish")],
)  # fmt: skip
def test_every_cli_takes_exactly_the_fields_declared_for_it(command, cli):
    """A field's flag, with its declared help, on exactly the commands it names; compare takes none for the
    fields its grid sets per cell (`grid=True`), and `site run` only the site's options."""
    from fedmedclip.cli import build_parser

    actions = _declared_flags(_subcommand(build_parser(), cli))
    for cls in (TrainConfig, ServerOptions, SiteOptions):
        for d in declared(cls):
            if d.meta["nested"] is not None:
                continue
            flags, helptext = actions.get(d.dest, ((), ""))
            derived = flags == d.flags and (helptext == d.meta["help"] or "{methods}" in d.meta["help"])
            if cls is SiteOptions and command != SITE:
                continue  # a site option shares its name (and flag) with the run's setting it stands for
            assert derived == d.takes(command), f"{cli}: {d.dest}"
            assert not (d.meta["grid"] and d.takes("compare")), d.name


def test_site_run_and_the_pipelines_sites_take_the_declared_site_options():
    """`run_site` takes each declared site option by name with its declared default; a site the pipeline
    starts takes the run's values of the same names, and `site run` checks them as declared."""
    import inspect

    from fedmedclip.cli import build_parser
    from fedmedclip.federation.runner import run_site

    parameters = inspect.signature(run_site).parameters
    for d in declared(SiteOptions):
        assert parameters[d.name].default == d.default, d.name
    cfg = TrainConfig(out="", data="s3://site-data", cache_dir="/cache", threads=3)
    got = SiteOptions.of_run(cfg, ServerOptions(join_timeout=7.0))
    assert got == SiteOptions(data="s3://site-data", cache_dir="/cache", threads=3, join_timeout=7.0)
    site_run = _subcommand(build_parser(), "site run")
    base = ["--mailbox", "m", "--run-id", "r", "--site", "s"]
    assert options_from_args(site_run.parse_args([*base, "--threads", "2"]), SiteOptions).threads == 2
    with pytest.raises(ConfigError, match="--threads must be at least 1, got 0"):
        options_from_args(site_run.parse_args([*base, "--threads", "0"]), SiteOptions)


def _readme_field() -> str:
    """The README's example of adding a field (Development, "Adding a configuration field")."""
    section = (REPO / "README.md").read_text().split("### Adding a configuration field", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _extended():
    """TrainConfig with the README's example field, and a data field, declared the way the README says."""
    body = (
        _readme_field() + '    scanner: str = setting("any", group="data", extraction=True, help="scanner")\n'
    )
    namespace = {"setting": setting, "TrainConfig": TrainConfig}
    exec("class Extended(TrainConfig):\n" + body, namespace)  # noqa: S102 (the README's own text)
    return dataclasses.dataclass(namespace["Extended"])


def test_a_field_declared_once_reaches_every_command_the_pipeline_the_manifest_and_mlflow():
    Extended = _extended()
    (new,) = [d.name for d in declared(Extended) if d.name not in {d.name for d in declared(TrainConfig)}][:1]
    flag = "--" + new.replace("_", "-")
    # every command of its group, with the declared default; `data publish` only takes the data group
    for command in COMMANDS:
        parser = argparse.ArgumentParser(exit_on_error=False)
        add_config_arguments(parser, command, Extended)
        if command in (PUBLISH, SITE):  # the data group only; a site's own options only
            assert flag not in parser.format_help()
            assert ("--scanner" in parser.format_help()) == (command == PUBLISH)
            continue
        assert flag in parser.format_help() and "--scanner" in parser.format_help(), command
        cfg = config_from_args(parser.parse_args([flag, "3", "--scanner", "ct"]), Extended)
        assert (getattr(cfg, new), cfg.scanner) == (3, "ct"), command
        assert getattr(config_from_args(parser.parse_args([]), Extended), new) == 0
    cfg = Extended(out="", **{new: 3, "scanner": "ct"}).validate()

    # the pipeline's settings, through KFP's floats, and the extraction's cache key
    from components.kfp_components import pipeline_settings, resolved_config, settings_from_parameters

    settings = pipeline_settings(cfg)
    assert settings[new] == 3
    got, _ = settings_from_parameters(json.loads(json.dumps(settings), parse_int=float), Extended)
    assert getattr(got, new) == 3 and isinstance(getattr(got, new), int)
    with pytest.raises(ConfigError, match=f"unknown key.*{new}"):
        settings_from_parameters(settings)  # the undeclared field is refused, naming it
    config, extraction = resolved_config(got)
    assert config[new] == 3 and extraction["scanner"] == "ct" and new not in extraction

    # the run manifest (its settings: the resume key) and the MLflow parameters
    from mlops.tracking import run_parameters

    setup = SimpleNamespace(
        cfg=cfg,
        partition=SimpleNamespace(sites={"site_0": {"train": [1]}}, site_names=["site_0"], digest="d"),
        backbone={},
        preprocessing={},
        class_names=["a", "b"],
    )
    manifest = make_manifest("run", setup, ServerOptions(), {}, None)
    assert manifest["settings"][new] == 3
    assert (manifest["quorum"], manifest["round_timeout"]) == (1, 600.0)  # as the server resolves them
    assert new not in Extended(out="").resume_key()  # at its default: older runs' keys still match
    assert run_parameters(cfg.to_json())[new] == "3"
    # and the schema: the snapshot would change
    assert new in schema(Extended)["Extended"] and new not in schema()["TrainConfig"]


def _subclass(base, name: str, *fields):
    return dataclasses.make_dataclass(
        name, [(f, int, declaration) for f, declaration in fields], bases=(base,)
    )


def test_a_grid_field_a_manifest_entry_and_a_site_option_are_each_declared_once():
    """The markers of a declaration: a field compare's grid sets per cell (`grid=True`) is a flag of every
    command of its group but compare; a server option declared `manifest=True` is in the run's manifest; a
    site option is a flag of `site run` and, for a site the pipeline starts, the run's value of its name."""
    grid = _subclass(TrainConfig, "Grid", ("arm", setting(0, group="training", grid=True, help="an arm")))
    for command, takes in ((TRAIN, True), (PIPELINE, True), (COMPARE, False)):
        parser = argparse.ArgumentParser()
        add_config_arguments(parser, command, grid)
        assert ("--arm" in parser.format_help()) == takes, command

    recorded = setting(2, group="server", manifest=True, help="recorded")
    options = _subclass(
        ServerOptions, "Recorded", ("kept", recorded), ("not_kept", setting(0, group="server", help="x"))
    )
    cfg = TrainConfig(out="", rounds=4).validate()
    setup = SimpleNamespace(
        cfg=cfg,
        partition=SimpleNamespace(
            sites={"a": {"train": [1]}, "b": {"train": [2]}}, site_names=["a", "b"], digest="d"
        ),
        backbone={},
        preprocessing={},
        class_names=["x", "y"],
    )
    manifest = make_manifest("run", setup, options(kept=5, quorum=None, clip_updates=1), {}, 3.0)
    assert (manifest["kept"], manifest["quorum"], manifest["max_update_norm"]) == (5, 2, 3.0)
    assert manifest["clip_updates"] is True and "not_kept" not in manifest

    site = _subclass(SiteOptions, "Site", ("rounds", setting(1, group="site", minimum=1, help="the rounds")))
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, SITE, site)
    assert options_from_args(parser.parse_args(["--rounds", "6", "--threads", "2"]), site).rounds == 6
    with pytest.raises(ConfigError, match="--rounds must be at least 1"):
        options_from_args(parser.parse_args(["--rounds", "0"]), site)
    assert site.of_run(cfg, ServerOptions()).rounds == 4  # the run's setting of that name


def test_the_pipeline_refuses_settings_of_the_wrong_type_naming_them():
    for bad, message in (
        ({"sites": "3"}, "sites must be a number"),
        ({"transductive": 1}, "transductive must be true or false"),
        ({"federation": "local"}, "unknown key"),
        ({"method_options": [1]}, "method_options must be an object"),
        ([], "must be an object of settings"),
    ):
        with pytest.raises(ConfigError, match=message):
            from_parameters(bad, TrainConfig, ServerOptions)
    assert to_parameters(ServerOptions(quorum=None)).get("quorum", "unset") == "unset"  # KFP refuses None


def test_a_bad_synthetic_argument_names_its_flag():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TRAIN, TrainConfig)
    for text, message in (
        ("{bad", "--synthetic '{bad' is not JSON"),
        ("[1]", "--synthetic '.1.' must be a JSON"),
    ):
        with pytest.raises(ConfigError, match=message):
            config_from_args(parser.parse_args(["--synthetic", text]), TrainConfig)


def test_each_field_is_validated_as_it_declares():
    for bad, message in (
        ({"rounds": 0}, "--rounds must be at least 1, got 0"),
        ({"min_class_images": "3"}, "--min-class-images must be an integer"),
        ({"alpha": float("nan")}, "--alpha must be a finite number"),
        ({"aggregator": "mode"}, "unknown aggregator 'mode'; choose one of mean, median"),
        # a NaN share passed every check and reached config.json (a traceback from json)
        (
            {"split_ratio": (float("nan"), 0.1, 0.1)},
            "--split nan,0.1,0.1 must be three train,val,test shares",
        ),
        ({"split_ratio": (0.5, 0.5, 0.5)}, "--split 0.5,0.5,0.5 must be three"),
        ({"reference_fraction": 0.5}, "--reference-fraction must be in [0, 0.5), got 0.5"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            TrainConfig(out="", **bad).validate()
    from components.kfp_components import settings_from_parameters

    for bad, message in (({"round_timeout": -1.0}, "at least 0"), ({"norm_factor": float("inf")}, "finite")):
        with pytest.raises(ConfigError, match=message):
            settings_from_parameters(bad)  # the server's options, as declared, in the pipeline's settings
    # the README's example field: its declared minimum, and its type
    Extended = _extended()
    (new,) = [d for d in declared(Extended) if d.name not in {f.name for f in declared(TrainConfig)}][:1]
    with pytest.raises(ConfigError, match=f"{new.flags[0]} must be at least {new.meta['minimum']}"):
        Extended(out="", **{new.name: new.meta["minimum"] - 1}).validate()
    with pytest.raises(ConfigError, match=f"{new.flags[0]} must be an integer"):
        Extended(out="", **{new.name: 1.5}).validate()


def test_a_true_default_is_declared_with_the_flag_that_switches_it_off():
    """A bool setting that defaults to True is switched off by its flag, so its flags must say so; the flag
    keeps that meaning whatever default a command gives the field."""
    with pytest.raises(ValueError, match="--no-"):
        setting(True, group="training", help="x")
    with pytest.raises(ValueError, match="--no-"):
        setting(True, group="training", flags=("--no-x", "--x"), help="x")

    @dataclasses.dataclass
    class Switch:
        gpu: bool = setting(True, group="training", flags=("--no-gpu",), help="x")

    for defaults in (None, {"gpu": False}):
        parser = argparse.ArgumentParser()
        add_config_arguments(parser, TRAIN, Switch, defaults=defaults)
        assert options_from_args(parser.parse_args(["--no-gpu"]), Switch).gpu is False, defaults


def test_method_options_are_key_value_pairs_with_a_key():
    from fedmedclip.flags import parse_method_options

    assert parse_method_options(["lr_fam=5e-4", "name= x ", "flag=true"]) == {
        "lr_fam": 5e-4, "name": "x", "flag": True
    }  # fmt: skip
    for bad in ("=5", "novalue"):
        with pytest.raises(ConfigError, match=f"--method-opt '{bad}' must look like KEY=VALUE"):
            parse_method_options([bad])


@pytest.mark.parametrize(
    ("method", "option", "message"),
    [
        ("fedmedclip", "lr_fam=NaN", "lr_fam=nan must be a finite number"),  # JSON's NaN
        ("fedmedclip", "lr_mlp=Infinity", "lr_mlp=inf must be a finite number"),
        ("fedmedclip", "lr_fam=nan", "lr_fam='nan' must be a finite number"),  # not JSON: a string
        ("fedmedclip", "lr_decay=-1", "lr_decay=-1 must be above 0"),
        ("fedmedclip", "kd_temperature=0", "kd_temperature=0 must be above 0"),
        ("fedmedclip", "local_epochs=0", "local_epochs=0 must be at least 1"),
        ("fedmedclip", "local_epochs=1.5", "local_epochs=1.5 must be an integer"),
        ("fedmedclip", "kd_adaptive=maybe", "kd_adaptive='maybe' must be true or false"),
        ("fedmedclip", "entropy=foo", "entropy='foo' must be one of code, shannon"),
        ("fedmedclip", "mask_rule=null", "mask_rule=None must be a string"),
        ("facmic", "local_steps=-3", "local_steps=-3 must be at least 0"),
        ("facmic", "lr=-1", "lr=-1 must be above 0"),
        ("facmic", "bandwidth=mode", "bandwidth='mode' must be one of mean, median"),
        ("fedclip", "weight_decay=-5", "weight_decay=-5 must be at least 0"),
        ("fedprox", "mu=NaN", "mu=nan must be a finite number"),
        ("moon", "tau=0", "tau=0 must be above 0"),
        ("fedfocal", "smoothing=1", "smoothing=1 must be below 1"),
    ],
)
def test_method_option_values_of_the_wrong_type_or_range_are_refused_before_any_work(method, option, message):
    """A --method-opt value is parsed as JSON: a NaN, a typo kept as a string or a negative rate used to reach
    training (a traceback from the optimiser, or a run on nonsense); each is refused naming the option."""
    from fedmedclip.flags import parse_method_options

    cfg = TrainConfig(out="", method=method, method_options=parse_method_options([option]))
    with pytest.raises(ConfigError, match=f"^{method} option {re.escape(message)} \\("):
        cfg.validate()


def test_codec_sets_both_directions_and_refuses_a_direction_it_contradicts():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)

    def codecs(*argv):
        cfg = config_from_args(parser.parse_args(list(argv)))
        return cfg.codec_up, cfg.codec_down

    assert codecs("--codec", "int8-zlib") == ("int8-zlib", "int8-zlib")
    assert codecs("--codec", "int8-zlib", "--codec-up", "int8-zlib") == ("int8-zlib", "int8-zlib")
    assert codecs("--codec-up", "delta-ef-q4-zlib", "--codec-down", "int8-zlib") == (
        "delta-ef-q4-zlib",
        "int8-zlib",
    )
    # --codec-up used to be silently overridden, even when it named the default
    for flag, value in (("--codec-up", "fp32-zlib"), ("--codec-down", "fp16-zlib")):
        with pytest.raises(
            ConfigError, match=f"--codec int8-zlib sets both directions and {flag} {value} contradicts"
        ):
            codecs("--codec", "int8-zlib", flag, value)


@pytest.mark.parametrize("command", [["train"], ["pipeline", "submit", "--host", "http://127.0.0.1:9"]])
@pytest.mark.parametrize("partition", ["iid", "natural"])
def test_alpha_is_refused_where_the_partition_ignores_it(command, partition, tmp_path, capsys):
    """--alpha is the Dirichlet concentration: with --partition iid or natural it was accepted and meant
    nothing (config.json said alpha 0.5 of a run that was not skewed). Refused in one line before any work;
    the pipeline's settings leave an unset alpha out, so a pipeline run is not refused for it."""
    from conftest import error_lines

    from fedmedclip.cli import main

    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = [*command, "--partition", partition, "--alpha", "0.5", "--rounds", "1", "--cache-dir", str(cache)]
    assert main([*argv, *(["--out", str(out)] if command == ["train"] else [])]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: --alpha 0.5 is the concentration of --partition dirichlet; --partition {partition} ignores "
        "it: drop --alpha, or use --partition dirichlet"
    ]
    assert not out.exists() and not cache.exists()
    assert TrainConfig(out="", partition="dirichlet", alpha=0.5).validate().alpha == 0.5
    assert "alpha" not in to_parameters(TrainConfig(out="").validate())


@pytest.mark.parametrize(
    ("setting", "sender"),
    [
        (["--federation", "local"], "--federation local"),
        (["--federation", "centralized"], "--federation centralized"),
        (["--method", "zeroshot"], "zeroshot"),
    ],
)
def test_a_robust_aggregator_is_refused_where_no_update_is_sent(setting, sender, tmp_path, capsys):
    """--aggregator median with --federation local (each site alone), centralized (one pooled holder) or a
    method that sends nothing was accepted and meant nothing: there are no updates to combine. Refused in one
    line before any work. `compare`'s --aggregator applies to the grid's cells that aggregate, so a grid with
    the local reference or zeroshot is not refused for it."""
    from conftest import error_lines

    from fedmedclip.cli import main

    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["train", *setting, "--aggregator", "median", "--rounds", "1", "--cache-dir", str(cache)]
    assert main([*argv, "--out", str(out)]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: --aggregator median combines the updates the sites send to the server; {sender} sends none: "
        "drop --aggregator"
    ]
    assert not out.exists() and not cache.exists()
    grid = ["compare", "--methods", "fedmedclip,fedmedclip@local,fedmedclip@centralized,zeroshot"]
    argv = [*grid, "--partitions", "iid", "--seeds", "1", "--aggregator", "median", "--report-only"]
    assert main([*argv, "--out", str(out)]) == 2  # nothing run yet, and nothing refused
    assert error_lines(capsys.readouterr().err) == [f"error: no finished cell of this grid under {out}"]


@pytest.mark.parametrize(
    "run", [{"federation": "local"}, {"federation": "centralized"}, {"method": "zeroshot"}]
)
def test_an_option_validate_refuses_where_nothing_is_sent_is_one_drop_unsent_drops(run, tmp_path):
    """validate() refuses, and drop_unsent() (compare's cells) resets, the same options from one list: each
    option the run cannot use is refused alone and dropped alone, after which the run validates; each it can
    use is neither."""
    unsent_somewhere = {
        "aggregator": "median",
        "secure_aggregation": True,
        "privacy": {"client_noise": 1.0, "client_clip": 0.5},
        "codec_up": "int8-zlib",
        "codec_down": "fp32-zlib",
    }
    refused = []
    for name, value in unsent_somewhere.items():
        cfg = TrainConfig(out=str(tmp_path), sites=3, **run, **{name: value})
        try:
            TrainConfig(**dataclasses.asdict(cfg)).validate()
        except ConfigError as exc:
            refused.append(name)
            assert "sends no" in str(exc), exc
            assert cfg.drop_unsent() and getattr(cfg, name) != value
        else:
            assert cfg.drop_unsent() == []
        cfg.validate()
    federated = run.get("federation", "federated") == "federated"  # zeroshot's empty payloads use the codecs
    assert refused == [
        "aggregator",
        "secure_aggregation",
        "privacy",
        *([] if federated else ["codec_up", "codec_down"]),
    ]


@pytest.mark.parametrize("federation", ["local", "centralized"])
def test_a_codec_is_refused_where_nothing_travels(federation, tmp_path, capsys):
    """--codec-up / --codec-down with --federation local (each site alone) or centralized (one pooled holder)
    were accepted and meant nothing: no update travels. Refused as --aggregator is, in one line before any
    work; the default codecs, which every stored configuration names, still run."""
    from conftest import error_lines

    from fedmedclip.cli import main

    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = f"train --federation {federation} --rounds 1 --cache-dir {cache} --out {out}".split()
    up = "the updates the sites send to the server"
    for given, flag, codec, what in (
        (["--codec-up", "int8-zlib"], "--codec-up", "int8-zlib", up),
        (["--codec-down", "fp32-zlib"], "--codec-down", "fp32-zlib", "the global module sent to the sites"),
        (["--codec", "int8-zlib"], "--codec-up", "int8-zlib", up),
    ):
        assert main([*argv, *given]) == 2
        assert error_lines(capsys.readouterr().err) == [
            f"error: {flag} {codec} encodes {what}; --federation {federation} sends none: drop {flag} "
            "(--codec sets it too)"
        ]
    assert not out.exists() and not cache.exists()
    assert TrainConfig(out="", federation=federation, codec_up="fp16-zlib", codec_down="fp16-zlib").validate()
    assert (
        TrainConfig(out="", codec_up="int8-zlib", codec_down="fp32-zlib").validate().codec_down == "fp32-zlib"
    )


@pytest.mark.parametrize(("method", "federation"), [("fedprox", "local"), ("moon", "centralized")])
def test_a_method_that_needs_a_global_model_is_refused_a_reference_before_any_work(
    method, federation, tmp_path, capsys
):
    """fedprox and moon regularise toward the round's global model, which --federation local|centralized do
    not have: the run was refused only when it started training, after feature extraction (and in `compare`,
    after the cells before it had trained), leaving a run folder that needed --resume or deleting."""
    from conftest import error_lines

    from fedmedclip.cli import main

    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = f"train --method {method} --federation {federation} --rounds 1 --cache-dir {cache}".split()
    assert main([*argv, "--out", str(out)]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: {method} regularises toward a global model, which --federation {federation} does not have; "
        "use fedavg for the local/centralized reference of the fine-tuning baselines"
    ]
    assert not out.exists() and not cache.exists()
    assert TrainConfig(out="", method="fedavg", federation=federation).validate()


@pytest.mark.parametrize(
    ("synthetic", "message"),
    [
        ({"nope": 1}, "--synthetic: unknown option(s) 'nope'; the generator takes sites, per_class_per_site"),
        ({"out_dir": "x"}, "--synthetic: unknown option(s) 'out_dir'"),
        ({"seed": "x"}, "--synthetic: seed must be an integer of at least 0, got 'x'"),
        ({"seed": 1.5}, "--synthetic: seed must be an integer of at least 0, got 1.5"),
        ({"seed": -1}, "--synthetic: seed must be an integer of at least 0, got -1"),
        ({"size": True}, "--synthetic: size must be an integer from 8 to 4096, got True"),
        (
            {"per_class_per_site": 0},
            "--synthetic: per_class_per_site must be an integer from 1 to 100000, got 0",
        ),
    ],
)
def test_a_synthetic_option_the_generator_does_not_take_is_refused_before_any_work(
    synthetic, message, tmp_path, capsys
):
    """An unknown --synthetic key was a TypeError traceback from generate() (after config.json was written, and
    after `pipeline run --local` had started), leaving an empty temporary folder in the cache; a string or a
    fractional seed a TypeError. The keys and their bounds are generate()'s own declaration."""
    from conftest import error_lines

    from fedmedclip.cli import main
    from fedmedclip.synthetic import arguments, generate

    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(out="", synthetic=synthetic).validate()
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["train", "--synthetic", json.dumps(synthetic), "--rounds", "1", "--cache-dir", str(cache)]
    assert main([*argv, "--out", str(out)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: {message}")
    assert not out.exists() and not cache.exists()
    import inspect

    assert list(arguments()) == list(inspect.signature(generate).parameters)[1:]
    # the pipeline's settings give integers back as floats: still the generator's integers
    (cfg,) = from_parameters({"synthetic": {"size": 16.0, "seed": 3.0}}, TrainConfig)
    assert cfg.validate().synthetic == {"size": 16, "seed": 3}


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_a_json_flag_refuses_numbers_json_cannot_hold_naming_the_flag(number, tmp_path, capsys):
    """Python's json reads NaN, Infinity and 1e400 (an infinite float): --synthetic '{"size": NaN}' reached
    config.json's writing (a traceback: out of range float values are not JSON compliant), and `pipeline run
    --local` a protobuf SerializeToJsonError. Refused where the flag's JSON is read."""
    from conftest import error_lines

    from fedmedclip.cli import main
    from fedmedclip.flags import parse_json_object

    text = f'{{"per_class_per_site": {number}}}'
    message = f"--synthetic '{text}': {number} is not a JSON number; give a finite number"
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_json_object(text)
    for command in (["train", "--out", str(tmp_path / "run")], ["pipeline", "run", "--local"]):
        cache = tmp_path / "cache"
        assert main([*command, "--synthetic", text, "--rounds", "1", "--cache-dir", str(cache)]) == 2
        assert error_lines(capsys.readouterr().err) == [f"error: {message}"]
        assert not (tmp_path / "run").exists() and not cache.exists()
    assert parse_json_object('{"size": 16, "seed": 1e2}') == {"size": 16, "seed": 100.0}


def test_a_negative_or_fractional_seed_is_refused_before_any_work(tmp_path, capsys):
    """--seed -1 was numpy's ValueError traceback from the partition's draw (after config.json was written), and
    `fedmedclip synth DIR --seed -1` the same from the generator; the seed's minimum is declared."""
    from conftest import error_lines

    from fedmedclip.cli import main

    assert declared_field("seed").meta["minimum"] == 0
    for bad, message in (
        (-1, "--seed must be at least 0, got -1"),
        (1.5, "--seed must be an integer, got 1.5"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            TrainConfig(out="", seed=bad).validate()
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["train", "--seed", "-1", "--rounds", "1", "--cache-dir", str(cache), "--out", str(out)]) == 2
    assert error_lines(capsys.readouterr().err) == ["error: --seed must be at least 0, got -1"]
    assert not out.exists() and not cache.exists()
    assert main(["-q", "synth", str(tmp_path / "synth"), "--seed", "-1"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: synthetic data: seed must be an integer of at least 0, got -1"
    ]
    assert not (tmp_path / "synth").exists()
    assert TrainConfig(out="", seed=0).validate().seed == 0


def declared_field(name: str):
    return next(d for d in declared(TrainConfig) if d.name == name)


@pytest.mark.parametrize(
    "template", ["{} {x}", "{} {0}", "{} }", "{} {", "{}{}", "{0}", "{!r}", "{:d}", "mri"]
)
def test_a_prompt_template_needs_exactly_one_replacement_field(template, tmp_path, capsys):
    """'{} {x}' was a KeyError traceback where the prompts were formatted, '{} {0}', '{} }', '{} {' and '{}{}'
    a ValueError or an IndexError: refused up front, naming --prompt-template."""
    from conftest import error_lines

    from fedmedclip.cli import main

    message = f"--prompt-template {template!r} must hold exactly one '{{}}' (the class name)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(out="", prompt_template=template).validate()
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["train", "--prompt-template", template, "--rounds", "1", "--cache-dir", str(cache)]
    assert main([*argv, "--out", str(out)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: {message}")
    assert not out.exists() and not cache.exists()
    for good in ("a brain MRI showing {}", "{}", "{{literal}} {} scan"):
        assert TrainConfig(out="", prompt_template=good).validate().prompt_template == good


def test_a_sites_count_the_natural_partition_contradicts_is_refused(tmp_path, capsys):
    """--partition natural trains the sites the manifest names: with --sites 5 and a manifest of 3 sites the run
    trained 3 while config.json (and the run manifest, MLflow) recorded 5. Refused where the manifest's sites
    are known, as --alpha is where the partition ignores it; a matching --sites runs."""
    from conftest import error_lines

    from fedmedclip.cli import main
    from fedmedclip.preparation import checked_partition
    from fedmedclip.synthetic import generate

    manifest = generate(tmp_path / "data", sites=3, per_class_per_site=12, test_per_class=3, size=8)
    message = (
        "--sites 5, but --partition natural trains the 3 site(s) the data names (site_0, site_1, site_2): pass "
        "--sites 3, or another --partition"
    )
    cfg = TrainConfig(out="", data=str(manifest), partition="natural", sites=5, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        checked_partition(cfg.validate())
    cfg.sites = 3
    assert checked_partition(cfg.validate())[1].site_names == ["site_0", "site_1", "site_2"]
    argv = ["train", "--data", str(manifest), "--partition", "natural", "--sites", "5", "--rounds", "1"]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: {message}"]


def test_a_flag_spelled_other_than_its_field_declares_the_metavar_it_shows():
    """`train --help` showed `--split SPLIT_RATIO`: argparse names a flag's value after its field, an internal
    name where the flag is spelled otherwise (--split for split_ratio); such a field declares its metavar."""
    from fedmedclip.cli import build_parser

    for cls in (TrainConfig, ServerOptions, SiteOptions):
        for d in declared(cls):
            if d.type is bool or d.meta["choices"] is not None:
                continue  # no value, or argparse shows the choices
            for flag in d.flags:
                shown = d.meta["metavar"] or d.dest.upper()
                assert shown != d.dest.upper() or flag[2:].replace("-", "_") == d.dest, (flag, shown)
    usage = _subcommand(build_parser(), "train").format_usage()
    assert "[--split TRAIN,VAL,TEST]" in usage and "[--codec CODEC]" in usage, usage

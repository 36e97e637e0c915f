"""Limits declared once and refused before any work: each value below was accepted and then crashed, hung, ran
forever, allocated hundreds of GiB or ran on nonsense (a traceback, or a silently wrong run). Each refusal is one
line naming the flag (or the pipeline's settings key) and the problem, and comes before anything is written.
Parse-level throughout: nothing here reads data or trains."""

from __future__ import annotations

import json
import re

import pytest
from conftest import error_lines

from fedmedclip.config import TrainConfig
from fedmedclip.errors import ConfigError
from fedmedclip.flags import check_declared, declared, from_parameters


def _train(tmp_path, *argv: str) -> list[str]:
    """`fedmedclip train ...` with the run and cache under tmp_path: its exit status must be 2 and nothing made."""
    from fedmedclip.cli import main

    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["train", "--out", str(out), "--cache-dir", str(cache), *argv]) == 2
    assert not out.exists() and not cache.exists()
    return []


def _refused(capsys) -> str:
    (line,) = error_lines(capsys.readouterr().err)
    return line


def _settings(settings: dict):
    from components.kfp_components import settings_from_parameters

    return settings_from_parameters(settings)


# ----------------------------------------------------------------------------------------------- 1, 11: maxima
def test_threads_and_rounds_have_declared_maxima_refused_before_anything_is_written(tmp_path, capsys):
    """--threads 1000000 crashed torch after config.json was written (5000 hung); --rounds 10**30 ran until
    stopped. Both maxima are declared: in the schema and the help, and refused naming the flag."""
    from fedmedclip.flags import MAX_THREADS

    fields = {d.name: d for d in declared(TrainConfig)}
    assert fields["threads"].meta["maximum"] == MAX_THREADS == 1024
    assert fields["rounds"].meta["maximum"] == 100_000
    assert "at most 1024" in fields["threads"].meta["help"]
    _train(tmp_path, "--threads", "1000000")
    assert _refused(capsys) == "error: --threads must be at most 1024, got 1000000"
    _train(tmp_path, "--rounds", str(10**30))
    assert _refused(capsys) == f"error: --rounds must be at most 100000, got {10**30}"
    with pytest.raises(ConfigError, match="--threads must be at most 1024"):
        _settings({"threads": 5000})


def test_a_resumed_run_asking_for_too_many_threads_keeps_its_config(tmp_path, capsys):
    """`--resume --threads 1000000` on a finished run rewrote its config.json before crashing."""
    from fedmedclip.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"kept": true}')
    argv = [
        "train",
        "--resume",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "c"),
        "--threads",
        "1000000",
    ]
    assert main(argv) == 2
    assert _refused(capsys) == "error: --threads must be at most 1024, got 1000000"
    assert (out / "config.json").read_text() == '{"kept": true}'


# ---------------------------------------------------------------------------------------- 2: huge integers
def test_one_finite_number_check_handles_integers_beyond_a_float():
    from fedmedclip.flags import is_finite_number

    assert is_finite_number(1) and is_finite_number(1e308) and is_finite_number(10**308)
    for value in (10**400, -(10**400), float("nan"), float("inf"), True, "1", None):
        assert not is_finite_number(value), value


def test_a_huge_integer_in_a_method_option_is_refused_naming_it():
    """400 digits: OverflowError from math.isfinite; 5000: json's ValueError 'Exceeds the limit (4300 digits)'."""
    from fedmedclip.flags import parse_method_options

    for digits in (400, 5000):
        with pytest.raises(
            ConfigError, match=rf"^--method-opt lr_fam=.*an integer of {digits} digits is beyond"
        ):
            parse_method_options(["lr_fam=" + "1" * digits])
    # from the pipeline's settings (Python's integers, not JSON text): the option's own check
    with pytest.raises(ConfigError, match=r"^fedmedclip option lr_fam=1000.*\.\.\. must be a finite number"):
        TrainConfig(out="", method_options={"lr_fam": 10**400}).validate()
    assert parse_method_options(["local_epochs=" + "9" * 300]) == {"local_epochs": int("9" * 300)}


def test_a_huge_integer_in_the_pipeline_settings_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match=r"^--dp-target-epsilon must be a positive number, got 1000"):
        _settings({"privacy": {"target_epsilon": 10**400}})
    with pytest.raises(ConfigError, match=r"^--alpha must be a finite number, got 1000"):
        _settings({"partition": "dirichlet", "alpha": 10**400})
    with pytest.raises(ConfigError, match=r"^--synthetic .*an integer of 5000 digits is not a JSON number"):
        from fedmedclip.flags import parse_json_object

        parse_json_object('{"seed": ' + "1" * 5000 + "}")


# --------------------------------------------------------------------------------- 3: pipeline compile limits
@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["worker=²"], r"--timeout worker=²: give one of .* whole seconds from 1 to 2147483647"),
        (["worker=0"], r"--timeout worker=0: .*from 1 to 2147483647"),
        (["worker=" + "9" * 400], r"--timeout worker=9{21}\.\.\.: .*from 1 to 2147483647"),
        (["worker=" + "9" * 5000], r"--timeout worker=9{21}\.\.\.: "),
        (["worker=2147483648"], r"--timeout worker=2147483648: "),
        (["worker=10", "worker=20"], r"--timeout worker is given twice \('10' and '20'\): give it once"),
    ],
)
def test_a_task_timeout_is_whole_ascii_seconds_within_kubernetes_range_given_once(items, message):
    from pipelines.pipeline import parse_timeouts

    with pytest.raises(ConfigError, match=message):
        parse_timeouts(items)
    assert parse_timeouts(["worker=2147483647"])["worker"] == 2**31 - 1


def test_worker_retries_have_a_declared_maximum():
    from pipelines.pipeline import CompileOptions

    with pytest.raises(ConfigError, match=f"--worker-retries must be at most 100, got {10**12}"):
        check_declared(CompileOptions(worker_retries=10**12))
    check_declared(CompileOptions(worker_retries=100))


# ------------------------------------------------------------------------------- 4: the accountants' limits
@pytest.mark.parametrize(
    ("privacy", "message"),
    [
        ({"noise_multiplier": 0.001, "accountant": "pld"}, "--dp-noise-multiplier 0.001 is below 0.2"),
        ({"noise_multiplier": 0.05, "accountant": "pld"}, "--dp-noise-multiplier 0.05 is below 0.2"),
        ({"target_epsilon": 1e30, "accountant": "pld"}, "--dp-target-epsilon 1e+30 is above 100"),
    ],
)
def test_pld_refuses_what_it_cannot_compose_naming_it_and_rdp(privacy, message):
    """pld at noise 0.001 asked for 301 GiB, at 0.05 took 4.6 GB; a target of 1e30 calibrated toward ever
    smaller noise (6 GB and counting). rdp composes all three."""
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        TrainConfig(out="", privacy=privacy).validate()
    assert "pld accountant" in str(refused.value) and "--dp-accountant rdp" in str(refused.value)
    TrainConfig(out="", privacy={**privacy, "accountant": "rdp"}).validate()


def test_a_pld_plan_beyond_its_grid_is_refused_before_training():
    """1000 unsampled steps at noise 1 is a 16-million-point grid (2.7 GB): refused when the site plans, before it
    trains, from dp-accounting's own bounds (no grid built); rdp plans it."""
    from fedmedclip.privacy.accounting import AccountantLimitError, plan_site
    from fedmedclip.privacy.settings import PrivacySettings

    pld = PrivacySettings(noise_multiplier=1.0, accountant="pld")
    with pytest.raises(AccountantLimitError, match="the pld accountant cannot compose 1,000 steps .*rdp"):
        plan_site(pld, n_train=100, batch_size=100, steps_per_round=100, rounds=10)
    plan = plan_site(
        PrivacySettings(noise_multiplier=1.0), n_train=100, batch_size=100, steps_per_round=100, rounds=10
    )
    assert plan.planned_steps == 1000


def test_pld_refuses_client_level_rounds_it_cannot_compose_up_front():
    """Client-level DP composes one Gaussian per round: with pld, 10000 rounds at z 0.5 is a grid beyond its
    limits, refused naming --dp-client-noise before any work (it was composed at the end of each round)."""
    privacy = {"client_noise": 0.5, "noise_multiplier": 1.0, "accountant": "pld"}
    with pytest.raises(
        ConfigError, match=r"^the pld accountant cannot compose 10,000 steps at --dp-client-noise 0\.5"
    ):
        TrainConfig(out="", rounds=10_000, privacy=privacy).validate()
    TrainConfig(out="", rounds=10, privacy=privacy).validate()


# ------------------------------------------------------------------------------------------- 5, 9: compare
def test_compare_seeds_have_a_declared_maximum(tmp_path, capsys):
    """--seeds 1000000000 was a MemoryError, 10**30 an OverflowError."""
    from fedmedclip.cli import main

    for seeds in (str(10**30), "1001"):
        argv = [
            "compare",
            "--seeds",
            seeds,
            "--out",
            str(tmp_path / "grid"),
            "--cache-dir",
            str(tmp_path / "c"),
        ]
        assert main(argv) == 2
        assert _refused(capsys) == f"error: --seeds must be from 1 to 1000, got {seeds}"
    assert not (tmp_path / "grid").exists()


def test_compare_refuses_a_partition_named_twice():
    """dirichlet:0.5,dirichlet:0.50 ran one cell twice and showed its spread as ± 0.0."""
    from fedmedclip.compare import parse_partitions

    for spec in ("dirichlet:0.5,dirichlet:0.50", "iid,iid", "dirichlet:0.5,dirichlet:0.5000001"):
        with pytest.raises(ConfigError, match=r"^--partitions names .* twice"):
            parse_partitions(spec)
    with pytest.raises(ConfigError, match="must be a finite number"):
        parse_partitions("dirichlet:nan")
    assert [p[0] for p in parse_partitions("iid,dirichlet:0.5")] == ["iid", "dirichlet:0.5"]


# --------------------------------------------------------------------------------- 6, 11: method options
@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("fedmedclip", {"dp_mlp_depth": 100000}, "dp_mlp_depth=100000 must be at most 16"),
        ("fedmedclip", {"local_epochs": 10**9}, "local_epochs=1000000000 must be at most 1,000"),
        ("fedmedclip", {"dp_epochs": 1e30}, "dp_epochs=1e+30 must be at most 1,000"),
        ("fedmedclip", {"dp_batch_size": 10**9}, "dp_batch_size=1000000000 must be at most 1,000,000"),
        ("facmic", {"local_steps": 10**9}, "local_steps=1000000000 must be at most 100,000"),
        (
            "fedavg",
            {"local_epochs": 10**9, "local_steps": 0},
            "local_epochs=1000000000 must be at most 1,000",
        ),
        ("fedclip", {"local_epochs": 10**9}, "local_epochs=1000000000 must be at most 1,000"),
    ],
)
def test_method_options_that_size_the_work_have_declared_maxima(method, options, message):
    """dp_mlp_depth=100000 grew to 7 GB, then a RuntimeError; local_epochs=1000000000 ran forever."""
    with pytest.raises(ConfigError, match=f"^{method} option {re.escape(message)}"):
        TrainConfig(out="", method=method, method_options=options).validate()


# ---------------------------------------------------------------------------- 7, 8: the pipeline's settings
@pytest.mark.parametrize(
    "key",
    ["rounds", "batch_size", "threads", "partition", "aggregator", "duplicates", "seed", "data", "backbone"],
)
def test_null_in_the_pipeline_settings_is_refused_unless_the_field_allows_none(key):
    """Each passed validation and failed inside a task (or ran with seed null); data null was an AttributeError."""
    with pytest.raises(ConfigError, match=f"^settings {key} is null: give a value, or leave {key} out"):
        _settings({key: None})


def test_null_is_refused_where_none_is_no_value_and_kept_where_it_is_unset():
    with pytest.raises(ConfigError, match="^settings reference_fraction is null"):  # was a TypeError
        _settings({"reference_fraction": None})
    with pytest.raises(ConfigError, match=r"^--rounds has no value \(None\)"):
        TrainConfig(out="", rounds=None).validate()
    with pytest.raises(ConfigError, match=r"^--dp-delta has no value \(null\)"):
        _settings({"privacy": {"delta": None}})
    cfg, options = _settings({"alpha": None, "classes": None, "quorum": None, "secagg_threshold": None})
    assert (cfg.alpha, cfg.classes, options.quorum, cfg.secagg_threshold) == (None, None, None, None)


def test_classes_in_the_pipeline_settings_are_a_list_or_the_flags_text():
    """ "a,b" became ['a', ',', 'b']; 5 was a TypeError."""
    (cfg,) = from_parameters({"classes": "a,b"}, TrainConfig)
    assert cfg.classes == ["a", "b"]
    (cfg,) = from_parameters({"classes": ["a", "b"]}, TrainConfig)
    assert cfg.classes == ["a", "b"]
    for bad in (5, ["a", 3], {"a": 1}):
        with pytest.raises(ConfigError, match="^settings classes must be a list of strings"):
            from_parameters({"classes": bad}, TrainConfig)


# ------------------------------------------------------------------------------------- 10: client DP noise
def test_client_noise_the_codec_cannot_carry_is_refused_naming_both():
    """--dp-client-noise 1e30 failed every round ('overflows fp16') and the run still exited 0."""
    with pytest.raises(
        ConfigError, match=r"^--dp-client-noise 1e\+30 x --dp-client-clip 1: .*--codec-down fp16-zlib"
    ):
        TrainConfig(out="", privacy={"client_noise": 1e30}).validate()
    at_sites = {"client_noise": 1e4, "client_noise_at": "sites"}
    with pytest.raises(ConfigError, match="cannot travel in --codec-up fp16-zlib"):
        TrainConfig(out="", privacy=at_sites).validate()
    wide = {"codec_up": "fp32-zlib", "codec_down": "fp32-zlib"}
    TrainConfig(out="", privacy=at_sites, **wide).validate()
    TrainConfig(out="", privacy={"client_noise": 1.0}).validate()


# ---------------------------------------------------------------------------------- 12: robust aggregators
@pytest.mark.parametrize("aggregator", ["krum", "median", "trimmed-mean"])
def test_a_robust_aggregator_needs_three_sites(aggregator):
    """With fewer it silently was the mean."""
    with pytest.raises(
        ConfigError, match=f"^--aggregator {aggregator} needs 3 or more sites, and --sites gives 2"
    ):
        TrainConfig(out="", sites=2, aggregator=aggregator).validate()
    TrainConfig(out="", sites=3, aggregator=aggregator).validate()
    TrainConfig(out="", sites=2, aggregator="mean").validate()


def test_a_robust_aggregator_over_a_natural_partition_of_two_sites_is_refused():
    """The data names a natural partition's sites, so the count is checked once the partition is drawn."""
    from fedmedclip.data import ImageRecord, ImageSet
    from fedmedclip.preparation import partition_for

    records = [ImageRecord(f"t/{i}.png", f"/x/t/{i}.png", "ab"[i % 2], "test") for i in range(4)]
    records += [
        ImageRecord(f"{s}/{i}.png", f"/x/{s}/{i}.png", "ab"[i % 2], "train", s)
        for s in ("h1", "h2")
        for i in range(20)
    ]
    images = ImageSet(["a", "b"], records, "/x")
    cfg = TrainConfig(out="", partition="natural", sites=None, aggregator="median")
    cfg.validate()
    with pytest.raises(
        ConfigError, match="^--aggregator median needs 3 or more sites, and --partition natural gives 2"
    ):
        partition_for(cfg, images)
    assert partition_for(TrainConfig(out="", partition="natural", sites=None), images).site_names == [
        "h1",
        "h2",
    ]


# ------------------------------------------------------------------------------------ 14: synthetic totals
def test_the_synthetic_generator_caps_its_total_images_and_pixels():
    """Each keyword within its bounds made up to 25.6 million 4096^2 images together."""
    from fedmedclip.synthetic import check_arguments

    with pytest.raises(
        ConfigError, match=r"^--synthetic: 3 sites .* make 1,200,120 images .* at most 200,000"
    ):
        TrainConfig(out="", synthetic={"per_class_per_site": 100000}).validate()
    with pytest.raises(ConfigError, match="at most 200,000 images and 2,147,483,648 pixels"):
        check_arguments({"size": 4096})
    with pytest.raises(ConfigError, match=r"^--synthetic with --sites: 64 sites"):
        TrainConfig(out="", sites=64, synthetic={"per_class_per_site": 1000}).validate()
    check_arguments({"size": 1024, "per_class_per_site": 80})


# ------------------------------------------------------------------------ 15: empty texts, repeated keys
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--codec", ""], "error: unknown codec '' for --codec; choose one of "),
        (["--data", ""], "error: --data must not be empty"),
        (["--backbone", ""], "error: --backbone must not be empty"),
    ],
)
def test_an_empty_text_flag_is_refused(tmp_path, capsys, argv, message):
    _train(tmp_path, *argv)
    assert _refused(capsys).startswith(message)


def test_an_empty_out_or_cache_dir_is_refused(tmp_path, capsys, monkeypatch):
    """--out "" became the working folder, --cache-dir "" wrote into it."""
    from fedmedclip.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", "", "--cache-dir", str(tmp_path / "c")]) == 2
    assert _refused(capsys) == "error: --out must not be empty"
    assert main(["train", "--out", str(tmp_path / "run"), "--cache-dir", ""]) == 2
    assert (
        _refused(capsys)
        == "error: --cache-dir must not be empty: give a value, or leave it out for its default"
    )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="^--data must not be empty"):
        _settings({"data": ""})


def test_a_key_given_twice_is_refused(tmp_path, capsys):
    from fedmedclip.flags import parse_json_object, parse_method_options

    with pytest.raises(ConfigError, match=r"^--method-opt lr_fam is given twice \('1' and '2'\)"):
        parse_method_options(["lr_fam=1", "lr_fam=2"])
    with pytest.raises(ConfigError, match="key 'size' is given twice"):
        parse_json_object(json.dumps({"size": 16})[:-1] + ', "size": 32}')
    _train(tmp_path, "--method-opt", "local_epochs=1", "--method-opt", "local_epochs=2")
    assert _refused(capsys) == "error: --method-opt local_epochs is given twice ('1' and '2'): give it once"


# ------------------------------------------------------------------------------------ 16: late refusals
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quorum", "0"], "error: --quorum must be at least 1, got 0"),
        (["--max-epsilon", "nan"], "error: --max-epsilon must be a finite number, got nan"),
        (["--timeout", "worker=0"], "error: --timeout worker=0: give one of "),
        # a registered model or experiment named "": refused by MLflow after the whole run had trained
        (["--model-name", ""], "error: --model-name must not be empty"),
        (["--experiment", ""], "error: --experiment must not be empty"),
    ],
)
def test_pipeline_run_refuses_its_options_before_making_the_pipeline_root(tmp_path, capsys, argv, message):
    from fedmedclip.cli import main

    root = tmp_path / "root"
    assert main(["pipeline", "run", "--local", "--pipeline-root", str(root), *argv]) == 2
    captured = capsys.readouterr()
    (line,) = error_lines(captured.err)
    assert line.startswith(message)
    assert not root.exists() and "tracking:" not in captured.out


def test_the_secure_aggregation_threshold_has_a_minimum_whatever_the_partition():
    """--partition natural skipped the threshold's check until the data was read."""
    natural = {"out": "", "partition": "natural", "secure_aggregation": True}
    with pytest.raises(ConfigError, match="^--secagg-threshold must be at least 1, got -5"):
        TrainConfig(**natural, secagg_threshold=-5).validate()
    with pytest.raises(
        ConfigError, match="^--secagg-threshold 1 must be above half the sites, so at least 2"
    ):
        TrainConfig(**natural, secagg_threshold=1).validate()
    TrainConfig(**natural, secagg_threshold=2).validate()


# ------------------------------------------------------------------------------------- 17: serve's maxima
@pytest.mark.parametrize(
    ("cls", "field", "flag", "most"),
    [
        ("ServerOptions", "json_workers", "--json-workers", 64),
        ("ModelOptions", "decode_threads", "--decode-threads", 1024),
        ("ModelOptions", "ort_threads", "--ort-threads", 1024),
        ("Batching", "batch_concurrency", "--batch-concurrency", 64),
    ],
)
def test_serve_options_that_start_threads_or_processes_have_declared_maxima(cls, field, flag, most):
    import serving.options as options

    with pytest.raises(ConfigError, match=f"^{flag} must be at most {most}, got 1000000$"):
        getattr(options, cls)(**{field: 1_000_000})
    getattr(options, cls)(**{field: most})
    (d,) = [d for d in declared(getattr(options, cls)) if d.name == field]
    assert d.meta["maximum"] == most and f"at most {most}" in d.meta["help"]


def test_every_text_setting_is_refused_empty_unless_it_declares_what_empty_means():
    """One rule, in the declaration: a text setting defaulting to "" must say so (empty=True) and every other
    text setting of every declared class refuses "" where check_declared runs."""
    from components.run_parameters import RunParameters
    from fedmedclip.flags import setting
    from serving.options import ServerOptions as ServeOptions

    with pytest.raises(ValueError, match='defaults to "" declares empty=True'):
        setting("", group="output", help="x")
    may_be_empty = {d.name for cls in (TrainConfig, RunParameters) for d in declared(cls) if d.meta["empty"]}
    assert may_be_empty == {"out", "promote_alias", "site_names", "mailbox", "export_site", "tracking_uri"}
    for build, flag in (
        (lambda: RunParameters(model_name=""), "--model-name"),
        (lambda: ServeOptions(host=""), "--host"),
        (lambda: TrainConfig(out="", prompt_template="").validate(), "--prompt-template"),
    ):
        with pytest.raises(ConfigError, match=f"^{flag} must not be empty"):
            build()
    assert RunParameters(promote_alias="", export_site="").promote_alias == ""  # '' means register only

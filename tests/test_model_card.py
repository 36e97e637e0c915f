"""Model cards (fedmedclip/model_card.py, mlops/model_card.py) and privacy in the registry, against a real
MLflow server: every registered version gets a card with the required sections, logged beside its model and
printed by `fedmedclip card NAME@ALIAS`; the version carries the privacy facts as tags, the exported ONNX
carries them in its metadata, and `promote --max-epsilon` refuses a version above the budget or without DP."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from conftest import SYNTH
from run_fixtures import make_run_dir

from fedmedclip import engine
from fedmedclip.config import TrainConfig
from fedmedclip.digests import META_MODEL_DIGEST, META_PRIVACY, model_dir_digest
from fedmedclip.export import export_onnx
from fedmedclip.metrics import metrics_from_confusion
from fedmedclip.model_card import SECTIONS, build_card, render_markdown
from mlops import cli as ccli
from mlops.promotion import PromotionPolicy
from mlops.registry import PrivacyRefused, promote, register_model
from mlops.rundir import log_run_dir
from mlops.tracking import TrackingError

TARGET = 6.0
# A site's DP-SGD ledger as results.json records it (privacy.record_level.sites)
LEDGER = {"epsilon": 5.5, "noise_multiplier": 1.1, "steps": 8, "sample_rate": 0.2, "stopped_at_round": None}


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="fedmedclip")
    ccli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture(scope="module")
def dp_run(synthetic_cache, tmp_path_factory) -> Path:
    """A real FedMedCLIP run with DP-SGD at epsilon <= 6 per site (tiny backbone, 2 rounds)."""
    out = tmp_path_factory.mktemp("card") / "dp-run"
    engine.train(
        TrainConfig(
            data="synthetic",
            synthetic=SYNTH,
            cache_dir=str(synthetic_cache),
            rounds=2,
            batch_size=8,
            out=str(out),
            privacy={"target_epsilon": TARGET},
        ),
        progress=False,
    )
    return out


def test_the_card_of_a_run_has_every_section_its_warnings_and_intervals(dp_run):
    card = build_card(
        dp_run, {"name": "fmc", "version": "7", "kfp_run_id": "kfp-123", "git_commit": "abc123"}
    )
    md = render_markdown(card)
    assert md.startswith("# Model card: fmc version 7\n")
    assert render_markdown(build_card(dp_run)).startswith("# Model card: fedmedclip run (not registered)\n")
    for section in SECTIONS:
        assert f"\n## {section}\n" in md, section
    assert md.index("**WARNING** The backbone 'tiny' has RANDOM weights") < md.index("## Model")
    results = json.loads((dp_run / "results.json").read_text())
    # Per-site and global metrics with bootstrap intervals around the reported values.
    g = card["performance"]["global"]
    assert g["bacc"] == results["metrics"]["global"]["bacc"]
    assert float(metrics_from_confusion(g["confusion"])["bacc"]) == pytest.approx(g["bacc"])
    for key in ("acc", "bacc", "f1"):
        lo, hi = g["ci95"][key]
        assert lo <= g[key] <= hi
    assert [s["site"] for s in card["performance"]["sites"]] == results["site_names"]
    assert all(s["ci95"] for s in card["performance"]["sites"])
    worst = min(results["metrics"]["sites"], key=lambda s: s["bacc"])
    assert card["performance"]["worst_site"]["bacc"] == worst["bacc"]
    assert f"Worst site's balanced accuracy: {100 * worst['bacc']:.1f}**" in md
    # Data per site by class (no image ids anywhere), calibration, privacy and provenance.
    partition = json.loads((dp_run / "partition.json").read_text())
    assert card["data"]["counts_per_class"]["site_0"]["train"] == partition["counts"]["site_0"]["train"]
    assert not any(i in md for i in partition["global_test"][:5])
    assert card["calibration"]["global_ece"] == results["metrics"]["global"]["ece"]
    # The plot from the run directory (write_card links the copy beside the card).
    assert card["calibration"]["plot"] == "plots/reliability.png"
    assert (
        float(card["privacy"]["dp.epsilon"]) <= TARGET and card["privacy"]["dp.secure_aggregation"] == "off"
    )
    assert "kfp-123" in md and "abc123" in md and results["backbone"]["weights_sha256"] in md
    assert card["provenance"]["partition_digest"] == partition["digest"]
    # A run directory holds no exported file: the card says no OOD score is recorded, and what that means.
    assert card["ood"] is None and "every image is assigned one of them, however unlike it is" in md
    assert "## Out-of-distribution detection\n\nNone recorded" in md


def test_every_registered_version_has_a_card_privacy_tags_and_the_max_epsilon_gate(
    mlops_stack, dp_run, tmp_path, capsys
):
    from mlflow import MlflowClient

    uri, name = mlops_stack.tracking_uri, "fmc-private"
    # The card and tags do not depend on the exporter: the fast one (the default's graphs: tests/test_export.py).
    onnx_path = export_onnx(dp_run, "global", tmp_path / "model.onnx", exporter="torchscript")
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    privacy = json.loads(meta[META_PRIVACY])  # what the served model's metadata reports
    # Exported without --run-id: the metadata names the run the model came from, as its results.json does.
    assert meta["fedmedclip.run_id"] == json.loads((dp_run / "results.json").read_text())["run_id"] != ""
    # ... which is "inprocess" for every `train` run: the file names its run by its model's digest instead
    assert meta[META_MODEL_DIGEST] == model_dir_digest(dp_run / "model")
    assert privacy["dp.mode"] == "record" and float(privacy["dp.epsilon"]) <= TARGET

    run_id = log_run_dir(dp_run, "test-card", tracking_uri=uri, kfp_run_id="kfp-run-42")
    client = MlflowClient(uri)
    # Every round's epsilon is a metric of the run (the round records' fields, as the live observer logs them).
    results = json.loads((dp_run / "results.json").read_text())
    history = client.get_metric_history(run_id, "privacy/epsilon_max")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [
        pytest.approx(r["epsilon_max"]) for r in results["history"]
    ]
    assert client.get_metric_history(run_id, "site_0/epsilon")
    assert client.get_run(run_id).data.tags["dp.mode"] == "record"
    mv = register_model(run_id, name, onnx_path, uri)
    tags = client.get_model_version(name, mv.version).tags
    for key in ("dp.epsilon", "dp.delta", "dp.clip", "dp.noise_multiplier", "dp.secure_aggregation"):
        assert tags[key] == privacy[key], key
    assert tags["dp.delta"] == "1e-05" and tags["dp.secure_aggregation"] == "off"
    assert tags["model_digest"] == meta[META_MODEL_DIGEST]  # recomputed from the run's logged model files
    assert tags["model_card"] == f"model_cards/{name}/v{mv.version}"
    stored = {a.path for a in client.list_artifacts(run_id, tags["model_card"])}
    assert {
        f"{tags['model_card']}/{f}" for f in ("model_card.md", "model_card.json", "reliability.png")
    } <= stored

    # promote --max-epsilon: refused below the version's epsilon, accepted at or above it.
    with pytest.raises(PrivacyRefused, match="above --max-epsilon 0.5"):
        promote(name, mv.version, PromotionPolicy(max_epsilon=0.5), uri)
    assert (
        run_cli("promote", name, "--version", mv.version, "--max-epsilon", TARGET, "--tracking-uri", uri) == 0
    )
    capsys.readouterr()
    assert run_cli("card", f"{name}@champion", "--tracking-uri", uri) == 0
    md = capsys.readouterr().out
    assert md.startswith(f"# Model card: {name} version {mv.version}")
    for section in SECTIONS:
        assert f"\n## {section}\n" in md
    assert "kfp-run-42" in md and run_id in md and tags["onnx_sha256"] in md
    assert "exported predictor: global" in md
    # The OOD score of the registered file, as its metadata (what the server reads) records it.
    from fedmedclip.onnx_contract import contract_of_model

    ood = contract_of_model(onnx.load(str(onnx_path)), "model.onnx").ood
    section = md.split("## Out-of-distribution detection\n", 1)[1].split("\n## ", 1)[0]
    assert f"Threshold: {ood.threshold:.6g}, calibrated for a 5.0% false-alarm rate" in section, section
    assert f"on {ood.calibration['calibration_images']} held-out images" in section, section
    assert "the out-of-distribution score flags images unlike the training data" in md
    assert run_cli("card", f"{name}/{mv.version}", "--json", "--tracking-uri", uri) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["model"]["version"] == mv.version
    assert facts["ood"]["threshold"] == ood.threshold and facts["ood"]["method"] == ood.method
    # A reference that names nothing: one line naming it and the registry (the lookup `serve models:/` makes).
    with pytest.raises(TrackingError, match=f"cannot resolve {name}@nope in the MLflow registry at {uri}: "):
        run_cli("card", f"{name}@nope", "--tracking-uri", uri)
    with pytest.raises(TrackingError, match="'no-version' is not a registered model reference"):
        run_cli("card", "no-version", "--tracking-uri", uri)

    # A version trained without DP (a run directory from before privacy existed) is registered with a card
    # too, and refused by the privacy gate whatever its accuracy.
    plain = make_run_dir(tmp_path / "plain", bacc=0.99)
    v2 = register_model(log_run_dir(plain, "test-card", tracking_uri=uri), name, tracking_uri=uri).version
    assert client.get_model_version(name, v2).tags["dp.mode"] == "none"
    with pytest.raises(PrivacyRefused, match="without record-level differential privacy"):
        promote(name, v2, PromotionPolicy(max_epsilon=100.0, allow_different_data=True), uri)
    assert run_cli("card", f"{name}/{v2}", "--tracking-uri", uri) == 0
    assert "Trained WITHOUT differential privacy" in capsys.readouterr().out


@pytest.mark.parametrize(
    "file, damage, named",
    [
        ("config.json", lambda d: [], "config.json must be a JSON object, got list"),
        ("provenance.json", lambda d: {**d, "server": 3}, "holder 'server' must be a JSON object, got int"),
        (
            "results.json",
            lambda d: {**d, "metrics": {**d["metrics"], "sites": "x"}},
            "`metrics.sites` must be",
        ),
        # a class name that drives the terminal `fedmedclip card` prints to (the registered card is printed too)
        (
            "partition.json",
            lambda d: {**d, "class_names": ["x\x1b[2J", *d["class_names"][1:]]},
            r"partition.json: class name 'x\\x1b\[2J' holds control characters",
        ),
        # two classes of one name: the card's per-class rows and every answer would make them one
        (
            "partition.json",
            lambda d: {**d, "class_names": [*d["class_names"][:-1], d["class_names"][0]]},
            r"partition.json: class name '\w+' is listed twice",
        ),
        # a word where a number was written: a ValueError traceback
        (
            "config.json",
            lambda d: {**d, "seed": "x"},
            r"of another type or range than a run writes \(ValueError: invalid literal for int\(\)",
        ),
    ],
)
def test_the_card_of_a_damaged_run_directory_names_the_entry(tmp_path, capsys, file, damage, named):
    """`fedmedclip card RUN_DIR` on a file of the right name with the wrong JSON shape was an AttributeError
    traceback; now one line naming the entry (the same check as `fedmedclip track`'s)."""
    from fedmedclip.cli import main
    from fedmedclip.model_card import CardError

    run_dir = make_run_dir(tmp_path / "run")
    path = run_dir / file
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    with pytest.raises(CardError, match=named):
        build_card(run_dir)
    assert main(["card", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot build a model card: ") and len(err.strip().splitlines()) == 1


def test_a_run_file_nested_too_deeply_is_one_line_for_the_card_and_for_track(tmp_path, capsys):
    """Python's JSON parser raises RecursionError on deep nesting: `card RUN_DIR` printed its traceback."""
    from fedmedclip.cli import main
    from mlops.rundir import read_run_dir
    from mlops.tracking import RunDirError

    run_dir = make_run_dir(tmp_path / "run")
    (run_dir / "results.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["card", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "results.json is not JSON (nested too deeply)" in err and "Traceback" not in err, err
    with pytest.raises(RunDirError, match="results.json is not valid JSON: nested too deeply"):
        read_run_dir(run_dir)


def test_the_card_says_when_a_sites_ledger_leaves_out_updates_that_went_out(tmp_path):
    """site_1's update of round 3 reached the server after its last report (round 2): the card warns, says its
    epsilon is its plan's bound with the figure it reported; with a site bounded by nothing, the epsilon is
    `unknown`, never the largest of the others."""
    run_dir = make_run_dir(tmp_path / "run")
    path = run_dir / "results.json"
    results = json.loads(path.read_text())
    ledger = dict(LEDGER)
    results["privacy"] = {
        "record_level": {
            "clip": 1.0,
            "delta": 1e-5,
            "accountant": "rdp",
            "sites": {"site_0": ledger, "site_1": {**ledger, "epsilon": 6.0, "reported_epsilon": 4.0}},
            "unaccounted_rounds": {"site_1": [3]},
            "epsilon_max": 6.0,
        },
        "secure_aggregation": False,
    }
    path.write_text(json.dumps(results))
    md = render_markdown(build_card(run_dir))
    assert "**WARNING** Some updates left their site after its last privacy report (site_1: round(s) 3)" in md
    assert "it reported epsilon 4; the epsilon is the most its plan allows" in md
    results["privacy"]["record_level"]["epsilon_max"] = None
    path.write_text(json.dumps(results))
    md = render_markdown(build_card(run_dir))
    assert "**epsilon unknown**" in md and "record-level epsilon is unknown" in md
    # ... and the promotion gate reads it as unknown, not as an epsilon above the budget.
    from fedmedclip.privacy.report import privacy_summary
    from mlops.registry import check_privacy_budget

    with pytest.raises(PrivacyRefused, match="its record-level epsilon is unknown"):
        check_privacy_budget("fmc", "3", privacy_summary(results), 100.0)


def test_the_epsilon_the_gate_and_the_card_read_is_never_below_the_runs(tmp_path):
    """dp.epsilon was the run's epsilon rounded to the nearest 6 digits: 3.99988015 became "3.99988", which
    `promote --max-epsilon 3.99988` let through. Epsilons are now rounded up (noise multipliers down) wherever
    the run's privacy is printed for a decision: the tags, the ONNX metadata and the card."""
    from fedmedclip.privacy.report import privacy_summary
    from mlops.registry import check_privacy_budget

    eps, sigma = 3.9998801553475376, 3.2741849515801276
    site = {
        "epsilon": eps,
        "noise_multiplier": sigma,
        "steps": 8,
        "sample_rate": 1.0,
        "stopped_at_round": None,
    }
    record = {"clip": 1.0, "delta": 1e-5, "accountant": "rdp", "sites": {"site_0": site}, "epsilon_max": eps}
    results = {"privacy": {"record_level": record, "secure_aggregation": False}}
    tags = privacy_summary(results)
    assert tags["dp.epsilon"] == "3.99989" and tags["dp.noise_multiplier"] == "3.27418"
    assert tags["dp.sites"] == "site_0:eps=3.99989:sigma=3.27418" and tags["dp.delta"] == "1e-05"
    with pytest.raises(PrivacyRefused, match="its epsilon 3.99989"):
        check_privacy_budget("fmc", "1", tags, 3.99988)
    run_dir = make_run_dir(tmp_path / "run")
    path = run_dir / "results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **results}))
    assert "  - site_0: epsilon 4, sigma 3.274, 8 steps" in render_markdown(build_card(run_dir))


def test_the_card_says_the_ood_score_and_the_reference_set_are_not_covered(tmp_path):
    """A site's exported model carries an OOD score fitted without DP on its own images (class means and
    covariance of its training split, the threshold and one embedding per image of its validation and test
    splits, in the ONNX metadata): the card's Privacy section lists it among what is not covered, beside the
    server's reference set, which the card left out though docs/privacy.md lists it."""
    run_dir = make_run_dir(tmp_path / "run")
    calibration = {
        "holder": "site_0",
        "fitted_on": "the site's training split, labels",
        "calibrated_on": "the site's validation and test splits",
        "fit_images": 230,
        "calibration_images": 58,
        "reference_images": 58,
    }
    ood = {"method": "m", "threshold": 1.0, "false_alarm_rate": 0.05, "calibration": calibration}
    card = build_card(run_dir, {"ood": ood})
    md = render_markdown(card)
    privacy = md.split("## Privacy\n", 1)[1].split("\n## ", 1)[0]
    assert "the reference set, whose features every site receives" in privacy
    assert (
        "this model's out-of-distribution score and drift reference, fitted without DP on site_0's images: the "
        "Gaussians on 230 of them (the site's training split, labels), the threshold on 58 (the site's validation "
        "and test splits), and the embeddings of 58 of those, one per image, stored in the model" in privacy
    )
    assert card["privacy"]["not_covered"][-1].startswith("this model's out-of-distribution score")
    assert "out-of-distribution" not in " ".join(build_card(run_dir)["privacy"]["not_covered"])


def test_the_cards_client_level_line_says_what_it_protects_and_from_whom(tmp_path):
    """Client-level DP's epsilon covers what a site's data contributed (its update replaced by no change), from
    everyone who sees the published modules; the card said "a whole site" and nothing of whom: not the server,
    which saw every update (or their exact sum under secure aggregation) before the noise, nor whether a site
    took part (each round's sites are public)."""
    run_dir = make_run_dir(tmp_path / "run")
    path = run_dir / "results.json"
    results = json.loads(path.read_text())
    client = {"noise_multiplier": 1.0, "noise_at": "server", "clip": 0.5, "epsilon": 7.08, "delta": 1e-5}
    for secure, seen in ((False, "every site's update in the clear"), (True, "the exact sum of the updates")):
        results["privacy"] = {"client_level": client, "secure_aggregation": secure}
        path.write_text(json.dumps(results))
        line = next(x for x in render_markdown(build_card(run_dir)).splitlines() if "Client level" in x)
        assert "what a whole site's data contributed, not whether it took part" in line, line
        assert f"not against the server, which saw {seen}" in line, line
        # the swap neighbour's 2S and the sites' own models, which docs/privacy.md said the line says
        assert "swaps a site's update for another" in line and "twice the clip" in line, line
        assert "each site's own model (its private head" in line and "is outside it" in line, line
    assert any("partition.json" in x for x in build_card(run_dir)["privacy"]["not_covered"])


def test_the_card_of_a_centralized_dp_run_says_the_images_left_their_sites(tmp_path):
    """`train --federation centralized` with DP-SGD pools every site's images at one holder: its epsilon covers
    the users of the model, not that holder, and each site's row is the pool's (its n, steps and sampling rate);
    the card showed the per-site record-level rows of a federation without a word."""
    run_dir = make_run_dir(tmp_path / "run")
    path = run_dir / "results.json"
    site = {
        "epsilon": 4.0,
        "noise_multiplier": 1.2,
        "steps": 116,
        "sample_rate": 0.07,
        "stopped_at_round": None,
    }
    record = {"clip": 1.0, "delta": 1e-5, "accountant": "rdp", "sites": {"site_0": site}, "epsilon_max": 4.0}
    results = {
        **json.loads(path.read_text()),
        "privacy": {"record_level": record, "secure_aggregation": False},
    }
    for federation, warned in (("federated", False), ("centralized", True)):
        path.write_text(json.dumps({**results, "federation": federation}))
        md = render_markdown(build_card(run_dir))
        assert (
            "**WARNING** CENTRALIZED reference run: every site's training images were pooled" in md
        ) is warned


def test_a_run_whose_logged_figures_are_not_numbers_is_not_registered(mlops_stack, tmp_path):
    """Whoever may log to a run may replace its results.json: a NaN, a word or a negative epsilon made the
    registration register the version, then fail writing its card (a retry then found the version and said it
    was registered, without a card), end in a traceback, or tag `dp.epsilon` -1, which passes every
    --max-epsilon. Each is refused in one line before any version exists; the file restored, it registers."""
    from mlflow import MlflowClient

    uri, name = mlops_stack.tracking_uri, "fmc-figures"
    run_dir = make_run_dir(tmp_path / "run")
    results = json.loads((run_dir / "results.json").read_text())
    ledger = dict(LEDGER)
    results["privacy"] = {
        "record_level": {"clip": 1.0, "delta": 1e-5, "accountant": "rdp", "sites": {"site_0": ledger}},
        "secure_aggregation": False,
    }
    results["privacy"]["record_level"]["epsilon_max"] = 5.5
    (run_dir / "results.json").write_text(json.dumps(results))
    run_id = log_run_dir(run_dir, "test-figures", tracking_uri=uri)
    client = MlflowClient(uri)
    replaced = tmp_path / "replaced" / "results.json"
    replaced.parent.mkdir()
    good = json.dumps(results)
    record = results["privacy"]["record_level"]
    for text, refused in (
        (
            good.replace('"epsilon_max": 5.5', '"epsilon_max": -1'),
            r"privacy\.record_level\.epsilon_max is '-1'",
        ),
        (
            good.replace('"epsilon": 5.5', '"epsilon": "abc"'),
            r"privacy\.record_level\.sites\.site_0\.epsilon is",
        ),
        (good.replace('"epsilon_max": 5.5', '"epsilon_max": Infinity'), "Infinity is not a number JSON has"),
        (
            json.dumps({**results, "metrics": {**results["metrics"], "global": {"acc": float("nan")}}}),
            "NaN is",
        ),
        (json.dumps({**results, "privacy": {"record_level": {**record, "delta": "x"}}}), "delta is 'x'"),
    ):
        assert text != good
        replaced.write_text(text)
        client.log_artifact(run_id, str(replaced))  # over the run's results.json
        with pytest.raises(TrackingError, match=refused):
            register_model(run_id, name, tracking_uri=uri)
        assert not client.search_model_versions(f"name = '{name}'"), text
    replaced.write_text(good)
    client.log_artifact(run_id, str(replaced))
    version = register_model(run_id, name, tracking_uri=uri)
    assert version.tags["dp.epsilon"] == "5.5" and version.tags["model_card"]


def test_the_cards_plot_link_names_the_plot_where_the_card_is(tmp_path, capsys):
    """`fedmedclip card RUN_DIR` linked `reliability.png`, which a run directory holds in plots/; a registered
    card is written beside its own copy of the plot. The link names the file from where the card is (the run
    directory; the card's folder), and there is none without a plot."""
    import re

    from fedmedclip.model_card import write_card

    def link(md: str) -> str | None:
        found = re.search(r"!\[reliability diagram[^\]]*\]\(([^)]*)\)", md)
        return found and found.group(1)

    run = make_run_dir(tmp_path / "run")  # with plots/reliability.png
    assert run_cli("card", run) == 0
    printed = link(capsys.readouterr().out)
    assert printed and (run / printed).is_file(), printed
    card = write_card(run, tmp_path / "card")
    written = link((tmp_path / "card" / "model_card.md").read_text())
    assert written and (tmp_path / "card" / written).is_file(), written
    stored = json.loads((tmp_path / "card" / "model_card.json").read_text())
    assert stored["calibration"]["plot"] == card["calibration"]["plot"] == written
    (run / "plots" / "reliability.png").unlink()
    assert run_cli("card", run) == 0
    assert link(capsys.readouterr().out) is None
    write_card(run, tmp_path / "card-without")
    assert link((tmp_path / "card-without" / "model_card.md").read_text()) is None


def test_the_card_commands_argument_says_every_form_it_takes():
    """`card`'s argument read NAME@ALIAS in the usage; it takes NAME/VERSION and a run directory too."""
    parser = argparse.ArgumentParser(prog="fedmedclip")
    sub = parser.add_subparsers(dest="command")
    ccli.register(sub)
    assert "NAME@ALIAS|NAME/VERSION|RUN_DIR" in sub.choices["card"].format_usage()

"""The pipeline's step functions in sequence, in one process (seconds): prepare -> each party's extraction ->
the server and site workers at the same time over a local-directory mailbox -> report; the same metrics,
payloads and model files as `fedmedclip train`. Also: the parameters round-trip to the configuration, the run
directory the report reads is checked file by file, and the MLflow observer logs a run live (real MLflow)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

pytest.importorskip("kfp")

from conftest import SYNTH, without_timing  # noqa: E402

from components.kfp_components import (  # noqa: E402
    CONFIG_PARAMETERS,
    NOT_PARAMETERS,
    RUN_DIR_MANIFEST,
    config_from_parameters,
    config_to_parameters,
    extract_step,
    prepare_step,
    report_step,
    worker_step,
)
from components.sites import SERVER_SECRET_NAME, site_secret_name  # noqa: E402
from fedmedclip.config import TrainConfig  # noqa: E402
from fedmedclip.errors import ConfigError, FedMedClipError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_every_configuration_field_is_a_pipeline_parameter_and_round_trips():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    mapped = {field for _, field, _ in CONFIG_PARAMETERS}
    assert fields - mapped == set(NOT_PARAMETERS), (
        "a TrainConfig field is neither a pipeline parameter nor excluded"
    )
    cfg = TrainConfig(
        partition="dirichlet",
        alpha=0.5,
        split_ratio=(0.7, 0.2, 0.1),
        classes=["a", "b"],
        method_options={"local_epochs": 2},
        synthetic=SYNTH,
        codec_up="int8-zlib",
        transductive=True,
        secure_aggregation=True,
        secagg_threshold=3,
        out="",
    ).validate()
    params = config_to_parameters(cfg)
    assert all(isinstance(v, (str, int, float, bool)) for v in params.values())  # KFP parameter types
    assert config_from_parameters(params).to_json() == cfg.to_json()
    with pytest.raises(ConfigError, match="unknown method"):
        config_from_parameters({**params, "method": "nope"})
    with pytest.raises(ConfigError, match="unknown option"):
        config_from_parameters({**params, "method_options": '{"nope": 1}'})
    with pytest.raises(ConfigError, match="three numbers"):
        config_from_parameters({**params, "split": "0.8,0.2"})


def _params(cache: Path, **over) -> dict:
    cfg = TrainConfig(sites=2, rounds=2, cache_dir=str(cache), synthetic=SYNTH, out="", **over).validate()
    return config_to_parameters(cfg)


def test_prepare_names_each_partys_secret_and_refuses_bad_input(tmp_path):
    parties = prepare_step(_params(tmp_path / "cache"), "", str(tmp_path / "mailbox"))
    assert [(p["role"], p["party"], p["index"], p["secret"]) for p in parties] == [
        ("server", "server", -1, SERVER_SECRET_NAME),
        ("site", "site_0", 0, site_secret_name(0)),
        ("site", "site_1", 1, site_secret_name(1)),
    ]
    # Only the server's item names the MLflow user's Secret.
    assert [p["tracking_secret"] == p["secret"] for p in parties] == [False, True, True]
    extraction = json.loads(parties[0]["extraction"])
    assert "method" not in extraction and "rounds" not in extraction and "codec_up" not in extraction
    assert extraction["preprocessing"]  # resolved from the method: its cache key does not name the method
    with pytest.raises(ConfigError, match="not the partition's sites"):
        prepare_step(_params(tmp_path / "cache"), "a,b", str(tmp_path / "mailbox"))
    with pytest.raises(ConfigError, match="no mailbox"):
        prepare_step(_params(tmp_path / "cache"), "", "")


def test_steps_in_sequence_give_the_engines_run(tmp_path, monkeypatch):
    from fedmedclip.engine import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cache, mailbox, run_id = tmp_path / "cache", str(tmp_path / "mailbox"), "steps-run"
    parties = prepare_step(_params(cache), "", mailbox)
    features = {}
    for p in parties:
        features[p["party"]] = tmp_path / "features" / p["party"]
        prov = extract_step(p["extraction"], p["role"], p["party"], p["index"], str(features[p["party"]]))
        assert (features[p["party"]] / "provenance.json").exists() and prov["digest"]

    # Every worker at once, as the pipeline's loop runs them, here as threads of this process; each waits for
    # the others through the mailbox, so the run can only finish with all of them running together.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(parties)) as pool:
        futures = [
            pool.submit(
                worker_step,
                p["config"],
                p["role"],
                p["party"],
                p["index"],
                run_id,
                p["mailbox"],
                str(features[p["party"]]),
                join_timeout=60,
                round_timeout=60,
            )
            for p in parties
        ]
        assert [f.result(timeout=300) for f in futures] == ["", "", ""]  # no tracking server: no MLflow run

    run_dir = tmp_path / "run_dir"
    results, mlflow_run_id = report_step(mailbox, run_id, str(run_dir))
    assert mlflow_run_id == ""
    cfg = TrainConfig(sites=2, rounds=2, cache_dir=str(cache), synthetic=SYNTH, out=str(tmp_path / "engine"))
    ref = train(cfg, progress=False, run_id=run_id)
    assert without_timing(results) == without_timing(ref)
    engine = Path(cfg.out)
    assert json.loads((run_dir / "provenance.json").read_text()) == json.loads(
        (engine / "provenance.json").read_text()
    )
    for rel in ["partition.json", "model/global.safetensors", "model/model.json"] + [
        f"rounds/{p.name}" for p in (engine / "rounds").iterdir()
    ]:
        assert (run_dir / rel).read_bytes() == (engine / rel).read_bytes(), rel
    # The sites' private heads stay in their own state (sites/<k>/private/<run>/), not in the run directory.
    assert not list((run_dir / "model").glob("site_*"))
    for k, site in enumerate(("site_0", "site_1")):
        mine = Path(mailbox, "sites", str(k), "private", run_id, "model", f"site_{site}.safetensors")
        assert mine.read_bytes() == (engine / "model" / f"site_{site}.safetensors").read_bytes()
    assert (run_dir / "plots" / "accuracy.png").exists()

    # A retried server worker after publishing has nothing left to do: it neither trains nor rewrites anything.
    server = parties[0]
    published = Path(mailbox, "runs", run_id, "server", RUN_DIR_MANIFEST).read_bytes()
    assert worker_step(server["config"], "server", "server", -1, run_id, mailbox, None) == ""
    assert Path(mailbox, "runs", run_id, "server", RUN_DIR_MANIFEST).read_bytes() == published

    # The report checks every file against the server's manifest.
    Path(mailbox, "runs", run_id, "server", "rundir", "results.json").write_text("{}")
    with pytest.raises(FedMedClipError, match="not the file the server published"):
        report_step(mailbox, run_id, str(tmp_path / "again"))
    with pytest.raises(FedMedClipError, match="published no run directory"):
        report_step(mailbox, "another-run", str(tmp_path / "none"))


def test_observer_logs_rounds_live_and_keeps_them_when_the_run_fails(mlops_stack):
    from mlflow import MlflowClient

    from components.observer import MlflowObserver

    cfg = TrainConfig(sites=2, rounds=5, synthetic=SYNTH, out="/nonexistent").validate()
    manifest = {
        "sites": [{"name": "site_0"}, {"name": "site_1"}],
        "codec_up": "fp16-zlib",
        "codec_down": "fp16-zlib",
    }
    obs = MlflowObserver(
        cfg,
        "obs-run-1",
        "observer-test",
        tracking_uri=mlops_stack.tracking_uri,
        kfp_run_id="kfp-1",
        options={"quorum": None, "round_timeout": 600.0, "join_timeout": 3600.0, "norm_factor": 10.0},
        record_run_dir=False,
    )
    obs.start({**manifest, "quorum": 2})
    for r in (1, 2):
        obs.round(
            {
                "round": r,
                "global": {"acc": 0.25 * r, "bacc": 0.2 * r},
                "sites": [{"site": "site_0", "acc": 0.5, "bacc": 0.5, "val_acc": 0.4}],
                "sites_present": ["site_0", "site_1"],
                "bytes_up": [10, 12],
                "bytes_down": [20, 20],
                "seconds": 0.1,
            }
        )
    obs.finish(None, "round 3: only 1 of 2 sites answered")
    client = MlflowClient(mlops_stack.tracking_uri)
    run = client.get_run(obs.mlflow_run_id)
    assert run.info.status == "FAILED" and run.info.run_name == "obs-run-1"
    assert run.data.tags["kfp.run_id"] == "kfp-1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "global/acc")] == [1, 2]
    assert run.data.params["method"] == cfg.method and run.data.params["site_names"] == "site_0,site_1"
    # Every resolved setting is a parameter: the method's options with their defaults, the operational
    # settings, the server's options (quorum resolved to every site), the preprocessing the method chose.
    from components.observer import resolved_method_options

    params = run.data.params
    options = resolved_method_options(cfg)
    assert options and all(
        params[f"method_options.{k}"] == (v if isinstance(v, str) else json.dumps(v))
        for k, v in options.items()
    )
    assert params["threads"] == str(cfg.threads) and params["min_class_images"] == str(cfg.min_class_images)
    assert (params["server.quorum"], params["server.join_timeout"], params["server.norm_factor"]) == (
        "2",
        "3600.0",
        "10.0",
    )
    assert params["preprocessing"] in ("squash", "clip") and "out" not in params
    tags = run.data.tags
    assert tags["mlflow.source.type"] == "JOB" and tags["mlflow.user"] and "fedmedclip.run_dir" not in tags
    assert "kfp-1" in tags["mlflow.note.content"]

    # An unreachable tracking server turns tracking off; it never stops the federation.
    off = MlflowObserver(cfg, "obs-run-2", "observer-test", tracking_uri="http://127.0.0.1:9")
    off.start(manifest)
    off.round({"round": 1})
    off.finish({}, None)
    assert off.mlflow_run_id is None


def test_server_run_track_finds_the_observer_by_its_entry_point(tmp_path):
    from importlib.metadata import entry_points

    from components.observer import MlflowObserver

    (ep,) = [e for e in entry_points(group="fedmedclip.observers") if e.name == "mlflow"]
    cfg = TrainConfig(out=str(tmp_path / "run")).validate()
    obs = ep.load()(cfg=cfg, run_id="r-1", experiment="exp")  # how `fedmedclip server run --track` calls it
    assert isinstance(obs, MlflowObserver) and obs.run_dir == tmp_path / "run"
    assert obs.logger.experiment == "exp" and obs.mlflow_run_id is None  # nothing logged before start

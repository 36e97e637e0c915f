"""The Kubeflow pipeline: the compiled YAML itself runs locally (kfp.local) and matches the in-process engine
bit for bit; the committed YAML is fresh; per-site secrets, GPU requests and data isolation are in the graph."""

from __future__ import annotations

import filecmp
import json
import logging
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("kfp")

from components.sites import ENDPOINTS_CONFIGMAP, SERVER_SECRET_NAME, site_secret_name  # noqa: E402
from pipelines.pipeline import DEFAULT_ROUNDS, DEFAULT_SITES, DEFAULT_YAML, compile_pipeline  # noqa: E402

SYNTH = {"per_class_per_site": 20, "test_per_class": 10, "size": 64}


def _load(path):
    ir, platform = list(yaml.safe_load_all(Path(path).read_text()))
    return ir, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _const(task, name):
    v = task["inputs"].get("parameters", {}).get(name, {})
    return v.get("runtimeValue", {}).get("constant")


def _executor(ir, task_name):
    comp = ir["root"]["dag"]["tasks"][task_name]["componentRef"]["name"]
    return ir["components"][comp]["executorLabel"]


@pytest.fixture(scope="module")
def small_yaml(tmp_path_factory):
    return compile_pipeline(tmp_path_factory.mktemp("ir") / "p.yaml", sites=2, rounds=2)


# ------------------------------------------------------------------------------------------- the graph
def test_committed_yaml_is_fresh(tmp_path):
    fresh = compile_pipeline(tmp_path / "p.yaml", DEFAULT_SITES, DEFAULT_ROUNDS)
    assert DEFAULT_YAML.exists(), (
        "pipelines/fedmedclip_pipeline.yaml is missing: run `fedmedclip pipeline compile`"
    )
    assert fresh.read_text() == DEFAULT_YAML.read_text(), (
        "pipelines/fedmedclip_pipeline.yaml is stale relative to the code: run `fedmedclip pipeline compile`"
    )


def test_rounds_and_sites_are_unrolled():
    ir, _ = _load(DEFAULT_YAML)
    names = [t["taskInfo"]["name"] for t in ir["root"]["dag"]["tasks"].values()]
    for r in range(1, DEFAULT_ROUNDS + 1):
        assert f"round {r}: aggregate (server)" in names
        for k in range(DEFAULT_SITES):
            assert f"round {r}: site_{k} train" in names
    for step in ("prepare: configuration + partition", "export ONNX", "register + promote (MLflow)"):
        assert step in names


def test_site_tasks_get_only_their_own_secret_and_a_gpu():
    ir, k8s = _load(DEFAULT_YAML)
    tasks = ir["root"]["dag"]["tasks"]
    executors = ir["deploymentSpec"]["executors"]
    site_tasks = {n: t for n, t in tasks.items() if _const(t, "site") is not None}
    assert len(site_tasks) == DEFAULT_SITES * (DEFAULT_ROUNDS + 2)  # extract, R trainings, final evaluation
    for name, task in site_tasks.items():
        k = int(_const(task, "site").removeprefix("site_"))
        ex = _executor(ir, name)
        secrets = [s["secretName"] for s in k8s.get(ex, {}).get("secretAsEnv", [])]
        assert secrets == [site_secret_name(k)], (name, secrets)
        envs = {e["envVar"] for s in k8s[ex]["secretAsEnv"] for e in s["keyToEnv"]}
        assert envs == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        if not name.startswith("site-final"):
            acc = executors[ex]["container"]["resources"]["accelerator"]
            assert acc["resourceType"] == "nvidia.com/gpu" and acc["resourceCount"] == "1", name
    # The server's tasks (prepare reads server/published.json for s3:// data) hold the server's credentials,
    # never a site's.
    for name in tasks:
        if name.startswith(("aggregate", "extract-server", "prepare")):
            assert [s["secretName"] for s in k8s[_executor(ir, name)]["secretAsEnv"]] == [SERVER_SECRET_NAME]
    # Every task that may download from the data bucket finds its endpoint in the (optional) ConfigMap.
    for name in [
        *site_tasks,
        *(n for n in tasks if n.startswith(("aggregate", "extract-server", "prepare"))),
    ]:
        maps = k8s[_executor(ir, name)]["configMapAsEnv"]
        assert [m["configMapName"] for m in maps] == [ENDPOINTS_CONFIGMAP], name
        assert {e["envVar"] for e in maps[0]["keyToEnv"]} == {"AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"}
        assert maps[0]["optional"] is True


def test_site_tasks_receive_only_their_own_features_and_state():
    ir, _ = _load(DEFAULT_YAML)
    tasks = ir["root"]["dag"]["tasks"]
    site_of = {n: _const(t, "site") for n, t in tasks.items()}
    for name, task in tasks.items():
        arts = task["inputs"].get("artifacts", {})
        if site_of[name] is not None:
            for key in ("features", "previous_state"):
                if key in arts:
                    producer = arts[key]["taskOutputArtifact"]["producerTask"]
                    assert site_of[producer] == site_of[name], (name, key, producer)
        # Nothing but the site's own tasks consumes a site's features or private state; the server gets
        # the update payloads (aggregate) and the final site reports (evaluate).
        for key, a in arts.items():
            producer = a.get("taskOutputArtifact", {}).get("producerTask")
            out = a.get("taskOutputArtifact", {}).get("outputArtifactKey")
            if producer and site_of.get(producer) and out in ("features", "site_state"):
                assert site_of[name] == site_of[producer] or name.startswith("evaluate"), (name, key)


def test_aggregation_consumes_the_round_updates(small_yaml):
    ir, _ = _load(small_yaml)
    tasks = ir["root"]["dag"]["tasks"]
    for agg in ("aggregate-component", "aggregate-component-2"):
        ups = {
            k: v["taskOutputArtifact"]
            for k, v in tasks[agg]["inputs"]["artifacts"].items()
            if k.startswith("update")
        }
        assert sorted(ups) == ["update_0", "update_1"]
        rounds = {_const(tasks[u["producerTask"]], "round_index") for u in ups.values()}
        assert rounds == {_const(tasks[agg], "round_index")}


def test_components_do_not_install_kfp_and_use_our_image(small_yaml):
    from components.kfp_components import DEFAULT_BASE_IMAGE

    ir, _ = _load(small_yaml)
    for ex in ir["deploymentSpec"]["executors"].values():
        assert ex["container"]["image"] == DEFAULT_BASE_IMAGE
        assert "pip install" not in " ".join(ex["container"]["command"])


def test_compile_rejects_bad_options(tmp_path):
    from fedmedclip.errors import ConfigError

    with pytest.raises(ConfigError, match="supports 1 to 8 sites"):
        compile_pipeline(tmp_path / "x.yaml", sites=9, rounds=1)
    with pytest.raises(ConfigError, match="site-names"):
        compile_pipeline(tmp_path / "x.yaml", sites=2, rounds=1, site_names=["a"])


def test_cli_compile(tmp_path):
    from fedmedclip.cli import main

    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "--sites", "2", "--rounds", "1", "--no-gpu", "--out", str(out)]) == 0
    ir, _ = _load(out)
    assert not any("resources" in e["container"] for e in ir["deploymentSpec"]["executors"].values())


# ------------------------------------------------------------------------------------------- execution
@pytest.mark.slow
def test_compiled_yaml_runs_locally_and_matches_the_engine(small_yaml, tmp_path, caplog):
    """~15 kfp.local subprocess tasks (each imports torch): about 1.5 to 2 minutes on 2 cores."""
    caplog.set_level(logging.INFO)
    from fedmedclip.config import TrainConfig
    from fedmedclip.engine import train
    from pipelines.local import run_local

    # Separate caches: the pipeline's tasks encode their own images rather than reuse the engine's features.
    run = run_local(
        small_yaml,
        tmp_path / "root",
        tmp_path / "pipeline_run",
        cache_dir=str(tmp_path / "cache_pipeline"),
        synthetic=json.dumps(SYNTH),
        export_site="",  # the ONNX export has its own tests; it would double this test's time
        log_path=tmp_path / "pipeline.log",
    )
    log_text = (tmp_path / "pipeline.log").read_text()  # kfp.local's task streams went to the log
    assert "Executing task" in log_text and "aggregate" in log_text
    assert not [
        r for r in caplog.records if r.getMessage().startswith("Cleaned up workspace")
    ]  # not on the console
    assert run.model_uri == ""  # no tracking server configured: registration skipped cleanly
    cfg = TrainConfig(
        sites=2,
        rounds=2,
        out=str(tmp_path / "engine_run"),
        cache_dir=str(tmp_path / "cache_engine"),
        synthetic=SYNTH,
    )
    ref = train(cfg, progress=False)

    got = run.results
    assert got["metrics"] == ref["metrics"]  # exact equality, every float
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(got["history"]) == strip(ref["history"])
    for key in ("reliability", "comm", "features", "partition", "method_options", "backbone", "site_names"):
        assert got[key] == ref[key], key
    a, b = Path(run.run_dir), Path(cfg.out)
    for rel in ["partition.json", "provenance.json", *(f"rounds/{p.name}" for p in (b / "rounds").iterdir())]:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel
    for f in (b / "model").glob("*.safetensors"):
        assert filecmp.cmp(a / "model" / f.name, f, shallow=False), f.name
    assert json.loads((a / "model" / "model.json").read_text()) == json.loads(
        (b / "model" / "model.json").read_text()
    )
    assert (a / "plots" / "accuracy.png").exists()

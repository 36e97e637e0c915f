"""The Kubeflow pipeline: one compiled graph for any sites and rounds (run-time parameters), each party one task
(its extraction, then its worker) reading only its own Secret, a GPU only for that task, resources/retries/timeouts
on every task, caching keyed on what a task depends on, parameters validated before anything starts and documented; and the compiled YAML itself, run with
kfp.local (every worker at once), gives `fedmedclip train`'s metrics and payloads."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("kfp")

from conftest import SYNTH  # noqa: E402
from test_kfp_local import MAX_PIPELINE_YAML_BYTES, assert_same_yaml_for_every_size  # noqa: E402

from components.kfp_components import DEFAULT_BASE_IMAGE, MLFLOW_SECRET_NAME  # noqa: E402
from fedmedclip.cli import main  # noqa: E402
from mlops.sites import ENDPOINTS_CONFIGMAP, SERVER_SECRET_NAME  # noqa: E402
from pipelines.pipeline import DEFAULT_YAML, CompileOptions, build_pipeline, compile_pipeline  # noqa: E402

pytestmark = pytest.mark.heavy  # the kfp.local run (tests/conftest.py hands such files out first)


def _load(path=DEFAULT_YAML):
    ir, platform = list(yaml.safe_load_all(Path(path).read_text()))
    return ir, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _executor(ir, component: str) -> str:
    return ir["components"][component]["executorLabel"]


def _party_dag(ir) -> dict:
    return ir["components"]["comp-federation-party"]["dag"]["tasks"]


# ------------------------------------------------------------------------------------------- the graph
def test_committed_yaml_is_fresh(tmp_path):
    fresh = compile_pipeline(tmp_path / "p.yaml")
    assert fresh.read_text() == DEFAULT_YAML.read_text(), (
        "pipelines/fedmedclip_pipeline.yaml is stale relative to the code: run `fedmedclip pipeline compile`"
    )


def test_one_yaml_for_every_number_of_sites_and_rounds(tmp_path):
    # Sites and rounds are not compile options any more: the build cannot depend on them, and the YAML stays
    # far below Argo's etcd limit. They are run-time parameters, and the parties' loop iterates over what
    # prepare computes from them (not over a list fixed at compile time).
    size = assert_same_yaml_for_every_size(lambda sites, rounds: build_pipeline(), tmp_path)
    assert size < MAX_PIPELINE_YAML_BYTES
    ir, _ = _load()
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert {"settings", "site_names", "mailbox", "max_epsilon"} <= set(params)
    # the run's settings: one structured parameter; a key left out takes its declared default
    assert params["settings"]["parameterType"] == "STRUCT" and params["settings"]["defaultValue"] == {}
    (loop,) = [t for t in ir["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
    assert loop["parameterIterator"]["items"] == {
        "inputParameter": "pipelinechannel--prepare-component-Output"
    }
    inner = ir["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert [t["componentRef"]["name"] for t in inner.values()] == ["comp-federation-party"]
    # One task per party: its extraction, then its worker, in one process (one cold start, not two).
    assert set(_party_dag(ir)) == {"worker-component"}
    # Nothing after the loop starts before every worker is done; no round or site appears in the graph.
    names = {t["taskInfo"]["name"] for t in ir["root"]["dag"]["tasks"].values()}
    assert not [n for n in names if "round" in n or "site_" in n]
    report = ir["root"]["dag"]["tasks"]["report-component"]
    assert "for-loop-1" in report["dependentTasks"]


def test_each_party_reads_only_the_secret_its_loop_item_names():
    ir, k8s = _load()
    for task in ("worker-component",):
        ex = k8s[_executor(ir, _party_dag(ir)[task]["componentRef"]["name"])]
        s3 = [
            s
            for s in ex["secretAsEnv"]
            if {e["envVar"] for e in s["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        ]
        assert len(s3) == 1 and s3[0]["secretNameParameter"] == {"componentInputParameter": "secret"}, task
        assert "secretName" not in s3[0] and s3[0]["optional"] is False
    worker = k8s[_executor(ir, _party_dag(ir)["worker-component"]["componentRef"]["name"])]
    (mlflow,) = [
        s for s in worker["secretAsEnv"] if s["secretNameParameter"] != {"componentInputParameter": "secret"}
    ]
    assert (
        mlflow["secretNameParameter"] == {"componentInputParameter": "tracking_secret"} and mlflow["optional"]
    )
    # The loop hands each party its own item's fields.
    party_inputs = next(t for t in ir["components"]["comp-for-loop-1"]["dag"]["tasks"].values())["inputs"][
        "parameters"
    ]
    assert party_inputs["secret"]["parameterExpressionSelector"] == 'parseJson(string_value)["secret"]'
    # The server's tasks outside the loop hold the server's credentials, never a site's; registration only
    # MLflow's. Every task that may touch S3 finds its endpoint in the optional ConfigMap.
    for name in ("prepare-component", "report-component"):
        ex = k8s[_executor(ir, ir["root"]["dag"]["tasks"][name]["componentRef"]["name"])]
        assert [s["secretName"] for s in ex["secretAsEnv"]] == [SERVER_SECRET_NAME], name
        assert [m["configMapName"] for m in ex["configMapAsEnv"]] == [ENDPOINTS_CONFIGMAP]
    reg = k8s[_executor(ir, "comp-register-component")]
    assert [s["secretName"] for s in reg["secretAsEnv"]] == [MLFLOW_SECRET_NAME]
    assert "MLFLOW_TRACKING_URI" in {e["envVar"] for m in reg["configMapAsEnv"] for e in m["keyToEnv"]}


def test_resources_retries_timeouts_and_gpu_only_for_the_parties(tmp_path):
    ir, k8s = _load()
    executors = ir["deploymentSpec"]["executors"]
    assert len(executors) == 5
    for label, ex in executors.items():
        res = ex["container"]["resources"]
        for key in ("cpuRequest", "cpuLimit", "memoryRequest", "memoryLimit"):
            assert res.get(key), (label, key)
        assert ("accelerator" in res) == (label == "exec-worker-component"), label
        assert int(k8s[label]["activeDeadlineSeconds"]) > 0, label
        assert ex["container"]["image"] == DEFAULT_BASE_IMAGE
        assert "pip install" not in " ".join(ex["container"]["command"])
    acc = executors["exec-worker-component"]["container"]["resources"]["accelerator"]
    assert (acc["resourceType"], acc["resourceCount"]) == ("nvidia.com/gpu", "1")
    worker = _party_dag(ir)["worker-component"]
    assert worker["retryPolicy"]["maxRetryCount"] >= 3 and worker["retryPolicy"]["backoffDuration"]

    opts = CompileOptions(
        gpu_node_selector={"nvidia.com/gpu.present": "true"},
        gpu_tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
    )
    ir2, k8s2 = _load(compile_pipeline(tmp_path / "gpu.yaml", opts))
    party = k8s2["exec-worker-component"]
    assert party["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert party["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert not [e for label, e in k8s2.items() if "nodeSelector" in e and label != "exec-worker-component"]
    ir3, _ = _load(compile_pipeline(tmp_path / "cpu.yaml", CompileOptions(gpu=False)))
    assert not [
        e for e in ir3["deploymentSpec"]["executors"].values() if "accelerator" in e["container"]["resources"]
    ]


def test_caching_is_keyed_on_what_each_task_depends_on():
    ir, _ = _load()
    dag = _party_dag(ir)
    # A party's task is never cached (its worker runs the federation); a retry reuses the features it
    # published (components/worker/test_worker.py), and prepare is cached on the run's settings.
    assert not dag["worker-component"]["cachingOptions"].get("enableCache")
    assert ir["root"]["dag"]["tasks"]["prepare-component"]["cachingOptions"].get("enableCache") is True
    for name in ("report-component", "register-component"):
        assert not ir["root"]["dag"]["tasks"][name]["cachingOptions"].get("enableCache"), name


def test_pipeline_parameters_are_documented():
    ir, _ = _load()
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert len(params) >= 13
    assert not [n for n, p in params.items() if not p.get("description")]


def test_every_component_input_and_output_is_described_and_the_onnx_is_a_model(tmp_path):
    """What the KFP UI shows for each task: a description of every input and output (one table,
    PARAMETER_DOCS), the ONNX export typed as a Model; a party's task name says GPU only with one."""
    ir, _ = _load()
    described, missing = 0, []
    for name, component in ir["components"].items():
        if name.startswith("comp-for-loop"):
            continue  # KFP's own loop plumbing (pipelinechannel--...), not ours to describe
        for side in ("inputDefinitions", "outputDefinitions"):
            for kind in ("parameters", "artifacts"):
                for key, spec in (component.get(side, {}).get(kind) or {}).items():
                    described += 1
                    if not spec.get("description"):
                        missing.append(f"{name} {side} {key}")
    assert described > 50 and not missing, missing
    onnx = ir["components"]["comp-export-component"]["outputDefinitions"]["artifacts"]["onnx"]
    assert onnx["artifactType"]["schemaTitle"] == "system.Model"
    register = ir["components"]["comp-register-component"]
    assert register["inputDefinitions"]["artifacts"]["onnx"]["artifactType"]["schemaTitle"] == "system.Model"
    assert set(register["outputDefinitions"]["parameters"]) == {"model_uri", "promotion"}
    assert set(ir["root"]["outputDefinitions"]["parameters"]) == {"model_uri", "promotion"}

    def party_name(path):
        party = yaml.safe_load_all(Path(path).read_text()).__next__()["components"]["comp-federation-party"]
        return party["dag"]["tasks"]["worker-component"]["taskInfo"]["name"]

    assert party_name(DEFAULT_YAML) == "extract features (GPU), then the federation worker"
    assert party_name(compile_pipeline(tmp_path / "cpu.yaml", CompileOptions(gpu=False))) == (
        "extract features, then the federation worker"
    )


def test_the_cli_validates_before_anything_is_compiled_or_started(tmp_path, capsys):
    root = tmp_path / "root"
    for bad, message in (
        (["--method", "nope"], "unknown method"),
        (["--method-opt", "nope=1"], "unknown option"),
        (["--partition", "dirichlet"], "needs --alpha"),
        (["--codec", "nope"], "unknown codec"),
    ):
        assert main(["pipeline", "run", "--local", "--pipeline-root", str(root), *bad]) == 2, bad
        assert message in capsys.readouterr().err, bad
        assert main(["pipeline", "submit", "--host", "http://127.0.0.1:9", *bad]) == 2, bad
    assert not root.exists()  # nothing compiled, no task started
    # without --local: one line, where argparse's `required` printed the whole usage (50 lines) before it
    capsys.readouterr()
    assert main(["pipeline", "run", "--pipeline-root", str(root)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: pipeline run runs on this machine: give --local (a cluster: `pipeline submit --host URL`)"
    )
    assert not root.exists()


def test_the_pipeline_cli_takes_the_trainings_flags():
    from fedmedclip.cli import build_parser
    from pipelines.cli import validated_config

    args = build_parser().parse_args(
        [
            "pipeline", "run", "--local", "--split", "0.7,0.2,0.1", "--reference-fraction", "0.2",
            "--transductive", "--skip-bad-images", "--prompt-template", "an MRI of {}",
            "--method-opt", "local_epochs=2", "--codec-up", "int8-zlib", "--codec-down", "fp32-zlib",
        ]
    )  # fmt: skip
    cfg = validated_config(args)
    assert cfg.split_ratio == (0.7, 0.2, 0.1) and cfg.transductive and cfg.skip_bad_images
    assert cfg.prompt_template == "an MRI of {}" and cfg.method_options == {"local_epochs": 2}
    assert (cfg.codec_up, cfg.codec_down) == ("int8-zlib", "fp32-zlib")
    both = validated_config(build_parser().parse_args(["pipeline", "run", "--local", "--codec", "int8-zlib"]))
    assert (both.codec_up, both.codec_down) == ("int8-zlib", "int8-zlib")


def test_every_option_of_train_and_server_run_reaches_the_pipelines_settings():
    """What `train` and `server run` take reaches the pipeline's one `settings` parameter, typed as declared
    (fedmedclip/flags.py); the registry's privacy budget is the register task's `max_epsilon`."""
    from fedmedclip.cli import build_parser
    from pipelines.cli import pipeline_arguments, validated_config

    args = build_parser().parse_args(
        [
            "pipeline", "submit", "--host", "http://127.0.0.1:9", "--aggregator", "median", "--duplicates", "keep", "--norm-factor", "5",
            "--max-update-norm", "2.5", "--clip-updates", "--quorum", "2", "--round-timeout", "30",
            "--dp-target-epsilon", "8", "--max-epsilon", "8",
        ]
    )  # fmt: skip
    params = pipeline_arguments(args, validated_config(args))
    settings = params["settings"]
    assert (settings["aggregator"], settings["duplicates"], settings["privacy"]) == (
        "median", "keep", {"target_epsilon": 8.0}
    )  # fmt: skip
    assert (settings["norm_factor"], settings["max_update_norm"], settings["clip_updates"]) == (
        5.0,
        2.5,
        True,
    )
    assert (settings["quorum"], settings["round_timeout"], settings["join_timeout"]) == (2, 30.0, 3600.0)
    assert settings["cache_dir"] == "/tmp/fedmedclip-cache" and params["max_epsilon"] == 8.0
    assert "federation" not in settings and "out" not in settings and "stall_every" not in settings


def test_the_pipelines_own_parameters_are_declared_once_with_the_pipelines_defaults():
    """Every parameter of the compiled pipeline besides `settings` and `local_stack` is a field of RunParameters
    (components/run_parameters.py) with the pipeline's default, its description in the KFP UI is its flag's
    help (`pipeline run --help`), and a command line gives the pipeline exactly its parameters."""
    from dataclasses import fields

    from fedmedclip.cli import build_parser
    from pipelines.cli import RunParameters, pipeline_arguments, validated_config

    ir, _ = _load()
    compiled = {k: v["defaultValue"] for k, v in ir["root"]["inputDefinitions"]["parameters"].items()}
    declared = {f.name: f.default for f in fields(RunParameters)}
    assert {**declared, "settings": {}, "local_stack": ""} == compiled
    params = ir["root"]["inputDefinitions"]["parameters"]
    described = {k: " ".join(v["description"].split()) for k, v in params.items()}
    run = build_parser()
    for command in ("pipeline", "run"):
        run = next(a for a in run._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    helps = {a.dest: a.help for a in run._actions}
    for name, default in declared.items():
        help = helps[name] % {"default": default}
        assert described[name] == help[0].upper() + help[1:] + ".", name
    args = build_parser().parse_args(["pipeline", "submit", "--host", "h", "--alias", "", "--allow-worse"])
    params = pipeline_arguments(args, validated_config(args))
    assert set(params) == set(compiled)
    assert (params["promote_alias"], params["allow_worse"], params["max_epsilon"]) == ("", True, 0.0)


ADD_A_RUN_PARAMETER = """
import dataclasses, json, sys
import components.run_parameters as declared
from fedmedclip.flags import setting

@dataclasses.dataclass
class WithOneMore(declared.RunParameters):
    review_queue: str = setting("radiology", group="registry", help="queue the new version waits in")

declared.RunParameters = WithOneMore  # the one place a field is added, before anything reads it
from fedmedclip.cli import build_parser, main
from pipelines.cli import pipeline_arguments, validated_config

assert main(["pipeline", "compile", "--out", sys.argv[1]]) == 0
args = build_parser().parse_args(["pipeline", "submit", "--host", "h", "--review-queue", "oncology"])
print(json.dumps(pipeline_arguments(args, validated_config(args))["review_queue"]))
"""


def test_a_run_parameter_added_to_its_declaration_reaches_the_flags_the_pipeline_and_the_kfp_ui(tmp_path):
    """RunParameters is the one place a pipeline parameter is added: its flag, its argument, the compiled
    pipeline's parameter (type, default) and its description follow (a fresh process, as a new field would be)."""
    import subprocess
    import sys

    out = tmp_path / "p.yaml"
    done = subprocess.run(
        [sys.executable, "-c", ADD_A_RUN_PARAMETER, str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == "oncology"
    ir, _ = _load(out)
    added = ir["root"]["inputDefinitions"]["parameters"]["review_queue"]
    assert (added["defaultValue"], added["parameterType"]) == ("radiology", "STRING")
    assert added["description"] == "Queue the new version waits in."


def test_cli_compile(tmp_path):
    out = tmp_path / "p.yaml"
    assert (
        main(["pipeline", "compile", "--no-gpu", "--resources", "worker=2,4,8Gi,16Gi", "--out", str(out)])
        == 0
    )
    ir, _ = _load(out)
    res = ir["deploymentSpec"]["executors"]["exec-worker-component"]["container"]["resources"]
    assert (res["cpuRequest"], res["memoryLimit"]) == (2.0, 17.179869184)
    assert main(["pipeline", "compile", "--resources", "nope=1", "--out", str(out)]) == 2


@pytest.mark.parametrize("name", ["", "pipeline.json", "pipeline"])
def test_compile_to_a_path_that_is_no_yaml_file_is_one_line(tmp_path, capsys, name):
    """kfp writes only .yaml/.yml (its Kubernetes settings do not fit .json): `--out DIR` or another name was a
    ValueError traceback; now one line, and nothing created."""
    out = tmp_path / "new" / name if name else tmp_path
    assert main(["pipeline", "compile", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ending in .yaml" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_compile_options_are_declared_once_for_compile_run_submit_and_demo():
    """Each CompileOptions field gives its flag, with its declared help, to `pipeline compile` and to the
    commands that compile before they run; the flags give the options, and a malformed one is a ConfigError
    naming its flag."""
    from fedmedclip.cli import build_parser
    from fedmedclip.errors import ConfigError
    from fedmedclip.flags import declared, options_from_args
    from pipelines.pipeline import DEFAULT_RESOURCES, DEFAULT_RETRIES, Resources

    def subcommand(path):
        parser = build_parser()
        for word in path.split():
            (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            parser = sub.choices[word]
        return parser

    for path in ("pipeline compile", "pipeline run", "pipeline submit", "demo"):
        actions = {a.dest: (tuple(a.option_strings), a.help) for a in subcommand(path)._actions}
        for d in declared(CompileOptions):
            assert actions.get(d.dest) == (d.flags, d.meta["help"]), (path, d.name)
    compile_ = subcommand("pipeline compile")
    assert options_from_args(compile_.parse_args([]), CompileOptions) == CompileOptions()
    argv = [
        "--base-image",
        "reg/train:1",
        "--no-gpu",
        "--gpu-node-selector",
        "pool=gpu",
        "--gpu-toleration",
        "nvidia.com/gpu:NoSchedule",
        "--gpu-toleration",
        "team=a",
        "--resources",
        "export=1,2,3Gi,4Gi",
        "--timeout",
        "worker=60",
        "--worker-retries",
        "0",
    ]
    got = options_from_args(compile_.parse_args(argv), CompileOptions)
    assert (got.base_image, got.gpu, got.gpu_node_selector) == ("reg/train:1", False, {"pool": "gpu"})
    assert got.gpu_tolerations == (
        {"key": "nvidia.com/gpu", "operator": "Exists", "value": None, "effect": "NoSchedule"},
        {"key": "team", "operator": "Equal", "value": "a", "effect": None},
    )
    assert got.resources == {**DEFAULT_RESOURCES, "export": Resources("1", "2", "3Gi", "4Gi")}
    assert (got.timeouts["worker"], got.retries) == (60, {**DEFAULT_RETRIES, "worker": 0})
    for bad, flag in (
        (["--timeout", "worker=1h"], "--timeout"),
        (["--gpu-node-selector", "pool"], "--gpu-node-selector"),
        (["--gpu-toleration", ":NoSchedule"], "--gpu-toleration"),
        (["--gpu-toleration", "k:Bogus"], "--gpu-toleration"),
        (["--resources", "worker=1,2,lots,4Gi"], "--resources"),
        (["--resources", "worker=,,,"], "--resources"),
        (["--worker-retries", "-1"], "--worker-retries"),
    ):
        with pytest.raises(ConfigError, match=flag):
            options_from_args(compile_.parse_args(bad), CompileOptions)


# ------------------------------------------------------------------------------------------- execution
@pytest.mark.slow
def test_compiled_yaml_runs_locally_with_every_worker_at_once_and_matches_the_engine(
    mlops_stack, tmp_path, capsys
):
    """`make demo`'s path with the committed YAML on kfp.local: data published one prefix per holder, every task
    with only its own role's key of the local stack (as each pod gets only its own Secret), the mailbox in the
    same bucket; prepare, three parties (each one task: its extraction, then the server and the two site workers
    running at the same time), report, the ONNX export (with the OOD score), registration and promotion. Metrics and payloads are
    `fedmedclip train`'s."""
    import uuid

    from devstack.stack import add_data_root, use_stack_s3
    from fedmedclip.config import TrainConfig
    from fedmedclip.engine import train
    from mlops.site_data import publish
    from pipelines.local import run_local, server_status_reader

    bucket = f"fmc-pipe-{uuid.uuid4().hex[:10]}"
    add_data_root(mlops_stack.data_dir, bucket)
    cache = tmp_path / "cache"
    # Enough server images (global test + reference) for the export's OOD score to calibrate on half of them.
    synth = {**SYNTH, "test_per_class": 8}
    cfg = TrainConfig(sites=2, rounds=3, out=str(tmp_path / "engine"), cache_dir=str(cache), synthetic=synth)
    use_stack_s3(mlops_stack, "publisher")
    publish(cfg, bucket, progress=False)
    model = f"pipe-{bucket}"
    run = run_local(
        DEFAULT_YAML,
        tmp_path / "root",
        tmp_path / "pipeline_run",
        log_path=tmp_path / "pipeline.log",
        progress=True,  # as `demo` shows it: a bar over the tasks, one over the rounds the server closed
        rounds_of=server_status_reader(f"s3://{bucket}", mlops_stack.data_dir),
        settings={
            "sites": 2,
            "rounds": 3,
            "data": f"s3://{bucket}",
            "cache_dir": str(tmp_path / "task_cache"),
            "synthetic": synth,
            "join_timeout": 300.0,
        },
        local_stack=mlops_stack.data_dir,
        export_site="global",
        tracking_uri=mlops_stack.tracking_uri,
        model_name=model,
    )
    bars = capsys.readouterr().err
    # Every task's bar ends full: prepare, report, export, register (the parties' loop has the rounds' bar).
    assert re.search(r"pipeline tasks: 100%\S* 4/4", bars), bars[-2000:]
    assert re.search(r"federated rounds: 100%\S* 3/3", bars), bars[-2000:]
    run_id = run.results["run_id"]
    ref = train(cfg, progress=False, run_id=run_id)  # the same run id: byte-identical payloads

    got = run.results
    assert got["metrics"] == ref["metrics"]  # exact equality, every float
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "finished_at")} for r in h]  # noqa: E731
    assert strip(got["history"]) == strip(ref["history"])
    assert got["comm"] == ref["comm"] and got["features"] == ref["features"]
    a, b = Path(run.run_dir), Path(cfg.out)
    for rel in [
        "partition.json",
        "provenance.json",
        "model/global.safetensors",
        "model/text_features.safetensors",
        "model/model.json",
        *(f"rounds/{p.name}" for p in (b / "rounds").iterdir()),
    ]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # Each party staged only its own prefix.
    staged = tmp_path / "task_cache" / "s3" / bucket
    assert sorted(p.name for p in staged.iterdir()) == ["server", "sites"]
    # Each worker waits for the others through the mailbox: the run can only have finished with all of them
    # running at once. Every party says so in its status.
    admin = mlops_stack.s3_client()
    status = {
        party: json.loads(
            admin.get_object(Bucket=bucket, Key=f"runs/{run_id}/status/{party}.json")["Body"].read()
        )
        for party in ("server", "site_0", "site_1")
    }
    assert {s["state"] for s in status.values()} == {"done"}
    # Each party published its features to its own private area of the run, with its own key (a retried
    # task fetches them there instead of encoding again).
    for area in (f"runs/{run_id}/server/features", *(f"sites/{k}/private/{run_id}/features" for k in (0, 1))):
        admin.head_object(Bucket=bucket, Key=f"{area}/manifest.json")
    assert (a / "plots" / "accuracy.png").exists()
    # The export task, with the server's credentials, fitted the global model's OOD score on the server's
    # images (without them it would export the classifier alone, with a warning).
    import onnx

    (exported,) = Path(run.pipeline_root).rglob("model.onnx")
    assert "ood_score" in [o.name for o in onnx.load(str(exported), load_external_data=False).graph.output]
    # Registered and promoted in MLflow, loadable by alias, with the run's data recorded.
    assert run.model_uri == f"models:/{model}@champion" and run.promotion == "promoted"
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlops_stack.tracking_uri)
    version = client.get_model_version_by_alias(model, "champion")
    assert client.get_run(version.run_id).data.params["data"] == f"s3://{bucket}"


# ------------------------------------------------------------------------------------------- submit
@contextlib.contextmanager
def _fake_kfp_api(answers: dict[str, tuple[int, dict]]):
    """A real HTTP server on loopback standing in for the KFP API: `answers` maps a path prefix to (status,
    JSON body, or raw bytes). Yields (its URL, the requests seen: method, path, headers)."""
    from conftest import stand_in_http_server

    seen = []

    def answer(method, path, headers):
        seen.append((method, path, headers))
        status, body = next((v for k, v in answers.items() if path.startswith(k)), (404, {"error": "nope"}))
        return status, body if isinstance(body, bytes) else json.dumps(body).encode(), "application/json"

    with stand_in_http_server(answer) as url:
        yield url, seen


def test_submit_signs_in_and_says_in_one_line_what_went_wrong(tmp_path, capsys):
    from conftest import free_port

    submit = ["pipeline", "submit", "--yaml", str(DEFAULT_YAML), "--rounds", "2"]
    healthz = "/apis/v2beta1/healthz"

    def run(host, *extra):
        code = main([*submit, "--host", host, *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err  # one line, no traceback
        return err

    assert "cannot reach the Kubeflow Pipelines API" in run(f"http://127.0.0.1:{free_port()}")
    assert "--host 127.0.0.1:1: give the scheme, e.g. http://127.0.0.1:1" in run("127.0.0.1:1")
    token_file = tmp_path / "token"
    token_file.write_text("sa-token-123\n")
    with _fake_kfp_api({healthz: (401, {"error": "Unauthenticated", "code": 16})}) as (url, seen):
        err = run(url, "--token-file", str(token_file))
        assert "HTTP 401" in err and "--token" in err and "--cookies" in err
        assert seen[-1][2]["Authorization"] == "Bearer sa-token-123"
        run(url, "--cookies", "authservice_session=abc")
        assert seen[-1][2]["Cookie"] == "authservice_session=abc"
    not_a_ca = tmp_path / "ca.pem"
    not_a_ca.write_text("not a certificate\n")
    with _fake_kfp_api({healthz: (200, {"tag_name": "2.2.0", "multi_user": False})}) as (url, _):
        err = run(url, "--token", "t")
        assert "is 2.2.0" in err and "2.15 or newer" in err
        assert "--ssl-ca-cert" in run(url, "--ssl-ca-cert", str(not_a_ca))
    # something else answers: not JSON, not UTF-8, or JSON that is not an object
    for body in (b"<html>", b"\xff\xfe\xfd", [], "ok"):
        with _fake_kfp_api({healthz: (200, body)}) as (url, _):
            assert "did not answer a JSON object" in run(url), body
    # healthy, but the API fails: the HTTP error in one line (kfp's retries and tracebacks kept off); a tag of
    # more digits than a version has is no version (it ended in int()'s ValueError over 4,300 digits)
    for tag in ("2.17.0", "1" * 5000 + ".0"):
        failing = {healthz: (200, {"tag_name": tag, "multi_user": False}), "/": (500, {"error": "boom"})}
        with _fake_kfp_api(failing) as (url, seen):
            err = run(url, "--token", "t")
            assert "HTTP 500" in err and "boom" in err
            assert any(method == "POST" or "experiments" in path for method, path, _ in seen)
    # compiling for a cluster needs the image that was built and pushed, not the placeholder
    assert main(["pipeline", "submit", "--host", "http://127.0.0.1:9"]) == 2
    assert "--base-image" in capsys.readouterr().err
    # a --yaml that is no compiled pipeline: one line before the endpoint is asked (kfp's loader raised, or the
    # API refused it after sign-in)
    (tmp_path / "other.yaml").write_text("just: text\n")
    err = run("http://127.0.0.1:9", "--yaml", str(tmp_path / "other.yaml"))
    assert err.startswith(f"error: --yaml {tmp_path / 'other.yaml'}: not a compiled pipeline YAML"), err


def test_every_option_of_every_command_says_what_it_does(capsys):
    """No flag without help text, in any command of any layer; the top-level description is whole; a bad
    --codec is named by the flag that was given."""
    import argparse

    from fedmedclip.cli import DESCRIPTION, build_parser

    def undocumented(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from undocumented(child, [*path, name])
            elif not action.help and action.dest != "help":
                yield f"{' '.join(path)} {action.option_strings or action.dest}"

    parser = build_parser()
    assert list(undocumented(parser, ["fedmedclip"])) == []
    assert parser.description == DESCRIPTION and DESCRIPTION.endswith("docs/algorithms.md.")
    assert main(["pipeline", "run", "--local", "--codec", "zip"]) == 2
    assert "unknown codec 'zip' for --codec;" in capsys.readouterr().err
    # a round's seconds at the end of a run: round 1 (which waits for the sites to start) apart
    from fedmedclip.cli import _round_time

    assert _round_time([{"seconds": 15.0}, {"seconds": 0.2}, {"seconds": 0.4}]).startswith(
        "0.30 s per round after round 1 (15.00 s"
    )


def test_verbosity_flags_are_accepted_after_the_command():
    from fedmedclip.cli import build_parser

    args = build_parser().parse_args(["pipeline", "run", "--local", "-v"])
    assert args.verbose is True and args.quiet is False
    assert build_parser().parse_args(["-v", "pipeline", "run", "--local"]).verbose is True
    assert build_parser().parse_args(["demo", "-q"]).quiet is True


def test_quiet_silences_data_publish_before_or_after_the_command():
    """`fedmedclip -q data publish` showed the progress bar and `data publish -q` was refused: the command had
    its own --quiet, whose default overwrote the top-level -q."""
    from fedmedclip.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["-q", "data", "publish"]).quiet is True
    assert parse(["data", "publish", "-q"]).quiet is True
    assert parse(["data", "publish", "--quiet"]).quiet is True
    assert parse(["data", "publish"]).quiet is False


def test_round_progress_comes_from_the_servers_status_in_the_mailbox(tmp_path, mlops_stack):
    """`pipeline run --local` and `demo` show the rounds as the server closes them, read from the server's
    status in the mailbox (a local folder, or S3 with the local stack's key) of the run they started."""
    import uuid

    from devstack.stack import add_data_root
    from fedmedclip.federation.mailbox import Mailbox
    from fedmedclip.federation.storage import open_store
    from mlops.s3 import S3Store
    from pipelines.local import rounds_closed, server_status_reader

    bucket = f"fmc-progress-{uuid.uuid4().hex[:8]}"
    add_data_root(mlops_stack.data_dir, f"{bucket}/fed")
    for url, store in (
        (str(tmp_path / "mailbox"), open_store(str(tmp_path / "mailbox"))),
        (f"s3://{bucket}/fed", S3Store(f"s3://{bucket}/fed", mlops_stack.s3_client("server"))),
    ):
        reader = server_status_reader(url, mlops_stack.data_dir)
        assert reader() is None  # no run yet
        mb = Mailbox(store, "4711")
        mb.put_json(mb.manifest_key, {"run_id": "4711"})
        mb.put_status("server", "waiting_updates", 4)
        assert rounds_closed(reader(), 10) == 3, url
        mb.put_status("server", "done", 10, best_round=7)
        status = reader()
        assert rounds_closed(status, 10) == 10 and status.best_round == 7, url


@pytest.mark.parametrize(
    "text, why",
    [
        ("hello world\n", "AttributeError"),
        ("a: [b\n", "ParserError: expected ',' or ']'"),
        ("a:\n\tb: 1\n", "ScannerError: found character '\\t'"),
        ("a: 1\n", "KeyError"),
        ("", "no such file"),
    ],
    ids=["text", "unclosed", "tab", "not-a-pipeline", "missing"],
)
def test_run_with_a_yaml_that_is_no_compiled_pipeline_is_one_line_before_anything_starts(
    text, why, tmp_path, capsys
):
    """kfp's loader raised AttributeError, KeyError or YAML's errors as tracebacks; now one line naming --yaml."""
    yaml_file = tmp_path / ("afile.txt" if text else "missing.yaml")
    if text:
        yaml_file.write_text(text)
    root = tmp_path / "root"
    assert main(["pipeline", "run", "--local", "--yaml", str(yaml_file), "--pipeline-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: --yaml {yaml_file}: ") and why in err, err
    assert not root.exists()  # nothing started


def test_run_with_another_pipelines_yaml_is_one_line(tmp_path, capsys):
    from kfp import compiler, dsl

    def echo(a: int) -> int:
        return a

    def other(x: int = 1):
        component(a=x)

    # Real types for kfp: this module's annotations are strings (`from __future__ import annotations`).
    echo.__annotations__, other.__annotations__ = {"a": int, "return": int}, {"x": int}
    component = dsl.component(echo, base_image="python:3.11")
    other = dsl.pipeline(other)
    yaml_file = tmp_path / "other.yaml"
    compiler.Compiler().compile(other, str(yaml_file))
    root = tmp_path / "root"
    assert main(["pipeline", "run", "--local", "--yaml", str(yaml_file), "--pipeline-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "this pipeline has no parameter" in err, err
    assert not root.exists()


@pytest.mark.parametrize(
    "spec, what",
    [
        ("worker=4,2,8Gi,4Gi", "the CPU request 4 is above its limit 2"),
        ("worker=500m,0.4,1Gi,2Gi", "the CPU request 500m is above its limit 0.4"),
        ("worker=1,2,8Gi,4G", "the memory request 8Gi is above its limit 4G"),
        ("prepare=1,1,1025Mi,1Gi", "the memory request 1025Mi is above its limit 1Gi"),
        ("report=1,1,2G,1953124Ki", "the memory request 2G is above its limit 1953124Ki"),
    ],
)
def test_compile_refuses_a_resource_request_above_its_limit(spec, what, tmp_path, capsys):
    """Kubernetes refuses a pod whose request exceeds its limit: the flag says so, by the quantities' meaning."""
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "--resources", spec, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: --resources {spec}: {what}; a request must not exceed its limit", err
    assert not out.exists()


def test_compile_takes_a_request_equal_to_its_limit_however_spelled(tmp_path):
    """Equal amounts spelled differently are no excess: 500m is 0.5 cores, 1Gi is 1024Mi, 2G is 1953125Ki."""
    equal = ["worker=500m,0.5,1Gi,1024Mi", "prepare=1,1,2G,1953125Ki", "report=2,2000m,4000M,4G"]
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", *(f"--resources={e}" for e in equal), "--out", str(out)]) == 0
    assert "1953125Ki" in out.read_text() and "2000m" in out.read_text()


@pytest.mark.parametrize("made", [False, True], ids=["nonexistent", "no-stack-json"])
def test_run_with_a_local_stack_that_is_not_running_is_one_line_up_front(made, tmp_path, capsys):
    """An explicit --local-stack without a running stack was refused only in the prepare task, after its
    retries (about 90 s)."""
    stack_dir = tmp_path / "stack"
    if made:
        stack_dir.mkdir()
    root = tmp_path / "root"
    argv = ["pipeline", "run", "--local", "--local-stack", str(stack_dir), "--data", "s3://bkt"]
    assert main([*argv, "--pipeline-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"error: --local-stack {stack_dir}: not a running local stack (no stack.json there); start one with "
        f"`fedmedclip stack up --data-dir {stack_dir}`, or leave --local-stack out"
    ), err
    assert not root.exists()

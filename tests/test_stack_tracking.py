"""The local stack, tracking and the registry against real servers (moto S3 + MLflow), nothing mocked."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest
from botocore.exceptions import ClientError
from conftest import error_lines, free_port, free_ports
from onnx_fixtures import make_tiny_onnx, restamp_onnx
from run_fixtures import make_run_dir, run_model_digest

from devstack import cli as stack_cli
from devstack.stack import (
    StackError,
    _group_members,
    earlier_registry_note,
    mlflow_healthy,
    read_state,
    stack_status,
    start_stack,
)
from fedmedclip.digests import META_MODEL_DIGEST
from fedmedclip.errors import FedMedClipError
from mlops import cli as ccli
from mlops.model_card import read_model_card
from mlops.registry import DifferentDataRefused, Promotion, PromotionRefused, promote, register_model
from mlops.rundir import log_run_dir
from mlops.tracking import PROMOTION_METRIC, RunDirError, TrackingError

pytestmark = pytest.mark.heavy  # MLflow and S3 throughout (tests/conftest.py hands such files out first)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmedclip")
    sub = parser.add_subparsers(dest="command")
    ccli.register(sub)
    stack_cli.register(sub)
    return parser


def run_cli(*argv: str) -> int:
    args = _parser().parse_args([str(a) for a in argv])
    return args.func(args)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _processes_with(fragment: str) -> list[int]:
    found = []
    for f in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if fragment in f.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(f.parent.name))
        except OSError:
            continue
    return [p for p in found if _alive(p)]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    return make_tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


# ------------------------------------------------------------------------------------------ the stack


def test_cli_light_imports():
    import subprocess
    import sys

    code = "import sys; import mlops.cli, devstack.cli; print(sorted(m for m in ('mlflow', 'boto3', 'torch', 'kfp') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_what_the_mlops_layer_adds_is_refused_in_one_wording_where_it_cannot_be_imported(monkeypatch):
    """A core install whose MLOps layer cannot be imported (its extra absent): an s3:// mailbox, data source or
    backbone is each refused in one line naming what needs the layer and the import that failed. Simulated in
    this process as it was in a fresh one (`sys.modules['mlops'] = None`), with the layer's modules already
    imported here taken out of sys.modules for the test, so that each entry point imports it again and fails
    (a fresh interpreter for this cost 2-4 s of CPU: torch's import)."""
    import sys

    from fedmedclip.backbone import resolve_remote
    from fedmedclip.federation.storage import open_store
    from fedmedclip.sources import remote_source

    for name in [m for m in sys.modules if m == "mlops" or m.startswith("mlops.")]:
        monkeypatch.delitem(sys.modules, name)  # put back at the test's end
    monkeypatch.setitem(sys.modules, "mlops", None)
    out = []
    for call in (
        lambda: open_store("s3://b/x"),
        lambda: remote_source("s3://b"),
        lambda: resolve_remote("s3://b/clip", "."),
    ):
        try:
            call()
        except Exception as exc:
            out.append(f"{type(exc).__name__} {exc}")
    needs = (
        r"needs the MLOps layer's packages \(No module named 'mlops\.\w+'.*\); install the project with its"
    )
    assert [re.sub(needs, "NEEDS", line) for line in out] == [
        "StoreError s3://b/x: the s3:// store NEEDS `pipelines` extra",
        "ConfigError --data s3://b: reading s3:// data NEEDS `pipelines` extra",
        "BackboneNotFound backbone 's3://b/clip' (published remotely) NEEDS `pipelines` extra",
    ]


def test_stack_up_status_env_down_via_cli(tmp_path, capsys):
    data_dir = tmp_path / "stack"
    s3_port, ml_port = free_ports(2)
    sites = ("--site-names", "charite,ucsf", "--data-bucket", "fmc-hospitals")
    assert (
        run_cli("stack", "up", "--data-dir", data_dir, "--s3-port", s3_port, "--mlflow-port", ml_port, *sites)
        == 0
    )
    state = read_state(data_dir)
    pids = {name: svc.pid for name, svc in state.services.items()}
    assert set(pids) == {"s3", "mlflow"} and all(_alive(p) for p in pids.values())
    try:
        # up again: the running stack is reused, not duplicated
        assert (
            run_cli("stack", "up", "--data-dir", data_dir, "--s3-port", s3_port, "--mlflow-port", ml_port)
            == 0
        )
        assert {n: s.pid for n, s in read_state(data_dir).services.items()} == pids
        capsys.readouterr()

        assert run_cli("stack", "status", "--data-dir", data_dir) == 0
        assert "running" in capsys.readouterr().out

        assert run_cli("stack", "env", "--data-dir", data_dir) == 0
        env = capsys.readouterr().out
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{ml_port}" in env
        assert f"export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:{s3_port}" in env
        # boto3's own endpoint variable too (it was in a role's lines only: the admin's shell reached AWS)
        for key in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL_S3",
        ):
            assert f"export {key}=" in env

        # the bucket exists and is versioned
        assert state.s3_client().get_bucket_versioning(Bucket=state.bucket)["Status"] == "Enabled"
        assert state.s3_client().get_bucket_versioning(Bucket="fmc-hospitals")["Status"] == "Enabled"

        # one role per hospital, each with its own key, in a file only its owner can read
        assert stat.S_IMODE((data_dir / "stack.json").stat().st_mode) == 0o600
        assert list(state.roles) == ["publisher", "server", "charite", "ucsf", "mlflow"]
        assert (state.roles["charite"].site_index, state.roles["ucsf"].site_index) == (0, 1)
        assert run_cli("stack", "env", "--data-dir", data_dir, "--role", "ucsf") == 0
        role_env = capsys.readouterr().out
        assert f"export AWS_ACCESS_KEY_ID={state.roles['ucsf'].access_key}" in role_env
        assert "export MLFLOW_TRACKING_URI" not in role_env and "unset MLFLOW_TRACKING_URI" in role_env
        ucsf = state.s3_client("ucsf")
        ucsf.put_object(Bucket="fmc-hospitals", Key="sites/1/images/x.png", Body=b"ucsf scan")
        ucsf.put_object(Bucket="fmc-hospitals", Key="runs/r/status/ucsf.json", Body=b"{}")
        for call in (
            lambda: state.s3_client("charite").get_object(Bucket="fmc-hospitals", Key="sites/1/images/x.png"),
            lambda: ucsf.put_object(Bucket="fmc-hospitals", Key="runs/r/status/charite.json", Body=b"{}"),
        ):
            with pytest.raises(ClientError) as denied:
                call()
            assert denied.value.response["Error"]["Code"] == "AccessDenied"

        # a second stack on a taken port fails fast, naming the port and the option
        with pytest.raises(StackError, match=rf"port {s3_port} .*already in use.*--s3-port"):
            start_stack(tmp_path / "other", s3_port=s3_port, mlflow_port=free_port())
        # A crashed MLflow parent leaves its uvicorn worker serving: `down` must still stop the whole group.
        os.kill(pids["mlflow"], signal.SIGKILL)
        assert _group_members(state.services["mlflow"]), "expected the uvicorn worker to outlive its parent"
    finally:
        assert run_cli("stack", "down", "--data-dir", data_dir) == 0
    assert not any(_alive(p) for p in pids.values())
    assert not _group_members(state.services["mlflow"]) and not _group_members(state.services["s3"])
    assert not mlflow_healthy(state.tracking_uri)
    assert not (data_dir / "stack.json").exists()
    assert (
        "; the MLflow database is kept, its artifacts are not: --purge removes it)" in capsys.readouterr().err
    )
    # idempotent
    assert run_cli("stack", "down", "--data-dir", data_dir) == 0
    assert run_cli("stack", "status", "--data-dir", data_dir) == 1
    # The database stays (runs, versions), their artifacts do not: `stack up` says so where versions exist.
    assert earlier_registry_note(data_dir) is None  # MLflow's schema, nothing registered
    with sqlite3.connect(data_dir / "mlflow.db") as db:
        db.execute("INSERT INTO registered_models (name, creation_time) VALUES ('m', 0)")
        db.execute(
            "INSERT INTO model_versions (name, version, creation_time, current_stage, status) "
            "VALUES ('m', 1, 0, 'None', 'READY')"
        )
    assert "lists 1 registered model version(s) whose files did not survive" in earlier_registry_note(
        data_dir
    )
    odd = tmp_path / "a #1 ?stack"  # read as a URI: a '#' or '?' in the path cut it (no warning at all)
    odd.mkdir()
    shutil.copyfile(data_dir / "mlflow.db", odd / "mlflow.db")
    assert "lists 1 registered model version(s)" in earlier_registry_note(odd)
    with pytest.raises(StackError, match="stack up"):
        run_cli("stack", "env", "--data-dir", data_dir)


def test_taken_default_ports_are_replaced_and_asked_ports_are_kept(monkeypatch):
    """`stack up` and `demo` choose their ports with one function: a default port in use is replaced by a free
    one (and a note says which), a port asked for (option or $FEDMEDCLIP_S3_PORT) is used or refused."""
    import socket

    from devstack import stack

    with socket.socket() as s3_taken, socket.socket() as mlflow_taken:
        for sock in (s3_taken, mlflow_taken):
            sock.bind(("127.0.0.1", 0))
            sock.listen(1)
        busy = (s3_taken.getsockname()[1], mlflow_taken.getsockname()[1])
        monkeypatch.setattr(stack, "DEFAULT_S3_PORT", busy[0])  # as if 9000 and 5000 were taken
        monkeypatch.setattr(stack, "DEFAULT_MLFLOW_PORT", busy[1])
        for env in (stack.S3_PORT_ENV, stack.MLFLOW_PORT_ENV):
            monkeypatch.delenv(env, raising=False)
        ports, notes = stack.stack_ports("127.0.0.1")
        assert len(set(ports)) == 2 and not set(ports) & set(busy)
        assert len(notes) == 2
        assert notes[0].startswith(f"port {busy[0]} is taken: the S3 server listens on {ports[0]} instead")
        assert notes[1].startswith(
            f"port {busy[1]} is taken: the MLflow server listens on {ports[1]} instead"
        )
        # asked for: kept when free, refused (naming the option and the variable) when taken
        free_s3, free_ml = free_ports(2)
        monkeypatch.setenv(stack.S3_PORT_ENV, str(free_s3))
        assert stack.stack_ports("127.0.0.1", mlflow_port=free_ml) == ([free_s3, free_ml], [])
        monkeypatch.setenv(stack.S3_PORT_ENV, str(busy[0]))
        with pytest.raises(StackError, match=rf"port {busy[0]} .*in use.*--s3-port.*FEDMEDCLIP_S3_PORT"):
            stack.stack_ports("127.0.0.1")
        with pytest.raises(StackError, match=rf"port {busy[1]} .*in use.*--mlflow-port"):
            stack.stack_ports("127.0.0.1", free_s3, busy[1])
    # the demo's and stack up's options reach the same function
    from fedmedclip.cli import build_parser

    args = build_parser().parse_args(["demo", "--s3-port", "9100", "--mlflow-port", "5100"])
    assert (args.s3_port, args.mlflow_port) == (9100, 5100)
    assert build_parser().parse_args(["stack", "up"]).s3_port is None  # resolved by stack_ports


def test_the_cli_turns_mlflow_usage_telemetry_off_unless_asked(tmp_path, monkeypatch, capsys):
    """MLflow 3 sends usage events to mlflow.org by default; a `fedmedclip` command (and what it starts) does not,
    unless the user set MLFLOW_DISABLE_TELEMETRY=false."""
    from fedmedclip.cli import main

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    assert main(["stack", "status", "--data-dir", str(tmp_path)]) == 1
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    assert main(["stack", "status", "--data-dir", str(tmp_path)]) == 1
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"


def test_add_bucket_takes_the_bucket_as_an_s3_url_too(mlops_stack, capsys):
    """`stack add-bucket s3://BUCKET` (as `data publish --to` spells a bucket) said "'s3:' is not a valid
    bucket name"."""
    import uuid

    bucket = f"fmc-url-{uuid.uuid4().hex[:8]}"
    assert run_cli("stack", "add-bucket", "--data-dir", mlops_stack.data_dir, f"s3://{bucket}/fed") == 0
    assert f"granted on {bucket}/fed (versioned)" in capsys.readouterr().err
    assert f"{bucket}/fed" in read_state(mlops_stack.data_dir).data_roots


def test_stack_start_failure_shows_log_tail(tmp_path):
    data_dir = tmp_path / "broken"
    # An option `mlflow server` does not know: the server exits during start-up, as a broken install would.
    s3_port, mlflow_port = free_ports(2)
    with pytest.raises(StackError, match="MLflow server exited during start-up") as err:
        start_stack(data_dir, s3_port=s3_port, mlflow_port=mlflow_port, mlflow_args=["--no-such-option"])
    message = str(err.value)
    assert "last lines of" in message and "mlflow.log" in message
    assert "No such option" in message  # the server's own explanation, from its log
    assert not stack_status(data_dir).recorded  # nothing left behind, moto included
    assert not _processes_with(f"--port {s3_port}") and not _processes_with(f"--port {mlflow_port}")


# ------------------------------------------------------------------------------------------- tracking


def test_log_run_dir_params_metrics_tags_artifacts(mlops_stack, tmp_path):
    from mlflow import MlflowClient

    run_dir = make_run_dir(tmp_path / "run", bacc=0.8, rounds=3)
    run_id = log_run_dir(run_dir, "test-log", tracking_uri=mlops_stack.tracking_uri)
    client = MlflowClient(mlops_stack.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert (
        params["method"] == "fedmedclip"
        and params["optim.lr"] == "0.001"
        and params["partition.alpha"] == "0.5"
    )

    metrics = run.data.metrics
    assert metrics[PROMOTION_METRIC] == pytest.approx(0.8)
    assert metrics["summary/site_1_bacc"] == pytest.approx(0.79)
    assert metrics["summary/total_bytes"] == 27000
    history = client.get_metric_history(run_id, "global/bacc")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
    assert sorted(history, key=lambda m: m.step)[-1].value == pytest.approx(0.8)
    for key in (
        "global/acc",
        "site_0/acc",
        "site_2/bacc",
        "comm/bytes_up",
        "comm/bytes_down",
        "sites/train_loss",
    ):
        assert len(client.get_metric_history(run_id, key)) == 3, key
    assert client.get_metric_history(run_id, "comm/bytes_up")[0].value == 3000  # summed over the sites

    tags = run.data.tags
    partition = json.loads((run_dir / "partition.json").read_text())
    assert tags["partition_digest"] == partition["digest"]
    assert tags["backbone_sha256"] == "0" * 64
    assert tags["method"] == "fedmedclip"
    assert len(tags["feature_provenance_digest"]) == 64 and len(tags["dataset_digest"]) == 64
    assert tags["git_commit"] and tags["mlflow.source.git.commit"] == tags["git_commit"]

    def listing(path=None):
        out = []
        for f in client.list_artifacts(run_id, path):
            out += listing(f.path) if f.is_dir else [f.path]
        return out

    files = set(listing())
    expected = {
        "results.json",
        "config.json",
        "partition.json",
        "provenance.json",
        "plots/accuracy.png",
        "plots/reliability.png",
        "rounds/global_round_001.bin",
        "rounds/global_round_003.bin",
        "model/model.json",
        "model/global.safetensors",
    }
    assert expected <= files
    assert not any(f.startswith("checkpoint") for f in files)
    # The sites' private heads stay off the central MLflow unless asked for (test_track_include_site_models).
    assert (run_dir / "model" / "site_site_0.safetensors").is_file()
    assert not any(f.startswith("model/site_") for f in files)
    assert "site_site_0.safetensors" in tags["fedmedclip.site_models"]

    # The data set and the partition are the run's inputs, with their digests.
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    by_context = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs.values()
    }
    assert set(by_context) == {"training", "partition"}
    assert by_context["partition"].digest == partition["digest"][:32]
    full = {t.value for i in inputs.values() for t in i.tags if t.key == "fedmedclip.digest"}
    assert partition["digest"] in full

    # The bytes went through the MLflow proxy into the versioned moto bucket.
    s3 = mlops_stack.s3_client()
    key = f"mlartifacts/{run.info.experiment_id}/{run_id}/artifacts/results.json"
    versions = s3.list_object_versions(Bucket=mlops_stack.bucket, Prefix=key)["Versions"]
    assert len(versions) == 1 and versions[0]["VersionId"] not in (None, "", "null")
    # Re-logging a file keeps the old bytes as an earlier version.
    (run_dir / "results.json").write_text(
        json.dumps({**json.loads((run_dir / "results.json").read_text()), "note": 1})
    )
    client.log_artifact(run_id, str(run_dir / "results.json"))
    versions = s3.list_object_versions(Bucket=mlops_stack.bucket, Prefix=key)["Versions"]
    assert len(versions) == 2 and len({v["VersionId"] for v in versions}) == 2


def test_track_include_site_models(mlops_stack, tmp_path, capsys):
    from mlflow import MlflowClient

    run_dir = make_run_dir(tmp_path / "run", rounds=1)
    uri = mlops_stack.tracking_uri
    argv = ("track", run_dir, "--experiment", "test-site-models", "--tracking-uri", uri)
    assert run_cli(*argv, "--include-site-models", "--kfp-run-id", "kfp-123") == 0
    run_id = capsys.readouterr().out.strip()
    client = MlflowClient(uri)
    files = {f.path for f in client.list_artifacts(run_id, "model")}
    assert {f"model/site_{s}.safetensors" for s in ("site_0", "site_1", "site_2")} <= files
    tags = client.get_run(run_id).data.tags
    assert tags["kfp.run_id"] == "kfp-123" and "fedmedclip.site_models" not in tags


def test_bad_run_dir_gives_clear_error(mlops_stack, tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    (run_dir / "results.json").unlink()
    with pytest.raises(RunDirError, match=r"results\.json is missing"):
        log_run_dir(run_dir, "test-bad", tracking_uri=mlops_stack.tracking_uri)
    with pytest.raises(FedMedClipError, match=r"results\.json is missing"):  # what the CLI turns into exit 2
        run_cli("track", run_dir, "--experiment", "test-bad", "--tracking-uri", mlops_stack.tracking_uri)
    with pytest.raises(RunDirError, match="does not exist"):
        log_run_dir(tmp_path / "nope", "test-bad", tracking_uri=mlops_stack.tracking_uri)
    from mlflow import MlflowClient

    # validation happens before anything is created on the server
    assert MlflowClient(mlops_stack.tracking_uri).get_experiment_by_name("test-bad") is None


def test_tracking_a_run_directory_again_finds_its_run(mlops_stack, tmp_path, capsys):
    """`fedmedclip track` twice (or the pipeline's retried register task logging the run directory) made a
    second MLflow run of the same training, and registering each gave two versions of one model. The run is
    keyed on the directory's results.json: again, the same run and nothing logged; a new training, a new run."""
    from mlflow import MlflowClient

    uri, exp = mlops_stack.tracking_uri, "test-track-twice"
    run_dir = make_run_dir(tmp_path / "run")
    argv = ("track", run_dir, "--experiment", exp, "--tracking-uri", uri)
    capsys.readouterr()
    assert run_cli(*argv) == 0
    first = capsys.readouterr()
    assert run_cli(*argv) == 0
    again = capsys.readouterr()
    assert first.out == again.out and "is logged already (nothing logged again)" in again.err
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name(exp).experiment_id
    assert [r.info.run_id for r in client.search_runs([exp_id])] == [first.out.strip()]
    # an attempt that stopped part-way (its run FAILED, not marked complete) is continued, not doubled
    client.set_terminated(first.out.strip(), "FAILED")
    assert log_run_dir(run_dir, exp, tracking_uri=uri) == first.out.strip()
    assert client.get_run(first.out.strip()).info.status == "FINISHED"
    # another training into the same folder is another run
    make_run_dir(run_dir, bacc=0.5)
    assert log_run_dir(run_dir, exp, tracking_uri=uri) != first.out.strip()
    assert len(client.search_runs([exp_id])) == 2


@pytest.mark.parametrize(
    "file, damage, named",
    [
        ("config.json", lambda d: [], "config.json must be a JSON object"),
        ("partition.json", lambda d: [], "partition.json must be a JSON object"),
        ("provenance.json", lambda d: {**d, "site_0": 3}, "holder 'site_0' must be a JSON object, got int"),
        ("results.json", lambda d: {**d, "partition": "iid"}, "`partition` must be a JSON object"),
        ("results.json", lambda d: {**d, "timing": [1]}, "`timing` must be a JSON object"),
        (
            "results.json",
            lambda d: {**d, "history": [{**d["history"][0], "global": "0.5"}]},
            r"`history\[0\]\.global` must be a JSON object",
        ),
        (
            "results.json",
            lambda d: {**d, "history": [{**d["history"][0], "sites": [1]}]},
            r"each of `history\[0\]\.sites` must be a JSON object",
        ),
    ],
)
def test_a_damaged_run_dir_is_refused_naming_the_entry(tmp_path, file, damage, named):
    """A file of the right name holding the wrong JSON shape is refused before anything is logged (it was an
    AttributeError traceback from `fedmedclip track`, some after the MLflow run had been created)."""
    run_dir = make_run_dir(tmp_path / "run")
    path = run_dir / file
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    with pytest.raises(RunDirError, match=named):
        log_run_dir(run_dir, "test-damaged", tracking_uri=f"http://127.0.0.1:{free_port()}")


def test_unreachable_server_fails_fast(tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    with pytest.raises(TrackingError, match="not reachable.*stack up"):
        log_run_dir(run_dir, "x", tracking_uri=f"http://127.0.0.1:{free_port()}")


# ------------------------------------------------------------------------------------------- registry


def test_register_promote_and_load_champion(mlops_stack, tmp_path, tiny_onnx, capsys, caplog):
    import mlflow
    import onnxruntime as ort
    from mlflow import MlflowClient

    uri = mlops_stack.tracking_uri
    name = "fedmedclip-test"
    client = MlflowClient(uri, registry_uri=uri)

    # v1: 0.80, through the CLI (stdout carries only the run id / version number)
    run_a = make_run_dir(tmp_path / "a", bacc=0.80)
    assert run_cli("track", run_a, "--experiment", "test-registry", "--tracking-uri", uri) == 0
    run_id_a = capsys.readouterr().out.strip()
    assert len(run_id_a) == 32
    from fedmedclip.cli import main as cli_main

    register = ["register", run_id_a, "--name", name, "--onnx", tiny_onnx, "--tracking-uri", uri]
    assert cli_main([str(a) for a in register]) == 0  # through `fedmedclip`'s main, as a script runs it
    registered = capsys.readouterr()
    v1 = registered.out.strip()
    assert "Downloading artifacts" not in registered.err  # no bar redrawn in place where stderr is a log
    # nor MLflow's word that this CPU machine lacks the CUDA provider the model declares for the GPU servers
    assert "execution providers" not in registered.err + caplog.text, registered.err
    mv1 = client.get_model_version(name, v1)
    for tag in (
        "method",
        "partition_digest",
        "dataset_digest",
        "backbone_sha256",
        "git_commit",
        "onnx_sha256",
    ):
        assert mv1.tags.get(tag), tag
    assert mv1.tags["model_digest"] == run_model_digest()  # the run's model, which the file holds
    assert mv1.tags["partition_digest"] == client.get_run(run_id_a).data.tags["partition_digest"]
    assert mv1.run_id == run_id_a

    # The registered ONNX model carries its signature and an input example.
    info = mlflow.models.get_model_info(f"models:/{name}/{v1}")
    inputs, outputs = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert [(t.name, t.type, t.shape) for t in inputs] == [("images", np.dtype(np.uint8), (-1, 32, 32, 3))]
    assert [(t.name, t.type, t.shape) for t in outputs] == [
        ("probabilities", np.dtype(np.float32), (-1, 4)),
        ("class_index", np.dtype(np.int64), (-1,)),
    ]
    mlflow.set_tracking_uri(uri)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{v1}"))
    example = mlflow.models.Model.load(model_dir).load_input_example(model_dir)
    assert np.asarray(example["images"]).shape == (1, 32, 32, 3)

    assert run_cli("promote", name, "--version", v1, "--tracking-uri", uri) == 0
    assert "is now @champion" in capsys.readouterr().out

    # v2: worse (0.70): refused by default, both numbers named
    run_b = make_run_dir(tmp_path / "b", bacc=0.70)  # same data and partition as run_a
    v2 = register_model(log_run_dir(run_b, "test-registry", tracking_uri=uri), name, tiny_onnx, uri).version
    with pytest.raises(PromotionRefused, match=r"0\.7000 is below .*version 1\).* 0\.8000.*--allow-worse"):
        promote(name, v2, tracking_uri=uri)
    assert client.get_registered_model(name).aliases["champion"] == v1

    # ... and promoted with the override, which is logged and recorded on the version
    with caplog.at_level(logging.WARNING, logger="fedmedclip.tracking"):
        assert run_cli("promote", name, "--version", v2, "--allow-worse", "--tracking-uri", uri) == 0
    assert "allow-worse" in capsys.readouterr().out
    assert any("allow_worse" in r.getMessage() for r in caplog.records)
    mv2 = client.get_model_version(name, v2)
    assert (
        "0.7000" in mv2.tags["promotion_override.champion"]
        and "0.8000" in mv2.tags["promotion_override.champion"]
    )
    assert json.loads(mv2.tags["promoted.champion"])["allow_worse"] is True
    assert client.get_registered_model(name).aliases["champion"] == v2

    # v3: better than the current champion (0.70): promoted without a flag
    run_c = make_run_dir(tmp_path / "c", bacc=0.85)
    v3 = register_model(log_run_dir(run_c, "test-registry", tracking_uri=uri), name, tiny_onnx, uri).version
    result = promote(name, v3, tracking_uri=uri)
    assert (result.previous_version, result.overridden) == (v2, False)
    assert "promotion_override.champion" not in client.get_model_version(name, v3).tags
    # promoted again (a retried register task): nothing changes, the record still names the version replaced
    record = client.get_model_version(name, v3).tags["promoted.champion"]
    assert run_cli("promote", name, "--version", v3, "--tracking-uri", uri) == 0
    assert f"version {v3} is @champion already" in capsys.readouterr().out
    assert client.get_model_version(name, v3).tags["promoted.champion"] == record
    assert json.loads(record)["previous_version"] == v2

    # models:/NAME@champion loads, is v3's file byte for byte, and runs
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion"))
    stored = hashlib.sha256((local / "model.onnx").read_bytes()).hexdigest()
    assert stored == client.get_model_version(name, v3).tags["onnx_sha256"]
    model = mlflow.onnx.load_model(f"models:/{name}@champion")
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["fedmedclip.class_names"])[0] == "glioma"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[0, ..., 0] = 255  # red -> class 0 in the tiny model
    probabilities, class_index = session.run(None, {"images": images})
    assert class_index.tolist() == [0, 3] and np.allclose(probabilities.sum(1), 1, atol=1e-5)


def test_a_promotion_over_a_holder_without_a_metric_describes_itself():
    """`promote --allow-worse` over a holder with no metric (its run deleted) prints what it did; the text
    formatted the missing metric as a number (TypeError after the alias had moved) before the shrink."""
    text = Promotion("m", "2", "champion", 0.8, "1", None, True).describe()
    assert f"previous: version 1, {PROMOTION_METRIC} (no metric)" in text and "--allow-worse" in text


def test_promote_refuses_versions_trained_on_different_data(mlops_stack, tmp_path, tiny_onnx, capsys):
    from mlflow import MlflowClient

    uri = mlops_stack.tracking_uri
    name = "fedmedclip-data-gate"
    client = MlflowClient(uri, registry_uri=uri)

    def version(path, seed: int = 0, **kw) -> str:
        run_id = log_run_dir(make_run_dir(path, seed=seed, **kw), "test-data-gate", tracking_uri=uri)
        # the run's own export: the tiny file holds the seed-0 run's model; another seed's names its own
        onnx = restamp_onnx(tiny_onnx, path / "model.onnx", {META_MODEL_DIGEST: run_model_digest(seed)})
        return register_model(run_id, name, onnx, tracking_uri=uri).version

    v1 = version(tmp_path / "a", bacc=0.70)
    promote(name, v1, tracking_uri=uri)
    # Another partition seed draws other data for every holder: both digests differ, even for a better model.
    v2 = version(tmp_path / "b", bacc=0.90, seed=1)
    mv1, mv2 = client.get_model_version(name, v1), client.get_model_version(name, v2)
    with pytest.raises(DifferentDataRefused) as refused:
        promote(name, v2, tracking_uri=uri)
    message = str(refused.value)
    for tag in ("dataset_digest", "partition_digest"):
        assert f"{tag} {mv2.tags[tag][:12]} (version {v2}) vs {mv1.tags[tag][:12]} (version {v1})" in message
    assert "--allow-different-data" in message
    assert client.get_registered_model(name).aliases["champion"] == v1
    # A refusal is a PromotionRefused: the pipeline's registration step keeps the version, unpromoted.
    assert isinstance(refused.value, PromotionRefused)

    # The override is explicit and recorded; the metric gate still applies (0.90 >= 0.70 passes).
    args = ("promote", name, "--version", v2, "--tracking-uri", uri)
    assert run_cli(*args, "--allow-different-data") == 0
    assert "--allow-different-data" in capsys.readouterr().out
    recorded = client.get_model_version(name, v2).tags
    assert mv1.tags["partition_digest"] in recorded["promotion_different_data.champion"]
    assert json.loads(recorded["promoted.champion"])["allow_different_data"] == [
        "dataset_digest",
        "partition_digest",
    ]
    assert client.get_registered_model(name).aliases["champion"] == v2

    # Same data as the new holder, worse: the metric gate speaks, not the data gate.
    v3 = version(tmp_path / "c", bacc=0.50, seed=1)
    with pytest.raises(PromotionRefused, match="below") as worse:
        promote(name, v3, tracking_uri=uri)
    assert not isinstance(worse.value, DifferentDataRefused)


def test_register_plain_model_folder_and_errors(mlops_stack, tmp_path, tiny_onnx, capsys):
    import mlflow
    from mlflow import MlflowClient

    from components.register.component import REFUSED, register_step
    from fedmedclip.cli import main
    from mlops.promotion import PromotionPolicy

    uri = mlops_stack.tracking_uri
    run_dir = make_run_dir(tmp_path / "run")
    run_id = log_run_dir(run_dir, "test-plain", tracking_uri=uri)
    mv = register_model(run_id, "fedmedclip-plain", tracking_uri=uri)
    assert mv.tags["partition_digest"] and "onnx_sha256" not in mv.tags
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/fedmedclip-plain/{mv.version}"))
    assert (local / "model.json").is_file() and (local / "global.safetensors").is_file()
    # A model folder is no model `serve models:/NAME@ALIAS` can load: promote refuses it in one line that says
    # how to register one, and the alias is not set.
    capsys.readouterr()
    assert main(["promote", "fedmedclip-plain", "--version", mv.version, "--tracking-uri", uri]) == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert f"fedmedclip-plain version {mv.version} to @champion: it holds no ONNX model" in err
    assert "fedmedclip register RUN_ID --name fedmedclip-plain --onnx" in err
    assert not MlflowClient(uri, registry_uri=uri).get_registered_model("fedmedclip-plain").aliases
    # The pipeline's register task without an export (export_site ''): the version stays registered, the
    # task's outcome says why it was not promoted.
    no_onnx = tmp_path / "no-onnx"  # the export task's artifact, left empty
    got = register_step(
        str(run_dir), str(no_onnx), run_id, uri, "test-plain", "fedmedclip-plain", PromotionPolicy()
    )
    assert got[0] == f"models:/fedmedclip-plain/{mv.version}" and got[1].startswith(f"{REFUSED}: ")
    assert "holds no ONNX model" in got[1]

    with pytest.raises(TrackingError, match="no MLflow run 'deadbeef'"):
        register_model("deadbeef", "fedmedclip-plain", tracking_uri=uri)
    with pytest.raises(TrackingError, match="does not exist"):
        register_model(run_id, "fedmedclip-plain", onnx_path=tmp_path / "missing.onnx", tracking_uri=uri)
    # an ONNX from another backbone is not this run's model
    other = make_tiny_onnx(tmp_path / "other.onnx", backbone_sha256="f" * 64)
    with pytest.raises(TrackingError, match="backbone"):
        register_model(run_id, "fedmedclip-plain", onnx_path=other, tracking_uri=uri)
    # ... nor is an export of another run on the same backbone (what the seed-1 run's export records; every
    # `train` run's metadata says run id "inprocess"): one line naming both models' digests and what to do
    another = restamp_onnx(tiny_onnx, tmp_path / "another.onnx", {META_MODEL_DIGEST: run_model_digest(1)})
    argv = ["register", run_id, "--name", "fedmedclip-plain", "--onnx", str(another), "--tracking-uri", uri]
    capsys.readouterr()
    assert main(argv) == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "holds another run's model" in err and run_id in err and "fedmedclip export" in err
    assert run_model_digest(1)[:12] in err and run_model_digest(0)[:12] in err
    # ... and a file exported before exports recorded their run's model is refused, asking for a new export
    old = restamp_onnx(tiny_onnx, tmp_path / "old.onnx", {META_MODEL_DIGEST: None})
    with pytest.raises(TrackingError, match=r"does not record which run's model .* export it again"):
        register_model(run_id, "fedmedclip-plain", onnx_path=old, tracking_uri=uri)
    with pytest.raises(TrackingError, match="has no version 99"):
        promote("fedmedclip-plain", 99, tracking_uri=uri)


def test_train_track_logs_every_round_live_with_every_setting(mlops_stack, tmp_path, monkeypatch, capsys):
    """`fedmedclip train` logs through the same observer as `server run --track`: each round as it finishes,
    at its own time, with every resolved setting as a parameter; `--resume` continues the same MLflow run."""
    from mlflow import MlflowClient

    from fedmedclip.cli import main
    from mlops.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    data = tmp_path / "data"
    assert (
        main(
            ["synth", str(data), "--sites", "2", "--per-class", "8", "--test-per-class", "4", "--size", "32"]
        )
        == 0
    )
    # The first run names the server on its command line (nothing in the environment or a recorded stack).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FEDMEDCLIP_STACK_DIR", str(tmp_path / "no-stack"))
    common = ["--quiet", "train", "--data", str(data / "manifest.csv"), "--sites", "2", "--rounds", "2"]
    common += [
        "--cache-dir",
        str(tmp_path / "c"),
        "--experiment",
        "train-cli",
        "--method-opt",
        "lr_fam=0.002",
    ]
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "run"), "--tracking-uri", mlops_stack.tracking_uri]) == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlops_stack.tracking_uri)  # the rest: from the environment
    client = MlflowClient(mlops_stack.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.params["method"] == "fedmedclip" and run.info.status == "FINISHED"
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert run.data.metrics[PROMOTION_METRIC] == pytest.approx(results["metrics"]["global"]["bacc"])
    # every resolved setting: the method's options with their defaults, threads, class filters, preprocessing
    params = run.data.params
    for key, value in results["method_options"].items():
        assert params[f"method_options.{key}"] == (value if isinstance(value, str) else json.dumps(value)), (
            key
        )
    assert params["method_options.lr_fam"] == "0.002" and len(results["method_options"]) > 3
    for key in (
        "threads",
        "min_class_images",
        "allow_outside_root",
        "batch_size",
        "codec_up",
        "preprocessing",
    ):
        assert key in params, key
    # the same parameters as `fedmedclip track` logs from the finished directory, but for the server's
    # options (operational, known live only): one set of parameters however a run is logged
    capsys.readouterr()
    assert main(["track", str(tmp_path / "run"), "--experiment", "train-cli-after"]) == 0
    (after,) = client.search_runs([client.get_experiment_by_name("train-cli-after").experiment_id])
    assert {k: v for k, v in params.items() if not k.startswith("server.")} == after.data.params
    # live: each round at the time it finished (results.json records it), the run spanning the training
    points = sorted(client.get_metric_history(run_id, "global/bacc"), key=lambda m: m.step)
    finished = [round(rec["finished_at"] * 1000) for rec in results["history"]]
    assert [m.step for m in points] == [1, 2] and [m.timestamp for m in points] == finished
    assert run.info.start_time <= finished[0] <= finished[1] <= run.info.end_time
    # readable in the UI: a model-training experiment, a description, who and what logged it
    tags = run.data.tags
    assert client.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert "**fedmedclip**" in tags["mlflow.note.content"] and "selected round" in tags["mlflow.note.content"]
    assert tags["mlflow.source.name"] == "fedmedclip train" and tags["mlflow.user"]
    assert run.info.run_name == "run" and tags["fedmedclip.run_dir"] == str((tmp_path / "run").resolve())
    # a resumed run continues the same MLflow run (its key is recorded in the run directory)
    assert main([*common, "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == run_id

    assert main([*common, "--out", str(tmp_path / "run2"), "--no-track"]) == 0
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]


def test_track_logs_a_run_directory_at_its_recorded_times(mlops_stack, tmp_path):
    """`fedmedclip track RUN_DIR` after the fact: the same history as live logging, each round at the time the
    run recorded for it, and the run's duration the training's, not the logging's."""
    from mlflow import MlflowClient

    run_dir = make_run_dir(tmp_path / "run", rounds=3)
    results = json.loads((run_dir / "results.json").read_text())
    t0 = 1_700_000_000.0  # a run from long ago
    for r, rec in enumerate(results["history"], start=1):
        rec["finished_at"] = t0 + 10.0 * r
    results["timing"]["total_seconds"] = 45.0
    (run_dir / "results.json").write_text(json.dumps(results))
    run_id = log_run_dir(run_dir, "test-recorded-times", tracking_uri=mlops_stack.tracking_uri)
    client = MlflowClient(mlops_stack.tracking_uri)
    points = sorted(client.get_metric_history(run_id, "global/acc"), key=lambda m: m.step)
    assert [m.timestamp for m in points] == [int((t0 + 10.0 * r) * 1000) for r in (1, 2, 3)]
    info = client.get_run(run_id).info
    assert (info.start_time, info.end_time) == (int((t0 + 30 - 45) * 1000), int((t0 + 30) * 1000))
    assert client.get_run(run_id).data.tags["fedmedclip.times"] == "recorded"


def test_every_command_finds_the_tracking_server_by_one_rule_and_never_writes_a_database(
    mlops_stack, tmp_path, monkeypatch, capsys
):
    """No MLFLOW_TRACKING_URI and no local stack: track, register, promote, serve models:/ and train --track
    each say so in one line, and each takes the --tracking-uri the line offers; nothing (mlflow.db, mlruns/)
    appears in the working directory. With a local
    stack recorded (FEDMEDCLIP_STACK_DIR), every one of them finds it."""
    from fedmedclip.cli import main
    from fedmedclip.tracking_server import find_tracking_uri

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FEDMEDCLIP_STACK_DIR", str(tmp_path / "no-stack"))
    run_dir = make_run_dir(tmp_path / "run")
    commands = [
        ["track", str(run_dir)],
        ["register", "0" * 32, "--name", "m"],
        ["promote", "m", "--version", "1"],
        ["serve", "models:/m@champion"],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no MLflow tracking server" in err, (argv, err)
        # where it looked for a running local stack, and how to point it elsewhere
        assert err.endswith(
            f"no running stack is recorded in {tmp_path / 'no-stack'} ($FEDMEDCLIP_STACK_DIR, else .stack: where commands look)"
        ), err
    # A mistyped run directory is the first thing said, before the missing server.
    assert main(["track", str(tmp_path / "no-such-run")]) == 2
    assert "no-such-run does not exist" in capsys.readouterr().err
    train = [
        "train",
        "--synthetic",
        "{}",
        "--track",
        "--out",
        str(tmp_path / "t"),
        "--cache-dir",
        str(tmp_path),
    ]
    assert main(train) == 2  # before any work
    assert "no MLflow tracking server" in capsys.readouterr().err
    # The message says "pass --tracking-uri": each of them takes it, and asks the server it names first.
    dead = "http://127.0.0.1:9"
    for argv in [*commands, train]:
        assert main([*argv, "--tracking-uri", dead]) == 2, argv
        err = capsys.readouterr().err
        assert f"the MLflow tracking server at {dead} is not reachable" in err, (argv, err)
    assert sorted(p.name for p in work.iterdir()) == []  # no mlflow.db, no mlruns/

    monkeypatch.setenv("FEDMEDCLIP_STACK_DIR", mlops_stack.data_dir)
    assert find_tracking_uri() == mlops_stack.tracking_uri
    assert main(["serve", "models:/no-such-model@champion"]) == 2
    err = capsys.readouterr().err
    assert mlops_stack.tracking_uri in err and "no-such-model" in err
    assert main(["promote", "no-such-model", "--version", "1"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == []


def test_registration_is_keyed_on_the_run_and_a_refused_promotion_is_visible(
    mlops_stack, tmp_path, tiny_onnx, caplog
):
    """KFP retries the register task: a retry finds the version it registered instead of adding one. A
    refused promotion is the task's `promotion` output and an ERROR line, and fails it when asked."""
    from mlflow import MlflowClient

    from components.register.component import PROMOTED, REFUSED, register_step
    from mlops.promotion import PromotionPolicy

    uri, name = mlops_stack.tracking_uri, "fedmedclip-retry"
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(tiny_onnx.read_bytes())
    good = make_run_dir(tmp_path / "good", bacc=0.8)
    run_id = log_run_dir(good, "test-retry", tracking_uri=uri)
    args = (str(good), str(onnx_dir), run_id, uri, "test-retry", name, PromotionPolicy())
    first = register_step(*args)
    again = register_step(*args)  # the retry
    assert first == again == (f"models:/{name}@champion", PROMOTED)
    client = MlflowClient(uri, registry_uri=uri)
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert (
        len(register_model(run_id, name, tiny_onnx, uri).version)
        and register_model(run_id, name, tiny_onnx, uri).existing
    )
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    # An attempt stopped between registering the version and logging its card (a killed task, MLflow down):
    # the retry logs the card, where it returned the version without one.
    card = client.get_model_version(name, "1").tags["model_card"]
    client.delete_model_version_tag(name, "1", "model_card")
    retried = register_model(run_id, name, tiny_onnx, uri)
    assert retried.existing and retried.tags["model_card"] == card
    assert client.get_model_version(name, "1").tags["model_card"] == card
    assert read_model_card(f"{name}/1", tracking_uri=uri).startswith(f"# Model card: {name} version 1\n")

    worse = make_run_dir(tmp_path / "worse", bacc=0.5)
    worse_id = log_run_dir(worse, "test-retry", tracking_uri=uri)
    args = (str(worse), str(onnx_dir), worse_id, uri, "test-retry", name, PromotionPolicy())
    with caplog.at_level(logging.ERROR, logger="fedmedclip.pipeline"):
        model_uri, outcome = register_step(*args)
    assert model_uri == f"models:/{name}/2" and outcome.startswith(f"{REFUSED}: ") and "0.5000" in outcome
    assert any(r.levelno == logging.ERROR and "PROMOTION REFUSED" in r.getMessage() for r in caplog.records)
    with pytest.raises(FedMedClipError, match="promotion refused"):
        register_step(*args, fail_if_not_promoted=True)
    assert len(client.search_model_versions(f"name = '{name}'")) == 2  # the retry added nothing
    assert client.get_registered_model(name).aliases["champion"] == "1"
    # The pipeline's max_epsilon (`promote --max-epsilon`): a version trained without DP is refused, visibly.
    budget = PromotionPolicy(max_epsilon=8.0)
    model_uri, outcome = register_step(str(good), str(onnx_dir), run_id, uri, "test-retry", name, budget)
    assert model_uri == f"models:/{name}/1" and "without record-level differential privacy" in outcome


def test_tracking_switched_on_by_the_environment_says_so_and_how_to_go_without(tmp_path, monkeypatch, capsys):
    """An MLFLOW_TRACKING_URI left in the shell turns tracking on: its error said `--track:`, a flag never given."""
    from fedmedclip.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert main(["train", "--out", str(tmp_path / "t"), "--cache-dir", str(tmp_path)]) == 2  # before any work
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tracking (on as MLFLOW_TRACKING_URI is set): the MLflow tracking server at")
    assert err.endswith("; or pass --no-track") and len(err.splitlines()) == 1
    assert not (tmp_path / "t").exists()


def _looking_up_together(n: int, method: str):
    """An MlflowClient class whose instances each return from their first `method` call (a look-up) only when
    `n` instances have made theirs: `n` callers (threads standing for processes, each with its own client) all
    find nothing before any of them creates, the moment two commands or test workers meet in practice."""
    import threading

    from mlflow import MlflowClient

    barrier = threading.Barrier(n, timeout=120)

    def first_together(self, *args, **kwargs):
        try:
            return getattr(MlflowClient, method)(self, *args, **kwargs)
        finally:
            if not self.__dict__.setdefault("_looked_up", False):
                self._looked_up = True
                barrier.wait()

    return type("LookingUpTogether", (MlflowClient,), {method: first_together})


def test_several_processes_tracking_into_a_new_experiment_at_once_share_it(mlops_stack):
    """Two commands (or test workers) starting runs in an experiment that does not exist yet: each looks it up,
    finds none and creates it; the later create was refused (RESOURCE_ALREADY_EXISTS), which crashed
    `fedmedclip track` and silently switched live tracking off. Every caller now gets the one experiment."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient

    from mlops.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, get_or_create_experiment

    uri, name, n = mlops_stack.tracking_uri, f"test-at-once-{uuid.uuid4().hex[:12]}", 4
    together = _looking_up_together(n, "get_experiment_by_name")
    with ThreadPoolExecutor(n) as pool:
        ids = list(pool.map(lambda _: get_or_create_experiment(together(uri), name), range(n)))
    client = MlflowClient(uri)
    assert ids == [client.get_experiment_by_name(name).experiment_id] * n
    assert client.get_experiment(ids[0]).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert len(client.search_experiments(filter_string=f"name = '{name}'")) == 1


def test_several_registrations_of_a_new_model_name_at_once_all_succeed(mlops_stack, tmp_path, monkeypatch):
    """Registrations of several runs (without --onnx) under a name not registered yet, at once (two pipelines'
    register tasks): each found the name new and created it, and all but one failed "Registered Model ...
    already exists". Now each adds its version to the one registered model, described once."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient

    import mlops.registry as registry

    uri, name, n = mlops_stack.tracking_uri, f"fedmedclip-at-once-{uuid.uuid4().hex[:12]}", 3
    runs = [log_run_dir(make_run_dir(tmp_path / f"run{i}", seed=i), name, tracking_uri=uri) for i in range(n)]
    together, real_client = _looking_up_together(n, "get_registered_model"), registry._client
    monkeypatch.setattr(registry, "_client", lambda *a: (together(uri, registry_uri=uri), real_client(*a)[1]))
    with ThreadPoolExecutor(n) as pool:
        got = list(pool.map(lambda run_id: register_model(run_id, name, tracking_uri=uri), runs))
    assert sorted(int(mv.version) for mv in got) == list(range(1, n + 1))
    assert [mv.run_id for mv in got] == runs
    client = MlflowClient(uri, registry_uri=uri)
    model = client.get_registered_model(name)
    assert model.tags["project"] == "fedmedclip" and model.description.startswith("FedMedCLIP classifier")
    assert len(client.search_model_versions(f"name = '{name}'")) == n


def test_runs_starting_together_log_one_new_data_set_without_a_refusal(mlops_stack):
    """Runs of one experiment that start at the same moment log the same new data set (two `track` commands,
    two pipelines on one partition): MLflow's store inserted it for each and refused the later ones (BAD_REQUEST,
    "UNIQUE constraint failed: datasets..."), and the run failed to start. Each run now has both inputs. The
    collision lands in MLflow's server, where no barrier of ours can line it up: a guard, made likely by
    repeating the start of six runs at once (before the retry, 2 of 6 such rounds collided with four runs)."""
    import threading
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient

    from mlops.tracking import log_dataset_inputs

    uri, n = mlops_stack.tracking_uri, 6
    client = MlflowClient(uri)
    for trial in range(8):
        experiment = client.create_experiment(f"test-datasets-{uuid.uuid4().hex[:12]}")
        partition = {
            "sites": {"site_0": {"train": [f"{trial}.png"]}},
            "class_names": ["a", "b"],
            "digest": uuid.uuid4().hex,
        }
        runs = [client.create_run(experiment).info.run_id for _ in range(n)]
        barrier = threading.Barrier(n, timeout=120)

        def start(run_id: str, barrier=barrier, partition=partition) -> None:
            own = MlflowClient(uri)
            barrier.wait()
            log_dataset_inputs(own, run_id, partition, "synthetic")

        with ThreadPoolExecutor(n) as pool:
            list(pool.map(start, runs))
        for run_id in runs:
            assert len(client.get_run(run_id).inputs.dataset_inputs) == 2, (trial, run_id)


@pytest.mark.parametrize(
    "command",
    [["stack", "up", "--data-dir"], ["demo", "--local-data", "--stack-dir"]],
    ids=["stack-up", "demo"],
)
@pytest.mark.parametrize("flag, port", [("--s3-port", "-1"), ("--s3-port", "70000"), ("--mlflow-port", "0")])
def test_a_port_flag_out_of_range_is_one_line_before_anything_starts(command, flag, port, tmp_path, capsys):
    """-1 or 70000 was bind()'s OverflowError traceback; 0 was taken and then waited 90 s for "port 0"."""
    from devstack.stack import stop_stack
    from fedmedclip.cli import main

    data_dir = tmp_path / "stack"
    try:
        assert main([*command, str(data_dir), flag, port]) == 2
    finally:
        stop_stack(data_dir)  # were anything started
    err = capsys.readouterr().err
    assert error_lines(err) == [f"error: {flag} {port}: not a port number (1 to 65535)"], err
    assert read_state(data_dir) is None


@pytest.mark.parametrize("names", [",,", "", "charite,,ucsf", "charite, "])
def test_empty_site_names_are_refused_before_the_stack_starts(names, tmp_path, capsys):
    """`--site-names ,,` started a stack without a single site role, where `--sites 0` is refused."""
    from devstack.stack import stop_stack
    from fedmedclip.cli import main

    data_dir = tmp_path / "stack"
    s3_port, ml_port = free_ports(2)
    argv = [
        "stack",
        "up",
        "--data-dir",
        str(data_dir),
        "--s3-port",
        str(s3_port),
        "--mlflow-port",
        str(ml_port),
    ]
    try:
        assert main([*argv, "--site-names", names]) == 2
    finally:
        stop_stack(data_dir)
    err = capsys.readouterr().err
    assert error_lines(err) == [
        f"error: --site-names {names!r}: a site name is empty; give comma-separated names, e.g. --site-names "
        "charite,ucsf"
    ], err
    assert read_state(data_dir) is None


def test_the_help_of_stack_env_and_track_says_their_defaults():
    """`stack env --role` said "(default: admin, as before)"; `track --experiment` showed no default (train's
    --experiment says it)."""

    def help_of(*path: str) -> str:
        choices = _parser()._subparsers._group_actions[0].choices
        for name in path[:-1]:
            choices = choices[name]._subparsers._group_actions[0].choices
        return " ".join(choices[path[-1]].format_help().split())

    env = help_of("stack", "env")
    assert "mlflow or admin (default: admin)" in env and "as before" not in env
    assert "MLflow experiment (created if missing; default: fedmedclip)" in help_of("track")


@pytest.mark.parametrize("command", ["up", "status", "env", "down"])
def test_every_stack_command_takes_the_stack_directory_by_demos_name_too(command, tmp_path):
    """`demo --stack-dir DIR` then `stack status --stack-dir DIR`: the stack commands knew it only as
    --data-dir."""
    args = _parser().parse_args(["stack", command, "--stack-dir", str(tmp_path)])
    assert args.data_dir == str(tmp_path)

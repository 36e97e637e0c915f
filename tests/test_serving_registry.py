"""The server's registry path against the real local stack (moto S3 + MLflow server, `mlops_stack`):
a model registered by `mlops.registry.register_model` is fetched with `models:/NAME@ALIAS` and verified
against its `onnx_sha256` tag; a tampered or missing tag refuses to start. Its model.onnx, listed by the
artifact store at another size than its `onnx_bytes` tag records, is refused before it is downloaded."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_fixtures import make_tiny_onnx
from run_fixtures import make_run_dir


@pytest.fixture()
def registry(mlops_stack, monkeypatch):
    # The server reads the registry location from the environment, as in the InferenceService.
    for key, value in mlops_stack.env.items():
        monkeypatch.setenv(key, value)
    return mlops_stack.tracking_uri


def test_serve_from_registry_verifies_hash(registry, tmp_path, capsys, monkeypatch):
    import onnxruntime as ort
    from mlflow import MlflowClient

    from mlops.registry import promote, register_model
    from mlops.rundir import log_run_dir
    from serving.cli import main
    from serving.errors import ServingError
    from serving.runtime import OnnxClassifier
    from serving.source import resolve_model

    onnx_path = make_tiny_onnx(tmp_path / "tiny.onnx")
    run_id = log_run_dir(make_run_dir(tmp_path / "run"), "test-serving-registry", tracking_uri=registry)
    name = "serving-registry-test"
    version = register_model(run_id, name, onnx_path, registry).version
    promote(name, version, tracking_uri=registry)

    resolved = resolve_model(f"models:/{name}@champion", cache_dir=str(tmp_path / "cache"))
    assert resolved.origin == f"models:/{name}@champion (version {version})" == resolved.public_origin
    assert resolved.version == str(version)  # what every answer carries as model_version
    assert resolved.path.name == "model.onnx" and (tmp_path / "cache") in resolved.path.parents
    classifier = OnnxClassifier(resolved.path, device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    expected = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"images": images}
    )
    np.testing.assert_allclose(classifier.run(images)[0], expected[0], atol=1e-6)
    assert (
        resolve_model(f"models:/{name}/{version}", cache_dir=str(tmp_path / "cache2")).sha256
        == resolved.sha256
    )
    # `serve --tracking-uri`: the registry named by the caller, with nothing in the environment to find it.
    with monkeypatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI")
        env.setenv("FEDMEDCLIP_STACK_DIR", str(tmp_path / "no-stack"))
        named = resolve_model(f"models:/{name}@champion", None, str(tmp_path / "cache5"), registry)
        assert named.sha256 == resolved.sha256

    client = MlflowClient(registry)
    client.set_model_version_tag(name, version, "onnx_sha256", "0" * 64)
    with pytest.raises(ServingError, match="refusing to serve .* registry tag onnx_sha256"):
        resolve_model(f"models:/{name}@champion", cache_dir=str(tmp_path / "cache3"))
    # The same refusal through the CLI: exit status 2, a message, no traceback, nothing served.
    assert main(["serve", f"models:/{name}@champion", "--cache-dir", str(tmp_path / "cache4")]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve" in err and "Traceback" not in err

    client.delete_model_version_tag(name, version, "onnx_sha256")
    with pytest.raises(ServingError, match="no 'onnx_sha256' tag"):
        resolve_model(f"models:/{name}@champion", cache_dir=str(tmp_path / "cache6"))
    with pytest.raises(ServingError, match="cannot resolve models:/serving-registry-test@nope"):
        resolve_model(f"models:/{name}@nope", cache_dir=str(tmp_path / "cache6"))
    # The folder a registry model is downloaded into is its caller's to give (and to remove): none is made here.
    with pytest.raises(ValueError, match="needs cache_dir"):
        resolve_model(f"models:/{name}/{version}")


def test_replicas_sharing_a_cache_dir_start_together_on_one_verified_file(registry, tmp_path, monkeypatch):
    """Replicas on one host (one --cache-dir) starting at once: each downloaded the registered file into the
    shared folder in place, then hashed it, and one hashed a file the other was still writing ("its sha256
    is e3b0c442..."), refusing to start. Each now downloads into a folder of its own, verifies, then moves the
    file into place. A race, not forced (a guard): a file of 48 MiB gives each download a window the others'
    overlap (every run tried failed before the fix), and a second round starts on the file the first left.
    The --cache-dir is relative, as a replica's command line may give it."""
    import hashlib
    import os
    import threading
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient

    from serving.source import resolve_model

    client = MlflowClient(registry, registry_uri=registry)
    name, n = f"serving-at-once-{uuid.uuid4().hex[:12]}", 4
    data = os.urandom(48 << 20)  # what resolve_model checks is the hash, not the graph
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.onnx").write_bytes(data)
    run = client.create_run(client.create_experiment(name))
    client.log_artifacts(run.info.run_id, str(tmp_path / "model"), "model")
    client.create_registered_model(name)
    sha = hashlib.sha256(data).hexdigest()
    source = f"{run.info.artifact_uri}/model"
    client.create_model_version(name, source, run_id=run.info.run_id, tags={"onnx_sha256": sha})
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)

    def start(barrier):
        barrier.wait()
        return resolve_model(f"models:/{name}/1", cache_dir="cache")

    for _ in range(2):
        with ThreadPoolExecutor(n) as pool:
            resolved = list(pool.map(start, [threading.Barrier(n, timeout=120)] * n))
        assert {(r.path, r.sha256) for r in resolved} == {(cache / sha / "model.onnx", sha)}
        assert hashlib.sha256((cache / sha / "model.onnx").read_bytes()).hexdigest() == sha
        assert sorted(p.name for p in cache.iterdir()) == [sha]  # no download folder left behind

    # A second version resolved into the same folder (a rolling update's new replicas) leaves the first's file:
    # it replaced model.onnx under the replicas still to load the first, which refused it as changed.
    other = os.urandom(1 << 10)
    (tmp_path / "model" / "model.onnx").write_bytes(other)
    run = client.create_run(client.get_experiment_by_name(name).experiment_id)
    client.log_artifacts(run.info.run_id, str(tmp_path / "model"), "model")
    tag = {"onnx_sha256": hashlib.sha256(other).hexdigest()}
    client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tag)
    second = resolve_model(f"models:/{name}/2", cache_dir="cache")
    assert second.path.read_bytes() == other and resolved[0].path.read_bytes() == data


# ------------------------------------------------------------------ the registry's file bounded before download
@pytest.fixture()
def downloads(monkeypatch):
    """The artifact files MLflow downloads from here on (each path relative to the version's folder)."""
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    downloaded, real = [], MlflowArtifactsRepository._download_file

    def recorded(self, remote_file_path, local_path):
        downloaded.append(remote_file_path)
        return real(self, remote_file_path, local_path)

    monkeypatch.setattr(MlflowArtifactsRepository, "_download_file", recorded)
    return downloaded


def _sparse(path, size: int):
    """A file of `size` zero bytes at `path` (sparse here): a 50 GB replacement, scaled down."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def _hand_registered(client, folder, name: str, data: bytes, **tags: str):
    """`data` logged as model/model.onnx of a new run and registered as version 1 of `name` from that folder,
    with its sha256 tag and `tags` (as the replicas' test registers one). Returns the run id and the version."""
    import hashlib

    (folder / "model").mkdir()
    (folder / "model" / "model.onnx").write_bytes(data)
    run = client.create_run(client.create_experiment(name))
    client.log_artifacts(run.info.run_id, str(folder / "model"), "model")
    client.create_registered_model(name)
    tags["onnx_sha256"] = hashlib.sha256(data).hexdigest()
    source = f"{run.info.artifact_uri}/model"
    return run.info.run_id, client.create_model_version(name, source, run.info.run_id, tags=tags)


def test_a_registry_model_replaced_by_a_larger_file_is_refused_before_it_is_downloaded(
    registry, downloads, tmp_path, monkeypatch, capsys
):
    """Whoever can write the version's run replaced model.onnx by a larger file: the whole version was
    downloaded before its sha256 refused it (a 50 GB file filled the pod's disk first). Now the artifact
    store's listing is compared with the `onnx_bytes` tag first, or, on a version without it, with
    MAX_REGISTRY_ONNX_BYTES: refused naming the file and both sizes, nothing of it downloaded; the server
    refuses to start in one line."""
    import re
    import uuid

    from conftest import free_port
    from mlflow import MlflowClient

    import serving.source
    from serving.cli import main
    from serving.errors import ServingError
    from serving.source import resolve_model

    client = MlflowClient(registry, registry_uri=registry)
    name, data = f"serving-replaced-{uuid.uuid4().hex[:12]}", b"not a graph: only hashed" * 40
    run_id, mv = _hand_registered(
        client, tmp_path, name, data, onnx_bytes=str(len(data)), onnx_file="model.onnx"
    )
    uri = f"models:/{name}/{mv.version}"
    big = len(data) + (4 << 20)
    client.log_artifact(run_id, str(_sparse(tmp_path / "big" / "model.onnx", big)), "model")
    downloads.clear()

    message = (
        f"refusing to serve {uri} (version {mv.version}): {uri}/model.onnx is listed at {big} bytes, not at the "
        f"{len(data)} bytes its onnx_bytes tag records"
    )
    with pytest.raises(ServingError, match=f"^{re.escape(message)}$"):
        resolve_model(uri, cache_dir=str(tmp_path / "cache"))
    assert downloads == [] and not (tmp_path / "cache").exists()
    # `serve` (`python -m serving serve`'s main): exit status 2 before it listens, that one line, no traceback.
    argv = ["serve", uri, "--cache-dir", str(tmp_path / "cli"), "--http-port", str(free_port())]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.strip()] == [f"error: {message}"], err
    assert not (tmp_path / "cli").exists()

    # A version registered before the tag: the listing is bounded by MAX_REGISTRY_ONNX_BYTES (scaled down).
    client.delete_model_version_tag(name, mv.version, "onnx_bytes")
    monkeypatch.setattr(serving.source, "MAX_REGISTRY_ONNX_BYTES", 1 << 20)
    message = f"{uri}/model.onnx is listed at {big} bytes, above the {1 << 20} bytes of a version without an"
    with pytest.raises(ServingError, match=re.escape(message)):
        resolve_model(uri, cache_dir=str(tmp_path / "cache"))
    assert downloads == [] and not (tmp_path / "cache").exists()


def test_a_model_file_tag_that_leaves_the_version_is_refused_before_any_download(
    registry, downloads, tmp_path
):
    """The `onnx_file` tag names the version's file, which is placed under the cache: one that is not a clean
    relative path (a '..', an absolute path, an empty or '.' segment, a NUL) is refused naming it, nothing
    downloaded, nothing written."""
    import uuid

    from mlflow import MlflowClient

    from serving.errors import ServingError
    from serving.source import resolve_model

    client = MlflowClient(registry, registry_uri=registry)
    name, data = f"serving-escape-{uuid.uuid4().hex[:12]}", b"not a graph: only hashed" * 40
    _, mv = _hand_registered(client, tmp_path, name, data, onnx_bytes=str(len(data)))
    for tag in ("../model.onnx", "/etc/model.onnx", "a//model.onnx", "./model.onnx", "model\0.onnx"):
        client.set_model_version_tag(name, mv.version, "onnx_file", tag)
        with pytest.raises(ServingError, match="is not a path inside the version: it ") as refused:
            resolve_model(f"models:/{name}/{mv.version}", cache_dir=str(tmp_path / "cache"))
        assert repr(tag) in str(refused.value), tag
        assert downloads == [] and not (tmp_path / "cache").exists(), tag


def test_a_registry_model_replaced_between_its_listing_and_its_download_is_refused_and_removed(
    registry, downloads, tmp_path, monkeypatch
):
    """The listing matched the `onnx_bytes` tag, then model.onnx was replaced by a larger file before its
    download: measured after it, refused naming the file and both sizes, nothing left in the cache."""
    import re
    import uuid

    from mlflow import MlflowClient
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    from serving.errors import ServingError
    from serving.source import resolve_model

    client = MlflowClient(registry, registry_uri=registry)
    name, data = f"serving-swapped-{uuid.uuid4().hex[:12]}", b"not a graph: only hashed" * 40
    run_id, mv = _hand_registered(client, tmp_path, name, data, onnx_bytes=str(len(data)))
    big, recording = len(data) + (1 << 20), MlflowArtifactsRepository._download_file  # the fixture's

    def replaced_first(self, remote_file_path, local_path):
        if not downloads:
            client.log_artifact(run_id, str(_sparse(tmp_path / "big" / "model.onnx", big)), "model")
        return recording(self, remote_file_path, local_path)

    monkeypatch.setattr(MlflowArtifactsRepository, "_download_file", replaced_first)
    uri = f"models:/{name}/{mv.version}"
    message = f"{uri}/model.onnx was {big} bytes when downloaded, not the {len(data)} bytes listed"
    with pytest.raises(ServingError, match=f"^refusing to serve {re.escape(uri)} .*: {re.escape(message)}$"):
        resolve_model(uri, cache_dir=str(tmp_path / "cache"))
    assert downloads == ["model.onnx"]
    assert [p for p in (tmp_path / "cache").rglob("*")] == []


def test_a_registered_model_records_its_size_and_only_its_onnx_file_is_downloaded(
    registry, downloads, tmp_path
):
    """`fedmedclip register` records model.onnx's size (`onnx_bytes`) beside its sha256; serving downloads that
    file alone (MLmodel, environment files and examples were fetched with it, and nothing reads them), into
    <cache>/<sha256>/model.onnx. The file replaced in the logged model by a larger one is refused unread."""
    import uuid

    from mlflow import MlflowClient

    from mlops.registry import register_model
    from mlops.rundir import log_run_dir
    from serving.errors import ServingError
    from serving.source import resolve_model

    onnx_path = make_tiny_onnx(tmp_path / "tiny.onnx")
    run_id = log_run_dir(make_run_dir(tmp_path / "run"), "test-serving-registry", tracking_uri=registry)
    name = f"serving-sized-{uuid.uuid4().hex[:12]}"
    version = register_model(run_id, name, onnx_path, registry).version
    mv = MlflowClient(registry, registry_uri=registry).get_model_version(name, version)
    downloads.clear()

    resolved = resolve_model(f"models:/{name}/{version}", cache_dir=str(tmp_path / "cache"))
    assert resolved.path == tmp_path / "cache" / resolved.sha256 / "model.onnx"
    assert mv.tags["onnx_bytes"] == str(resolved.path.stat().st_size)
    assert downloads == ["model.onnx"]

    # The file as registered lives in the logged model the version's source names (models:/m-...).
    big, model_id = int(mv.tags["onnx_bytes"]) + (1 << 20), mv.source.removeprefix("models:/")
    MlflowClient(registry).log_model_artifact(model_id, str(_sparse(tmp_path / "big" / "model.onnx", big)))
    downloads.clear()
    with pytest.raises(
        ServingError, match=f"model.onnx is listed at {big} bytes, not at the {mv.tags['onnx_bytes']}"
    ):
        resolve_model(f"models:/{name}/{version}", cache_dir=str(tmp_path / "cache2"))
    assert downloads == []


# ------------------------------------------------------------------ the temporary download's lifetime
def _temporary_downloads(tmpdir) -> list:
    """The folders `serve` downloads a registry model into without --cache-dir, under `tmpdir` ($TMPDIR)."""
    return sorted(tmpdir.glob("fedmedclip-model-*"))


def test_a_sigterm_while_the_server_starts_removes_its_temporary_download(registry, tmp_path):
    """A pod stopped while its model downloads or loads: before the server's own signal handlers, SIGTERM's
    default killed `serve` and left its temporary download folder (the whole model) behind."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import uuid

    from conftest import free_port
    from mlflow import MlflowClient
    from serving_fixtures import REPO, make_contract_onnx

    client = MlflowClient(registry, registry_uri=registry)
    name = f"serving-sigterm-{uuid.uuid4().hex[:12]}"
    data = make_contract_onnx(tmp_path / "export" / "model.onnx", image_size=32).read_bytes()
    _, mv = _hand_registered(client, tmp_path, name, data, onnx_bytes=str(len(data)))
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    cmd = [sys.executable, "-m", "serving", "serve", f"models:/{name}/{mv.version}", "--device", "cpu",
           "--http-port", str(free_port()), "--grpc-port", str(free_port())]  # fmt: skip
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(tmpdir)}
        )
    try:
        deadline = time.monotonic() + 600  # event wait: the folder is made as the download starts
        while not _temporary_downloads(tmpdir):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=600) == 128 + signal.SIGTERM, (tmp_path / "server.log").read_text()
    finally:
        proc.kill()
    assert _temporary_downloads(tmpdir) == [], (tmp_path / "server.log").read_text()
    assert "SIGTERM received while starting: stopping" in (tmp_path / "server.log").read_text()


def test_a_registry_model_downloaded_without_a_cache_dir_is_removed_when_the_server_stops(
    registry, tmp_path, monkeypatch, capsys
):
    """`serve models:/NAME@ALIAS` without --cache-dir downloads into a temporary folder that nothing removed:
    after a clean SIGTERM stop /tmp/fedmedclip-model-XXXX/<sha256>/model.onnx stayed, the whole model (341 MiB
    for a ViT-B/32) at every (re)start. The folder now lives as long as the server: there while it serves (a
    model unloaded by model control is loaded again from it), gone once it exits on SIGTERM, and gone when it
    refuses to start after the download (a file ONNX Runtime cannot load). A --cache-dir is kept."""
    import hashlib
    import re
    import uuid

    import requests
    from mlflow import MlflowClient
    from serving_fixtures import make_contract_onnx, running_server

    client = MlflowClient(registry, registry_uri=registry)
    name = f"serving-tmp-{uuid.uuid4().hex[:12]}"
    data = make_contract_onnx(tmp_path / "export" / "model.onnx", image_size=32).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    _, mv = _hand_registered(client, tmp_path, name, data, onnx_bytes=str(len(data)))
    uri = f"models:/{name}/{mv.version}"
    tmpdir = tmp_path / "tmp"  # the server's temporary files, where this test can list them
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))

    token = "a-model-control-token-of-40-characters.."
    (tmp_path / "served").mkdir()
    with running_server([uri], tmp_path / "served", token=token) as server:
        (folder,) = _temporary_downloads(tmpdir)
        served = folder / sha / "model.onnx"
        assert served.read_bytes() == data
        assert f" to {served}, sha256 {sha} verified" in server.log()
        # Unloaded and loaded again (model control): from the same file, which stays while the server runs.
        auth = {"Authorization": f"Bearer {token}"}
        for action in ("unload", "load"):
            url = f"http://{server.http}/v2/repository/models/fedmedclip/{action}"
            assert requests.post(url, headers=auth, timeout=60).status_code == 200, action
        assert requests.get(f"http://{server.http}/v2/models/fedmedclip/ready", timeout=60).status_code == 200
        assert served.is_file() and _temporary_downloads(tmpdir) == [folder]
        assert server.stop() == 0, server.log()[-3000:]
    assert _temporary_downloads(tmpdir) == [], server.log()[-3000:]
    assert re.search(rf"INFO removing the temporary download folder {re.escape(str(folder))}\b", server.log())

    # The refusals, in this process (the same `serve` command; a process each cost 3 s of imports).
    import tempfile

    from conftest import free_port

    from serving.cli import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))

    def refused(*argv: str) -> str:
        assert main(["serve", *argv, "--device", "cpu", "--http-port", str(free_port())]) == 2
        return capsys.readouterr().err

    # Refused after its download (verified, but no graph ONNX Runtime can load): exit 2, nothing left behind.
    bad = f"serving-tmp-bad-{uuid.uuid4().hex[:12]}"
    (tmp_path / "bad").mkdir()
    _, bad_mv = _hand_registered(client, tmp_path / "bad", bad, b"verified, not a graph" * 50)
    err = refused(f"models:/{bad}/{bad_mv.version}")
    assert "ONNX Runtime cannot load" in err and "removing the temporary download folder" in err, err
    assert _temporary_downloads(tmpdir) == []
    # Refused before any download (no such alias): its empty folder goes too, without a word of it.
    err = refused(f"models:/{name}@nope")
    assert "cannot resolve" in err and "removing the temporary" not in err, err
    assert _temporary_downloads(tmpdir) == []
    # --cache-dir: the user's folder, kept with its verified file when the command ends; nothing temporary made.
    cache = tmp_path / "cache"
    err = refused(f"models:/{bad}/{bad_mv.version}", "--cache-dir", str(cache))
    assert "ONNX Runtime cannot load" in err and "removing the temporary" not in err, err
    assert (cache / hashlib.sha256(b"verified, not a graph" * 50).hexdigest() / "model.onnx").is_file()
    assert _temporary_downloads(tmpdir) == []

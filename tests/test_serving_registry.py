"""The server's registry path against the real local stack (moto S3 + MLflow server, `mlops_stack`):
a model registered by `mlops.registry.register_model` is fetched with `models:/NAME@ALIAS` and verified
against its `onnx_sha256` tag; a tampered or missing tag refuses to start."""

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
    assert resolved.origin == f"models:/{name}@champion (version {version})"
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
        resolve_model(f"models:/{name}@champion")
    with pytest.raises(ServingError, match="cannot resolve models:/serving-registry-test@nope"):
        resolve_model(f"models:/{name}@nope")


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

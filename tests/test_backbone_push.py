"""Real weights for the pods: `fedmedclip backbone push` to S3 or the MLflow registry, and `resolve_backbone`
into a pod's cache, checked against the weights hash, on the real moto S3 and MLflow servers of the stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmedclip.backbone import load_backbone, random_clip
from fedmedclip.cli import main
from mlops.backbones import (
    MANIFEST,
    BackbonePublishError,
    BackboneUnavailable,
    push_backbone,
    resolve_backbone,
)


def save_clip(directory: Path, seed: int) -> Path:
    model, tokenizer = random_clip("tiny", seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / ".cache").mkdir()  # what `huggingface-cli download --local-dir` leaves: not part of it
    (directory / ".cache" / "download.lock").write_text("")
    return directory


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {"a": save_clip(root / "clip-a", seed=0), "b": save_clip(root / "clip-b", seed=1)}


@pytest.fixture(scope="module")
def weights(clips) -> dict[str, str]:
    return {k: load_backbone(str(d)).weights_sha256 for k, d in clips.items()}


@pytest.fixture
def s3(mlops_stack, monkeypatch):
    """This process talks to the stack's S3 as a pod would: credentials and endpoint from the environment."""
    for key, value in mlops_stack.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", mlops_stack.s3_endpoint)
    client = mlops_stack.s3_client()
    bucket = "fedmedclip-backbones"
    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=bucket)
    return client, bucket


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--quiet", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return code, out, err


def test_push_to_s3_then_each_pod_downloads_once_and_checks(s3, clips, weights, tmp_path, capsys):
    client, bucket = s3
    spec = f"s3://{bucket}/backbones/tiny-a"
    code, out, err = cli(capsys, "backbone", "push", clips["a"], "--to", spec)
    assert code == 0 and out.strip() == spec, err
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"backbones/tiny-a/{MANIFEST}")["Body"].read())
    assert manifest["weights_sha256"] == weights["a"]
    assert "model.safetensors" in manifest["files"] and not any(n.startswith(".") for n in manifest["files"])
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="backbones/tiny-a/")["Contents"]}
    assert keys == {f"backbones/tiny-a/{n}" for n in [*manifest["files"], MANIFEST]}

    # Pushing the same weights again changes nothing; another backbone is refused, the published one kept.
    assert push_backbone(clips["a"], spec).already_published
    with pytest.raises(
        BackbonePublishError, match=rf"already holds backbone {weights['a'][:12]}.*nothing was overwritten"
    ):
        push_backbone(clips["b"], spec)
    body = client.get_object(Bucket=bucket, Key=f"backbones/tiny-a/{MANIFEST}")["Body"].read()
    assert json.loads(body)["weights_sha256"] == weights["a"]

    cache = tmp_path / "pod-cache"
    local = Path(resolve_backbone(spec, cache))
    assert local == cache / "backbones" / weights["a"]
    assert load_backbone(str(local)).weights_sha256 == weights["a"]
    assert not [p for p in (cache / "backbones").iterdir() if p.name.startswith(".")]  # no staging left

    # Once per pod: with the weights gone from the bucket, the checked copy in the cache still serves.
    client.delete_object(Bucket=bucket, Key="backbones/tiny-a/model.safetensors")
    assert Path(resolve_backbone(spec, cache)) == local
    # A new pod (empty cache) cannot get it, and is told how to publish it.
    with pytest.raises(
        BackboneUnavailable, match=rf"(?s)no backbone published at {spec}.*backbone push DIR --to {spec}"
    ):
        resolve_backbone(spec, tmp_path / "new-pod")

    # The core's `backbone SPEC` command resolves remote specs and prints the identity of what it loads.
    client.upload_file(str(clips["a"] / "model.safetensors"), bucket, "backbones/tiny-a/model.safetensors")
    code, out, err = cli(capsys, "backbone", spec, "--cache-dir", tmp_path / "cli-cache")
    assert code == 0 and json.loads(out)["weights_sha256"] == weights["a"], err
    # Local and built-in specs pass through untouched.
    assert resolve_backbone("tiny", cache) == "tiny" and resolve_backbone(str(clips["b"]), cache) == str(
        clips["b"]
    )


def test_a_push_that_fails_says_why_and_overwrites_nothing(s3, clips, tmp_path):
    """A push's failure names what stopped it; it said "no backbone published at ...: publish it with
    `fedmedclip backbone push DIR --to ...`", the very command that had failed. A damaged manifest at the prefix
    is left as it is."""
    client, bucket = s3
    with pytest.raises(BackbonePublishError) as failed:
        push_backbone(clips["a"], "s3://fedmedclip-no-such-bucket/backbones/a")
    message = str(failed.value)
    assert message.startswith("cannot push the backbone to s3://fedmedclip-no-such-bucket/backbones/a: ")
    assert "does not exist" in message and "backbone push" not in message

    client.put_object(Bucket=bucket, Key=f"backbones/odd/{MANIFEST}", Body=b'{"format": 1, "files": {}}')
    with pytest.raises(
        BackbonePublishError, match="is no backbone manifest.*nothing was overwritten"
    ) as failed:
        push_backbone(clips["a"], f"s3://{bucket}/backbones/odd")
    assert "backbone push" not in str(failed.value)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="backbones/odd/")["Contents"]}
    assert keys == {f"backbones/odd/{MANIFEST}"}


def test_damaged_missing_or_mismatching_backbone_fails_before_training(s3, clips, weights, tmp_path, capsys):
    client, bucket = s3
    damaged = f"s3://{bucket}/backbones/damaged"
    push_backbone(clips["a"], damaged)
    # The weights file is replaced after publishing: its sha256 no longer matches the manifest.
    client.upload_file(str(clips["b"] / "model.safetensors"), bucket, "backbones/damaged/model.safetensors")
    with pytest.raises(
        BackboneUnavailable,
        match=r"(?s)does not match its manifest: model\.safetensors has sha256.*backbone push",
    ):
        resolve_backbone(damaged, tmp_path / "c1")
    assert not (tmp_path / "c1" / "backbones" / weights["a"]).exists()

    # A manifest whose weights hash is not what the files load to.
    lying = f"s3://{bucket}/backbones/lying"
    push_backbone(clips["a"], lying)
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"backbones/lying/{MANIFEST}")["Body"].read())
    manifest["weights_sha256"] = weights["b"]
    client.put_object(Bucket=bucket, Key=f"backbones/lying/{MANIFEST}", Body=json.dumps(manifest).encode())
    with pytest.raises(
        BackboneUnavailable,
        match=rf"loads with weights sha256 {weights['a'][:12]}, but it was published as {weights['b'][:12]}",
    ):
        resolve_backbone(lying, tmp_path / "c2")
    assert list((tmp_path / "c2" / "backbones").iterdir()) == []  # nothing half-installed

    # A manifest over its bound (a valid one, padded) is refused unread, naming it: another party wrote it.
    padded = f"s3://{bucket}/backbones/padded"
    push_backbone(clips["a"], padded)
    body = client.get_object(Bucket=bucket, Key=f"backbones/padded/{MANIFEST}")["Body"].read()
    client.put_object(Bucket=bucket, Key=f"backbones/padded/{MANIFEST}", Body=body + b" " * (4 << 20))
    with pytest.raises(BackboneUnavailable, match=rf"padded/{MANIFEST} is \d+ bytes, over the limit"):
        resolve_backbone(padded, tmp_path / "c2")

    # Nothing published there, through the CLI: exit 2 and how to publish, no traceback.
    missing = f"s3://{bucket}/backbones/never-pushed"
    code, out, err = cli(capsys, "backbone", missing, "--cache-dir", tmp_path / "c3")
    assert code == 2 and f"fedmedclip backbone push DIR --to {missing}" in err and "Traceback" not in err
    code, out, err = cli(capsys, "backbone", "push", clips["a"])
    assert code == 2 and "--to" in err


def test_push_to_the_registry_and_resolve_a_version_or_alias(mlops_stack, clips, weights, tmp_path, capsys):
    from mlflow import MlflowClient

    uri = mlops_stack.tracking_uri
    client = MlflowClient(uri, registry_uri=uri)
    code, out, err = cli(
        capsys, "backbone", "push", clips["a"], "--to", "models:/tiny-clip", "--tracking-uri", uri
    )
    assert code == 0, err
    spec = out.strip()
    assert spec.startswith("models:/tiny-clip/")
    version = spec.rsplit("/", 1)[1]
    assert client.get_model_version("tiny-clip", version).tags["weights_sha256"] == weights["a"]
    again = push_backbone(clips["a"], "models:/tiny-clip", tracking_uri=uri)
    assert again.already_published and again.spec == spec

    client.set_registered_model_alias("tiny-clip", "prod", version)
    cache = tmp_path / "cache"
    local = Path(resolve_backbone("models:/tiny-clip@prod", cache, tracking_uri=uri))
    assert local == cache / "backbones" / weights["a"]
    assert load_backbone(str(local)).weights_sha256 == weights["a"]
    # A damaged cached copy is noticed and replaced by a fresh download.
    (local / "config.json").write_text("{}")
    assert Path(resolve_backbone(spec, cache, tracking_uri=uri)) == local
    assert load_backbone(str(local)).weights_sha256 == weights["a"]

    with pytest.raises(
        BackboneUnavailable,
        match=r"(?s)no backbone registered as models:/tiny-clip/99.*push DIR --to models:/tiny-clip",
    ):
        resolve_backbone("models:/tiny-clip/99", cache, tracking_uri=uri)
    client.create_registered_model("a-classifier")
    with pytest.raises(BackbonePublishError, match="does not hold backbones"):
        push_backbone(clips["b"], "models:/a-classifier", tracking_uri=uri)
    with pytest.raises(BackbonePublishError, match="registry numbers the versions"):
        push_backbone(clips["b"], "models:/tiny-clip/3", tracking_uri=uri)


def test_an_unreachable_registry_is_a_backbone_error_naming_the_spec(clips, tmp_path):
    """Without its registry a `models:/` backbone fails as the backbone it is (how load_backbone's callers
    report a missing one), naming the spec and the server, not as a bare tracking error."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(
        BackboneUnavailable, match=rf"--backbone models:/clip/1 needs the MLflow registry: .*{uri}"
    ):
        resolve_backbone("models:/clip/1", tmp_path, tracking_uri=uri)
    with pytest.raises(BackbonePublishError, match=rf"pushing the backbone to models:/clip: .*{uri}"):
        push_backbone(clips["a"], "models:/clip", tracking_uri=uri)


def test_a_wrong_destination_is_refused_before_the_directory_is_loaded(tmp_path):
    with pytest.raises(
        BackbonePublishError, match=r"--to 'http://x': publish to s3://BUCKET/PREFIX or to models"
    ):
        push_backbone(tmp_path / "not-loaded", "http://x")


def test_pushes_of_several_backbones_to_a_new_registered_name_at_once_all_succeed(
    mlops_stack, tmp_path, monkeypatch
):
    """`backbone push --to models:/NAME` of several backbones at once, NAME not registered yet: each push found
    the name new and created it, and all but one failed "Registered Model ... already exists". Now each adds its
    version to the one registered model (each thread has its own client; their look-ups are made to meet)."""
    import threading
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient

    import mlops.tracking as tracking
    from mlops.backbones import KIND_BACKBONE, KIND_TAG

    uri, name, n = mlops_stack.tracking_uri, f"tiny-clip-at-once-{uuid.uuid4().hex[:12]}", 3
    clips = [save_clip(tmp_path / f"clip{i}", seed=10 + i) for i in range(n)]
    barrier = threading.Barrier(n, timeout=120)

    class LookingUpTogether(MlflowClient):
        def get_registered_model(self, *args, **kwargs):
            try:
                return super().get_registered_model(*args, **kwargs)
            finally:
                if not self.__dict__.setdefault("_looked_up", False):
                    self._looked_up = True
                    barrier.wait()  # every push has found the name new before any creates it

    real_client = tracking._client
    together = lambda *a: (LookingUpTogether(uri, registry_uri=uri), real_client(*a)[1])  # noqa: E731
    monkeypatch.setattr(tracking, "_client", together)
    with ThreadPoolExecutor(n) as pool:
        pushed = list(pool.map(lambda clip: push_backbone(clip, f"models:/{name}", tracking_uri=uri), clips))
    assert sorted(int(p.spec.rsplit("/", 1)[1]) for p in pushed) == list(range(1, n + 1))
    assert not any(p.already_published for p in pushed)
    client = MlflowClient(uri, registry_uri=uri)
    assert client.get_registered_model(name).tags[KIND_TAG] == KIND_BACKBONE
    weights = {load_backbone(str(clip)).weights_sha256 for clip in clips}
    assert {mv.tags["weights_sha256"] for mv in client.search_model_versions(f"name = '{name}'")} == weights

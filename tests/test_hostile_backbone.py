"""A published backbone is another party's bytes: whoever can write to its prefix (or rewrite its manifest too)
may replace any file. Each hostile file is refused with one error naming the file (and the field), before it
fills the pod's disk or transformers builds anything from it, never a traceback.

Before these fixes:
- a backbone file replaced by a larger object was downloaded whole (boto3's download_file) before the sha256
  check refused it: one of 50 GB filled the pod's disk first; `fetch_tree(..., checked=False)` (how a backbone
  is fetched) wrote it into place without a word, as did a body running on past its Content-Length, and a
  manifest entry without a size was fetched unbounded;
- config.json was handed to transformers unchecked: a width of 10**6, 10**5 layers, image_size 10**6, 0, -1,
  1.5, "768", NaN, a list for text_config or an unknown activation raised RuntimeError, ZeroDivisionError,
  KeyError or StrictDataclassFieldValidationError tracebacks from inside transformers (or allocated gigabytes
  for layers the weights lack); an image_std of 0 was used as it was;
- a `models:/` backbone was downloaded whole (`mlflow.artifacts.download_artifacts` of the version's folder)
  before its manifest was read: a weights artifact replaced by a 50 GB file filled the disk first, and so did
  a file the manifest does not list, or a padded manifest."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import pytest

from fedmedclip.backbone import load_backbone, random_clip
from fedmedclip.cli import main
from fedmedclip.errors import BackboneNotFound
from fedmedclip.federation.storage import LocalDirStore, StoreError
from mlops.backbones import MANIFEST, BackboneUnavailable, backbone_manifest, resolve_backbone
from mlops.s3 import S3Store
from mlops.tree import TreeMismatch, fetch_tree, publish_tree, tree_files

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """The tiny CLIP saved as a folder (weights, config, tokenizer), as `backbone push` takes it."""
    folder = tmp_path_factory.mktemp("hostile-clip") / "clip"
    model, tokenizer = random_clip("tiny", seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def manifest(clip) -> dict:
    return backbone_manifest(clip)


@pytest.fixture
def s3(s3_env):
    """The stack's S3 as a pod sees it (credentials and endpoint from the environment), and a prefix of its own."""
    client = s3_env.s3_client()
    bucket = "fedmedclip-backbones"
    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=bucket)
    return client, bucket, f"backbones/hostile-{uuid.uuid4().hex[:12]}"


class Counting:
    """The stack's S3 client, counting the bytes read from each object's body (what came to this machine);
    `announce` ({key: length}) makes a response announce that Content-Length, whatever its body holds."""

    def __init__(self, client, announce: dict | None = None):
        self._client, self._announce, self.read = client, announce or {}, {}

    def __getattr__(self, name):
        return getattr(self._client, name)

    def get_object(self, **kwargs):
        response, key, counts = self._client.get_object(**kwargs), kwargs["Key"], self.read
        counts.setdefault(key, 0)
        body = response["Body"]

        class Body:
            def read(self, amt=None):
                data = body.read(amt)
                counts[key] += len(data)
                return data

            def close(self):
                body.close()

        response["Body"] = Body()
        if key in self._announce:
            response["ContentLength"] = self._announce[key]
        return response


def _published(s3, clip: Path, manifest: dict, replaced: bytes | None = None) -> str:
    """The backbone published at the test's prefix, then (`replaced`) its weights replaced by other bytes."""
    client, bucket, prefix = s3
    publish_tree(S3Store(f"s3://{bucket}/{prefix}", client), clip, MANIFEST, manifest)
    if replaced is not None:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{WEIGHTS}", Body=replaced)
    return f"s3://{bucket}/{prefix}"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_a_weights_object_replaced_by_a_larger_one_is_refused_before_its_body_is_read(
    s3, clip, manifest, tmp_path, capsys
):
    client, bucket, prefix = s3
    size = manifest["files"][WEIGHTS]["size"]
    big = size + (4 << 20)  # a 50 GB object, scaled down: the same refusal, its body never read
    spec = _published(s3, clip, manifest, replaced=b"\0" * big)

    counting = Counting(client)
    store = S3Store(spec, counting)
    message = rf"{spec}/{WEIGHTS} is {big} bytes, not the {size} bytes its publisher recorded"
    with pytest.raises(TreeMismatch, match=message):
        fetch_tree(store, manifest["files"], tmp_path / "fetched", checked=False)  # how a backbone is fetched
    assert counting.read[f"{prefix}/{WEIGHTS}"] == 0
    assert WEIGHTS not in _leftovers(tmp_path / "fetched")
    assert not [n for n in _leftovers(tmp_path / "fetched") if n.startswith(".part-")]

    # A pod resolving it: the backbone's error, naming the object; nothing left in its cache.
    with pytest.raises(BackboneUnavailable, match=message):
        resolve_backbone(spec, tmp_path / "pod")
    assert _leftovers(tmp_path / "pod" / "backbones") == []
    # Through the CLI: status 2, the refusal on stderr, no traceback.
    capsys.readouterr()
    code = main(["--quiet", "backbone", spec, "--cache-dir", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 2 and f"is {big} bytes, not the {size} bytes" in err and "Traceback" not in err


def test_a_body_running_on_past_its_announced_length_is_cut_one_byte_past_the_recorded_size(
    s3, clip, manifest, tmp_path
):
    """A response announcing the recorded size whose body runs on (a lying server or proxy, an endless stream)
    is read one byte past the size and refused."""
    client, bucket, prefix = s3
    size = manifest["files"][WEIGHTS]["size"]
    spec = _published(s3, clip, manifest, replaced=b"\0" * (size + (4 << 20)))
    key = f"{prefix}/{WEIGHTS}"
    counting = Counting(client, announce={key: size})
    with pytest.raises(TreeMismatch, match=rf"{spec}/{WEIGHTS} is larger, not the {size} bytes"):
        fetch_tree(S3Store(spec, counting), manifest["files"], tmp_path / "fetched", checked=False)
    assert counting.read[key] == size + 1
    assert WEIGHTS not in _leftovers(tmp_path / "fetched")
    assert not [n for n in _leftovers(tmp_path / "fetched") if n.startswith(".part-")]

    # The backbone as published still comes through whole, each file read to its end and no further.
    client.upload_file(str(clip / WEIGHTS), bucket, key)
    counting = Counting(client)
    fetch_tree(S3Store(spec, counting), manifest["files"], tmp_path / "whole")
    assert (tmp_path / "whole" / WEIGHTS).read_bytes() == (clip / WEIGHTS).read_bytes()
    assert counting.read[key] == size


def test_a_local_store_reads_each_file_no_further_than_its_recorded_size(clip, tmp_path):
    """The same bound over a folder (LocalDirStore): larger or smaller than recorded is refused, a manifest
    entry without a size is refused before anything is fetched."""
    root = tmp_path / "published"
    shutil.copytree(clip, root)
    files = tree_files(root)
    size = files[WEIGHTS]["size"]
    store = LocalDirStore(root)
    for replaced, said in ((size + 4096, f"is {size + 4096} bytes"), (size - 1, f"is {size - 1} bytes")):
        (root / WEIGHTS).write_bytes(b"\0" * replaced)
        dest = tmp_path / f"fetched-{replaced}"
        with pytest.raises(TreeMismatch, match=rf"{WEIGHTS} {said}, not the {size} bytes its publisher"):
            fetch_tree(store, files, dest, checked=False)
        assert WEIGHTS not in _leftovers(dest)

    unsized = {**files, WEIGHTS: {"sha256": files[WEIGHTS]["sha256"]}}
    with pytest.raises(StoreError, match=rf"the manifest is damaged: file '{WEIGHTS}' has no size"):
        fetch_tree(store, unsized, tmp_path / "unsized", checked=False)
    assert _leftovers(tmp_path / "unsized") == []


def _refused(folder: Path, match: str) -> str:
    with pytest.raises(BackboneNotFound, match=match) as refused:
        load_backbone(str(folder))
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_a_hostile_config_json_is_refused_naming_the_field_before_transformers_reads_it(clip, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(clip, folder)
    text = (clip / "config.json").read_text()
    good = json.loads(text)

    def written(change) -> Path:
        config = json.loads(text)
        change(config)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    def part(name, field, value):
        return lambda c: c[name].__setitem__(field, value)

    where = f"{folder}/config.json"
    for change, field, shown in (
        (part("vision_config", "hidden_size", "768"), "vision_config.hidden_size", "'768'"),
        (part("vision_config", "hidden_size", 10**6), "vision_config.hidden_size", "1000000"),
        (part("text_config", "num_hidden_layers", 10**5), "text_config.num_hidden_layers", "100000"),
        (part("vision_config", "image_size", 10**6), "vision_config.image_size", "1000000"),
        (part("vision_config", "patch_size", 0), "vision_config.patch_size", "0"),
        (part("text_config", "hidden_size", -64), "text_config.hidden_size", "-64"),
        (part("text_config", "intermediate_size", 128.5), "text_config.intermediate_size", "128.5"),
        (part("text_config", "num_attention_heads", True), "text_config.num_attention_heads", "True"),
        (part("text_config", "vocab_size", 10**9), "text_config.vocab_size", "1000000000"),
        (part("text_config", "max_position_embeddings", 10), "text_config.max_position_embeddings", "10"),
        (lambda c: c.__setitem__("projection_dim", [128]), "projection_dim", r"\[128\]"),
        (
            lambda c: c.__setitem__("vision_config_dict", {"num_hidden_layers": 10**5}),
            "vision_config_dict.num_hidden_layers",
            "100000",
        ),
    ):
        _refused(written(change), rf"^{where}: {field} is {shown}; a CLIP's is an integer from \d+ to \d+")

    # Each field within its bound, but together 200 billion parameters (transformers would allocate them).
    big = {
        "hidden_size": 8192,
        "intermediate_size": 32768,
        "num_hidden_layers": 256,
        "num_attention_heads": 64,
    }
    _refused(
        written(lambda c: c["text_config"].update(big)), rf"^{where}: its sizes make a model of 2\d\d\.\d bil"
    )
    for change, field in (
        (lambda c: c.__setitem__("text_config", [1]), "text_config is list, not a JSON object"),
        (
            part("vision_config", "hidden_act", "nope"),
            "vision_config.hidden_act is 'nope', not an activation",
        ),
        (
            part("vision_config", "hidden_size", 65),
            r"its settings are refused by transformers .*The hidden size \(65\) is not a multiple",
        ),
        (lambda c: c.__setitem__("dtype", "float64"), "dtype is 'float64', not one of float32"),
        (part("text_config", "eos_token_id", "x"), "its settings are refused by transformers .*eos_token_id"),
        (lambda c: c.__setitem__("model_type", "siglip"), "model_type is 'siglip', not 'clip'"),
    ):
        _refused(written(change), rf"^{where}: {field}")

    # Within every bound, but not the weights' shapes: transformers' error, as the backbone's.
    _refused(
        written(part("vision_config", "hidden_size", 96)),
        rf"^backbone '{folder}': transformers cannot build it from its files: its config.json and weights disagree",
    )

    # Within every bound and of the weights' shapes, but another number of layers: a layer more than the weights
    # hold was drawn at random (a warning, then noise for features), one fewer dropped a trained layer.
    layers = good["vision_config"]["num_hidden_layers"]
    for more, why in (
        (1, "weights its config.json builds are not in its weight files"),
        (-1, "weights in its weight files have no place"),
    ):
        _refused(
            written(part("vision_config", "num_hidden_layers", layers + more)),
            rf"^backbone '{folder}': its config.json and weights disagree: 16 {why}.*, e.g. vision_model\.encoder",
        )

    # Not strict JSON: NaN, a number past a double (inf), a key twice; over the size bound, refused unread.
    config = folder / "config.json"
    for raw, why in (
        (text.replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": NaN', 1), "NaN is not a number"),
        (text.replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": 1e999', 1), "layer_norm_eps is inf"),
        (
            text.replace('"projection_dim": 128', '"projection_dim": 128, "projection_dim": 4096'),
            "written twice",
        ),
    ):
        assert raw != text
        config.write_text(raw)
        _refused(folder, rf"^{where}.*{why}")
    config.write_text(text + " " * (4 << 20))
    _refused(folder, rf"^{where}: [\d,]+ bytes, over the limit of {4 << 20:,} bytes: not read")

    # The processor's mean and std, and the tokenizer files' sizes, are checked as well.
    config.write_text(json.dumps(good))
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_std": [0, 0.25, 0.25]}))
    _refused(folder, r"preprocessor_config\.json: image_std is \[0, 0\.25, 0\.25\], not three finite numbers")
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_std": [0.5, 0.25, 0.25]}))
    with open(folder / "tokenizer.json", "r+b") as fh:
        fh.truncate(65 << 20)  # sparse: the size a reader would read, without the disk
    _refused(folder, r"tokenizer\.json is \d+ bytes, over the limit .* refused unread")
    shutil.copy(clip / "tokenizer.json", folder / "tokenizer.json")
    assert load_backbone(str(folder)).image_std == (0.5, 0.25, 0.25)  # the folder, repaired, loads


def test_a_published_backbone_with_a_hostile_config_is_refused_naming_its_spec(s3, clip, manifest, tmp_path):
    """Whoever rewrote the manifest as well (every file matches it): the config is refused, naming the spec,
    before a model is built; nothing is left in the pod's cache."""
    folder = tmp_path / "rewritten"
    shutil.copytree(clip, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 10**6
    (folder / "config.json").write_text(json.dumps(config))
    spec = _published(s3, folder, {**manifest, "files": tree_files(folder)})
    with pytest.raises(
        BackboneUnavailable,
        match=rf"(?s)^the backbone at {spec} is refused: {spec}/config.json: vision_config.hidden_size is "
        rf"1000000; .* refused before building the model\. Publish it .*backbone push DIR --to {spec}",
    ):
        resolve_backbone(spec, tmp_path / "pod")
    assert _leftovers(tmp_path / "pod" / "backbones") == []


def test_every_released_clip_shape_passes_the_bounds(tmp_path):
    """The bounds are generous: OpenAI's and LAION's CLIPs (ViT-B/32 to bigG/14, L/14 at 336 px) pass, and
    the parameter count the whole-model bound uses is theirs to within 1%."""
    from transformers import CLIPConfig

    from fedmedclip.backbone import _checked_clip_config, _parameters

    def vit(width, layers, heads, patch, image=224):
        return dict(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            patch_size=patch,
            image_size=image,
            hidden_act="gelu",
        )

    def text(width, layers, heads):
        return dict(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
        )

    released = {  # name: (text, vision, projection, parameters as published)
        "ViT-B/32": (text(512, 12, 8), vit(768, 12, 12, 32), 512, 151.3e6),
        "ViT-B/16": (text(512, 12, 8), vit(768, 12, 12, 16), 512, 149.6e6),
        "ViT-L/14": (text(768, 12, 12), vit(1024, 24, 16, 14), 768, 427.6e6),
        "ViT-L/14-336": (text(768, 12, 12), vit(1024, 24, 16, 14, 336), 768, 427.9e6),
        "ViT-H/14": (text(1024, 24, 16), vit(1280, 32, 16, 14), 1024, 986.1e6),
        "ViT-bigG/14": (
            text(1280, 32, 20),
            {**vit(1664, 48, 16, 14), "intermediate_size": 8192},
            1280,
            2539.6e6,
        ),
    }
    for name, (text_config, vision_config, projection, parameters) in released.items():
        folder = tmp_path / name.replace("/", "-")
        CLIPConfig(
            text_config=text_config, vision_config=vision_config, projection_dim=projection
        ).save_pretrained(folder)
        config = _checked_clip_config(folder)
        assert config is not None and config.vision_config.hidden_size == vision_config["hidden_size"], name
        assert _parameters(config) == pytest.approx(parameters, rel=0.01), name


# ------------------------------------------------------------------------------------ MLflow registry
@pytest.fixture
def registry(mlops_stack, monkeypatch):
    """The stack's MLflow server (artifacts proxied to its S3), and the artifact files downloaded from it since
    (each path MlflowArtifactsRepository fetched, relative to the version's folder): what came to this machine."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    downloaded, real = [], MlflowArtifactsRepository._download_file

    def recorded(self, remote_file_path, local_path):
        downloaded.append(remote_file_path)
        return real(self, remote_file_path, local_path)

    monkeypatch.setattr(MlflowArtifactsRepository, "_download_file", recorded)
    uri = mlops_stack.tracking_uri
    return MlflowClient(uri, registry_uri=uri), uri, downloaded


def _registered(registry, clip: Path, manifest: dict) -> tuple[str, str]:
    """The backbone pushed to a registered name of its own: its spec and the run holding its artifacts."""
    from mlops.backbones import _push_registry

    client, uri, downloaded = registry
    name = f"hostile-{uuid.uuid4().hex[:12]}"
    spec = _push_registry(clip, f"models:/{name}", manifest, uri).spec  # the manifest, not the model reloaded
    downloaded.clear()
    return spec, client.get_model_version(name, spec.rsplit("/", 1)[1]).run_id


def _logged(client, run_id: str, rel: str, size: int, folder: Path) -> None:
    """`backbone/<rel>` of the run replaced by (or added as) a file of `size` zero bytes (sparse here)."""
    path = folder / uuid.uuid4().hex / rel
    path.parent.mkdir(parents=True)
    with open(path, "wb") as fh:
        fh.truncate(size)
    client.log_artifact(run_id, str(path), f"backbone/{rel}".rsplit("/", 1)[0])


def test_a_registry_backbone_with_a_file_replaced_or_added_is_refused_before_any_file_is_downloaded(
    registry, clip, manifest, tmp_path, capsys
):
    """Whoever can write the version's run: a weights artifact replaced by a larger file, a file the manifest
    does not list, a padded manifest; each refused naming the spec and the file from the artifact store's
    listing, nothing of it (nor of any other backbone file) downloaded, nothing left in the cache."""
    client, uri, downloaded = registry
    spec, run_id = _registered(registry, clip, manifest)
    size = manifest["files"][WEIGHTS]["size"]
    big = size + (4 << 20)  # a 50 GB file, scaled down: the same refusal, its body never downloaded
    _logged(client, run_id, WEIGHTS, big, tmp_path)
    message = f"{spec}/{WEIGHTS} is listed at {big} bytes, not at the {size} bytes its manifest records"
    with pytest.raises(BackboneUnavailable, match=rf"(?s)^{re.escape(message)}: .*push DIR --to models:/"):
        resolve_backbone(spec, tmp_path / "pod", tracking_uri=uri)
    assert downloaded == [MANIFEST]  # the manifest alone: bounded, then read
    assert _leftovers(tmp_path / "pod" / "backbones") == []
    # Through the CLI: status 2, one error line naming the spec and the file, no traceback.
    capsys.readouterr()
    argv = ["--quiet", "backbone", spec, "--cache-dir", str(tmp_path / "cli"), "--tracking-uri", uri]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and [ln for ln in err.splitlines() if message in ln] and "Traceback" not in err, err
    assert _leftovers(tmp_path / "cli" / "backbones") == []

    # The weights as pushed again: the backbone resolves, each file downloaded once.
    client.log_artifact(run_id, str(clip / WEIGHTS), "backbone")
    downloaded.clear()
    local = Path(resolve_backbone(spec, tmp_path / "pod", tracking_uri=uri))
    assert local == tmp_path / "pod" / "backbones" / manifest["weights_sha256"]
    assert sorted(downloaded) == sorted([MANIFEST, *manifest["files"]])

    # A file the manifest does not list (here in a folder of its own), then a manifest over its bound.
    for rel, size, refusal in (
        ("extra/weights.bin", 1 << 20, f"{spec}/extra/ is in the artifact store but not in the manifest"),
        (
            MANIFEST,
            (4 << 20) + 1,
            f"{spec}/{MANIFEST} is listed at {(4 << 20) + 1} bytes, where a manifest has at most",
        ),
    ):
        _logged(client, run_id, rel, size, tmp_path)
        downloaded.clear()
        with pytest.raises(BackboneUnavailable, match=rf"^{re.escape(refusal)}"):
            resolve_backbone(spec, tmp_path / "new-pod", tracking_uri=uri)
        assert downloaded == ([MANIFEST] if rel != MANIFEST else [])
        assert _leftovers(tmp_path / "new-pod" / "backbones") == []


def test_a_registry_file_replaced_between_its_listing_and_its_download_is_refused_and_removed(
    registry, clip, manifest, tmp_path, monkeypatch
):
    """The listing matched the manifest, then the weights were replaced by a larger file before their download:
    measured after it, refused naming the file, the download removed; nothing in the cache."""
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    client, uri, downloaded = registry
    spec, run_id = _registered(registry, clip, manifest)
    size = manifest["files"][WEIGHTS]["size"]
    big = size + (1 << 20)
    recording = MlflowArtifactsRepository._download_file  # the fixture's

    def replaced_first(self, remote_file_path, local_path):
        if remote_file_path == WEIGHTS and WEIGHTS not in downloaded:
            _logged(client, run_id, WEIGHTS, big, tmp_path)
        return recording(self, remote_file_path, local_path)

    monkeypatch.setattr(MlflowArtifactsRepository, "_download_file", replaced_first)
    with pytest.raises(
        BackboneUnavailable,
        match=rf"^{re.escape(f'{spec}/{WEIGHTS} was {big} bytes when downloaded, not the {size} bytes listed')}",
    ):
        resolve_backbone(spec, tmp_path / "pod", tracking_uri=uri)
    assert WEIGHTS in downloaded
    assert _leftovers(tmp_path / "pod" / "backbones") == []

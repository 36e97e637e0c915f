"""The feature extraction's image-encoder engines (fedmedclip.encoders): ONNX Runtime gives PyTorch's features
to 1e-4 relative, feature stores record the engine outside their digest (so fp32 engines share a store), and a
wrong or damaged cached graph is rebuilt rather than trusted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from fedmedclip import encoders
from fedmedclip.backbone import load_backbone, make_preprocessing
from fedmedclip.data import open_source
from fedmedclip.encoders import (
    PARITY_TOLERANCE,
    graph_key,
    open_image_encoder,
    relative_difference,
    resolve_device,
    resolve_engine,
)
from fedmedclip.errors import ConfigError
from fedmedclip.features import build_feature_store
from fedmedclip.federation.messages import Provenance


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("glioma", "normal"):
        for i in range(5):
            path = tmp_path / "data" / "Training" / c / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (60, 72, 3), dtype=np.uint8)).save(path, quality=90)
    ims = open_source(tmp_path / "data")
    return ims.split("train"), ims.class_names


def test_onnxruntime_store_matches_the_pytorch_path_and_shares_its_cache(tiny, images, tmp_path):
    records, classes = images
    prep = make_preprocessing("clip", tiny)
    reference = build_feature_store(
        records,
        classes,
        tiny,
        prep,
        directory=tmp_path / "torch",
        progress=False,
        batch_size=4,
        engine="torch",
    )
    assert reference.provenance["encoder"] == {
        "engine": "torch",
        "precision": "fp32",
        "version": torch.__version__,
        "device": "cpu",
    }
    store = build_feature_store(
        records,
        classes,
        tiny,
        prep,
        cache_dir=tmp_path,
        progress=False,
        batch_size=4,
        engine="onnxruntime",
        encoder_cache=tmp_path / "encoders",
    )
    assert store.provenance["encoder"]["engine"] == "onnxruntime"
    assert relative_difference(store.features, reference.features) <= PARITY_TOLERANCE
    assert not torch.equal(store.features, reference.features)  # really another engine, not PyTorch again
    assert store.image_ids == reference.image_ids and torch.equal(store.labels, reference.labels)
    # Same inputs, same digest: a PyTorch extraction reuses the ONNX Runtime store, which says who built it.
    assert store.provenance["digest"] == reference.provenance["digest"]
    again = build_feature_store(
        records, classes, tiny, prep, cache_dir=tmp_path, progress=False, engine="torch"
    )
    assert again.path == store.path and torch.equal(again.features, store.features)
    assert again.provenance["encoder"]["engine"] == "onnxruntime"
    assert [p.suffix for p in (tmp_path / "encoders").iterdir()] == [".onnx"]
    # A site reports this provenance to the server: the declared message takes the engine.
    assert Provenance.model_validate_json(json.dumps(store.provenance)).encoder.engine == "onnxruntime"


def test_a_stale_damaged_or_altered_cached_graph_is_rebuilt(tiny, tmp_path):
    prep = make_preprocessing("squash", tiny)
    cache = tmp_path / "encoders"
    path = cache / f"{graph_key(tiny, prep)}.onnx"
    pixels = np.random.default_rng(3).integers(0, 256, (3, prep.size, prep.size, 3), dtype=np.uint8)
    want = open_image_encoder(tiny, prep, "torch").encode(pixels)

    def reopened():  # as a new process does: nothing opened yet
        encoders._OPENED.clear()
        encoder = open_image_encoder(tiny, prep, "onnxruntime", cache)
        assert relative_difference(encoder.encode(pixels), want) <= PARITY_TOLERANCE
        return encoder

    other = load_backbone("tiny", seed=1)  # another backbone's graph under this one's name
    open_image_encoder(other, prep, "onnxruntime", cache)
    (cache / f"{graph_key(other, prep)}.onnx").rename(path)
    stale = path.read_bytes()
    reopened()
    assert path.read_bytes() != stale
    good = path.read_bytes()
    assert reopened() and path.read_bytes() == good  # a good cached graph is used as it is

    model = onnx.load(str(path))  # weights altered, metadata intact: the probe image tells
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    values = numpy_helper.to_array(weight)
    values = values + np.random.default_rng(0).normal(0, 0.1 * values.std(), values.shape)
    weight.CopyFrom(numpy_helper.from_array(values.astype(np.float32), weight.name))
    onnx.save_model(model, str(path))
    altered = path.read_bytes()
    reopened()
    assert path.read_bytes() != altered

    path.write_bytes(b"not an onnx graph")  # damaged
    reopened()
    assert path.stat().st_size > 100_000


def test_engine_choice(tiny, monkeypatch):
    assert resolve_engine("auto", tiny) == "torch"  # the tiny tower encodes faster than it exports
    assert resolve_engine("torch", tiny) == "torch"
    monkeypatch.setattr(encoders, "AUTO_MIN_VISION_PARAMETERS", 1)  # as if the tower were CLIP-sized
    assert resolve_engine("auto", tiny) == "onnxruntime"
    with pytest.raises(ConfigError, match="unknown encoder engine 'tensorrt'"):
        resolve_engine("tensorrt", tiny)


NO_CUDA = not torch.cuda.is_available()


def test_encoder_device_choice(tiny):
    """`auto` is CUDA only where torch sees a GPU; `cuda` where it sees none is refused naming the flag, as is
    the onnxruntime engine on CUDA (it runs on the CPU only); on CUDA `auto` picks the torch engine."""
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cpu" if NO_CUDA else "cuda")
    with pytest.raises(ConfigError, match="unknown encoder device 'tpu'"):
        resolve_device("tpu")
    if NO_CUDA:
        with pytest.raises(ConfigError, match="--encoder-device cuda: torch sees no CUDA device"):
            resolve_device("cuda")
    assert resolve_engine("auto", tiny, "cuda") == "torch"
    with pytest.raises(ConfigError, match="--encoder-engine onnxruntime runs on the CPU only"):
        resolve_engine("onnxruntime", tiny, "cuda")


def test_the_device_engine_encodes_with_a_copy_and_checks_it_against_the_cpu(tiny):
    """The GPU engine's code on the CPU device (torch runs it the same way): a copy of the vision path encodes,
    the backbone is left where it was, the probe check passes, the encoder records its device; one copy per
    backbone, recipe and device."""
    from fedmedclip.encoders import device_torch_encoder, torch_encoder

    prep = make_preprocessing("squash", tiny)
    moved = device_torch_encoder(tiny, prep, "cpu")
    assert moved.describe()["device"] == "cpu" and moved is device_torch_encoder(tiny, prep, "cpu")
    pixels = np.random.default_rng(1).integers(0, 256, (3, prep.size, prep.size, 3), dtype=np.uint8)
    assert torch.equal(moved.encode(pixels), torch_encoder(tiny, prep).encode(pixels))
    assert all(p.device.type == "cpu" for p in tiny.model.parameters())


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
def test_train_on_cuda_without_one_is_refused_before_anything_is_written(tmp_path):
    from fedmedclip.config import TrainConfig
    from fedmedclip.engine import train

    cfg = TrainConfig(data="synthetic", rounds=1, encoder_device="cuda", out=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="--encoder-device cuda"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device visible to torch (CI has none)")
def test_a_store_encoded_on_cuda_has_the_cpus_features_and_shares_its_cache(tiny, images, tmp_path):
    records, classes = images
    prep = make_preprocessing("clip", tiny)
    cpu = build_feature_store(
        records, classes, tiny, prep, directory=tmp_path / "cpu", progress=False, batch_size=4, device="cpu"
    )
    gpu = build_feature_store(records, classes, tiny, prep, cache_dir=tmp_path, progress=False, device="cuda")
    assert (
        gpu.provenance["encoder"]["device"] == "cuda" and gpu.provenance["digest"] == cpu.provenance["digest"]
    )
    assert relative_difference(gpu.features, cpu.features) <= PARITY_TOLERANCE
    assert next(tiny.model.parameters()).device.type == "cpu"  # the backbone itself stays on the CPU


def test_no_graph_is_left_without_a_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    encoder = open_image_encoder(tiny, make_preprocessing("squash", tiny), "onnxruntime")
    assert encoder.engine == "onnxruntime" and list(Path(tmp_path).iterdir()) == []

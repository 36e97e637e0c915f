"""The frozen CLIP backbone: the built-in tiny one, loading from a local directory, and the offline
refusal with instructions when weights are missing (never a network call)."""

from __future__ import annotations

import json
import socket
import sys
from importlib.metadata import version

import numpy as np
import pytest
import torch
from PIL import Image

from fedmedclip.backbone import (
    BUILTIN_BACKBONES,
    LOGIT_SCALE,
    builtin_record,
    builtin_record_key,
    byte_level_tokenizer,
    load_backbone,
    make_preprocessing,
    random_clip,
)
from fedmedclip.errors import BackboneNotFound, ConfigError, ProvenanceMismatch
from fedmedclip.preprocess import CLIP_MEAN, IMAGENET_MEAN


def test_tiny_is_deterministic(tiny):
    again = load_backbone("tiny")
    assert again.weights_sha256 == tiny.weights_sha256
    other = load_backbone("tiny", seed=1)
    assert other.weights_sha256 != tiny.weights_sha256 and other.name == "tiny@seed1"
    x = torch.zeros(2, 3, 224, 224)
    assert torch.equal(tiny.encode_images(x), again.encode_images(x))
    assert not any(p.requires_grad for p in tiny.model.parameters())  # frozen
    ident = tiny.identity()
    assert ident["name"] == "tiny" and ident["feature_dim"] == 128 and ident["image_size"] == 224
    assert "tiny" in BUILTIN_BACKBONES and LOGIT_SCALE == 100.0


def test_a_recorded_builtin_backbone_is_built_only_to_encode_and_a_wrong_record_is_refused(tiny, tmp_path):
    """A process that finds the built-in backbone's description in its cache takes the identity from it
    (without building the model: transformers and the build cost ~2 s of CPU per process); the model is built
    when something is encoded, and a record that does not describe what is built is refused and replaced."""
    first = load_backbone("tiny", cache_dir=tmp_path)  # no record yet: built and recorded
    record = builtin_record(tmp_path, "tiny", 0)
    assert first.identity() == tiny.identity() and json.loads(record.read_text())["weights_sha256"] == (
        tiny.weights_sha256
    )
    again = load_backbone("tiny", cache_dir=tmp_path)
    assert again.identity() == tiny.identity()
    x = torch.zeros(1, 3, 224, 224)
    assert torch.equal(again.encode_images(x), tiny.encode_images(x))

    # The record is what a later process believes: a wrong one is used as it is until the model is built ...
    wrong = {**json.loads(record.read_text()), "weights_sha256": "0" * 64}
    record.write_text(json.dumps(wrong))
    lied = load_backbone("tiny", cache_dir=tmp_path)
    assert lied.weights_sha256 == "0" * 64 and lied.identity()["feature_dim"] == 128
    # ... and building it to encode refuses the record and writes the right one.
    with pytest.raises(ProvenanceMismatch, match=r"recorded at .*tiny-.*\.json.*000000000000"):
        lied.encode_text(["a picture of a glioma_tumor"])
    with pytest.raises(ProvenanceMismatch):  # the model built is not kept under the wrong identity
        lied.encode_images(x)
    assert load_backbone("tiny", cache_dir=tmp_path).identity() == tiny.identity()
    # A record that is not a description is ignored (built and recorded again).
    record.write_text('{"weights_sha256": 1}')
    assert load_backbone("tiny", cache_dir=tmp_path).identity() == tiny.identity()
    assert json.loads(record.read_text())["weights_sha256"] == tiny.weights_sha256

    # Whatever can change the weights has its own record: the shape, the seed, the code, the versions.
    key = builtin_record_key("tiny", 0)
    installed = {"torch": torch.__version__, "transformers": version("transformers")}
    assert builtin_record_key("tiny", 0, installed) == key
    assert builtin_record_key("tiny", 1) != key and builtin_record_key("random-vit-b32", 0) != key
    assert builtin_record_key("tiny", 0, {**installed, "transformers": "0.0.0"}) != key
    assert builtin_record_key("tiny", 0, {**installed, "torch": "0.0.0"}) != key
    other = load_backbone("tiny", seed=1, cache_dir=tmp_path)
    assert other.weights_sha256 != tiny.weights_sha256 and builtin_record(tmp_path, "tiny", 1).exists()


def test_tokenizer_and_text_encoder_work(tiny):
    tok = byte_level_tokenizer()
    ids = tok("a picture of a glioma_tumor")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) > 10  # spelled out character by character
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "apictureofaglioma_tumor"
    prompts = ["a picture of a glioma_tumor", "a picture of a no_tumor", "a picture of a glioma_tumor"]
    t = tiny.encode_text(prompts)
    assert t.shape == (3, 128) and torch.isfinite(t).all()
    assert torch.equal(t[0], t[2]) and not torch.allclose(t[0], t[1])


def test_load_from_a_local_directory(tiny, tmp_path):
    model, tok = random_clip("tiny")
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    bb = load_backbone(str(tmp_path / "clip"))
    assert bb.weights_sha256 == tiny.weights_sha256
    assert bb.name == str((tmp_path / "clip").resolve())
    assert bb.image_mean == pytest.approx(CLIP_MEAN)  # no processor config: OpenAI CLIP's defaults
    prompts = ["a picture of a normal"]
    assert torch.allclose(bb.encode_text(prompts), tiny.encode_text(prompts), atol=1e-6)


def test_local_directory_image_processor_settings_are_used(tmp_path):
    """Only the processor's settings are read: `transformers.CLIPImageProcessor` needs torchvision (no
    dependency of ours), and resolving it without torchvision printed "Install torchvision" to every user."""
    from transformers import CLIPImageProcessorPil

    model, tok = random_clip("tiny")
    d = tmp_path / "clip"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    CLIPImageProcessorPil(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]).save_pretrained(d)
    bb = load_backbone(str(d))
    assert bb.image_mean == (0.5, 0.5, 0.5) and bb.image_std == (0.25, 0.25, 0.25)
    # Resolving it (the fallback that warns) leaves it in the module; `transformers` is looked up now, since
    # loading a model can put another module object in its place.
    assert "CLIPImageProcessor" not in vars(sys.modules["transformers"])
    prep = make_preprocessing("clip", bb)
    assert prep.mean == (0.5, 0.5, 0.5) and prep.center_crop and prep.resample == "bicubic"


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return attempts


def test_missing_directory_says_how_to_supply_weights(tmp_path, no_network):
    with pytest.raises(BackboneNotFound) as info:
        load_backbone(str(tmp_path / "no-such-clip"))
    msg = str(info.value)
    assert "does not exist" in msg and "huggingface-cli download" in msg and "--backbone" in msg
    # The folder asked for is where the weights go; its path is no Hugging Face id to download.
    folder = tmp_path / "no-such-clip"
    assert f"huggingface-cli download openai/clip-vit-base-patch32 --local-dir {folder}\n" in msg
    assert f"pass --backbone {folder}," in msg
    assert no_network == []


def test_uncached_hub_id_fails_offline_with_instructions(no_network):
    with pytest.raises(BackboneNotFound) as info:
        load_backbone("fedmedclip-test/no-such-clip-model")
    msg = str(info.value)
    assert "fedmedclip-test/no-such-clip-model" in msg
    assert "never downloads" in msg and "huggingface-cli download" in msg and "HF_HOME" in msg
    assert no_network == []


def test_directory_without_weights(tmp_path, no_network):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneNotFound, match="no local CLIP weights"):
        load_backbone(str(tmp_path / "empty"))
    assert no_network == []


def test_preprocessing_recipes(tiny):
    clip, squash = make_preprocessing("clip", tiny), make_preprocessing("squash", tiny)
    assert (clip.center_crop, clip.resample, clip.mean) == (True, "bicubic", tuple(tiny.image_mean))
    assert (squash.center_crop, squash.resample, squash.mean) == (False, "bilinear", IMAGENET_MEAN)
    assert clip.describe()["name"] == "clip" and squash.describe()["name"] == "squash"
    # A wide image whose left and right thirds differ: the centre crop drops them, the squash keeps them.
    arr = np.full((100, 300), 128, np.uint8)
    arr[:, :100] = 0
    arr[:, 200:] = 255
    img = Image.fromarray(arr)
    c, s = clip.to_uint8(img), squash.to_uint8(img)
    assert c.shape == s.shape == (224, 224, 3)
    assert abs(int(c[:, 5].mean()) - 128) <= 2 and int(s[:, 5].mean()) < 5 and int(s[:, -5].mean()) > 250
    x = squash.normalise(torch.from_numpy(np.stack([s])))
    assert x.shape == (1, 3, 224, 224)
    assert x[0, 0, 0, -1].item() == pytest.approx((s[0, -1, 0] / 255 - 0.485) / 0.229, rel=1e-5)
    with pytest.raises(ConfigError, match="unknown preprocessing"):
        make_preprocessing("zscore", tiny)

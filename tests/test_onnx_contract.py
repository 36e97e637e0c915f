"""ONE check of the exported model's contract (fedmedclip.onnx_contract) for registration (the onnx ModelProto)
and serving (the ONNX Runtime session): the same file gives the same contract, or the same refusal, both ways;
an export with the OOD score (two more outputs) is accepted by both."""

from __future__ import annotations

import json

import pytest
from serving_fixtures import contract_preprocessing, make_contract_onnx

from fedmedclip.onnx_contract import ContractError, contract_of_model, contract_of_session

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def both(model, tmp_path, name: str):
    """(the ModelProto's contract, the session's) of `model`, or the two ContractError messages."""
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    got = []
    for read in (
        lambda: contract_of_model(onnx.load(str(path)), name),
        lambda: contract_of_session(
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), name
        ),
    ):
        try:
            got.append(read())
        except ContractError as exc:
            got.append(str(exc))
    return got


def _set_meta(model, key: str, value: str | None):
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    for k, v in kept + ([(key, value)] if value is not None else []):
        model.metadata_props.add(key=k, value=v)


@pytest.mark.parametrize("ood", [True, False])
def test_registration_and_serving_read_the_same_contract(tmp_path, ood):
    model = onnx.load(str(make_contract_onnx(tmp_path / "m.onnx", image_size=32, ood=ood)))
    proto, session = both(model, tmp_path, "good")
    assert proto.class_names == session.class_names and proto.image_size == session.image_size == 32
    assert proto.output_names == session.output_names
    assert (proto.ood is not None) == (session.ood is not None) == ood
    assert proto.signature() == session.signature()
    if ood:
        assert proto.signature()[1][-2:] == [
            ("ood_score", "float32", (-1,)),
            ("drift_embedding", "float32", (-1, -1)),
        ]


def test_a_broken_export_is_refused_the_same_way_by_both(tmp_path):
    base = onnx.load(str(make_contract_onnx(tmp_path / "m.onnx", image_size=32, ood=True)))
    cases = {}
    m = onnx.ModelProto.FromString(base.SerializeToString())
    _set_meta(m, "fedmedclip.format_version", "9")
    cases["format_version='9'"] = m
    m = onnx.ModelProto.FromString(base.SerializeToString())
    _set_meta(m, "fedmedclip.class_names", None)
    cases["not a fedmedclip export"] = m
    m = onnx.ModelProto.FromString(base.SerializeToString())
    _set_meta(m, "fedmedclip.ood.threshold", None)
    cases["has OOD outputs but its metadata_props lack"] = m
    m = onnx.ModelProto.FromString(base.SerializeToString())
    m.graph.input[0].name = "pixels"
    for node in m.graph.node:
        node.input[:] = ["pixels" if i == "images" else i for i in node.input]
    cases["expected one input 'images'"] = m
    for expected, model in cases.items():
        proto, session = both(model, tmp_path, expected.split()[0].strip("'="))
        assert isinstance(proto, str) and proto == session, expected
        assert expected in proto


def test_every_metadata_key_is_written_and_documented_in_order():
    """METADATA_KEYS is the contract's list: `onnx_metadata` writes exactly those keys, and docs/contracts.md
    ("Exported model") names each, in that order."""
    from pathlib import Path

    from fedmedclip.digests import METADATA_KEYS, onnx_metadata

    written = onnx_metadata(
        class_names=["a"], image_size=8, preprocessing={}, backbone="tiny", backbone_sha256="0" * 64,
        method="m", site="global",
    )  # fmt: skip
    assert list(written) == list(METADATA_KEYS)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "contracts.md").read_text()
    listed = doc.index("- `metadata_props`")
    positions = [doc.find(f"`{key}`", listed) for key in METADATA_KEYS]
    assert -1 not in positions and positions == sorted(positions), dict(
        zip(METADATA_KEYS, positions, strict=True)
    )


@pytest.fixture(scope="module")
def scored_export(tmp_path_factory):
    """The serialised bytes of a fixture export with the OOD score, written once for the hostile cases."""
    path = make_contract_onnx(tmp_path_factory.mktemp("scored") / "m.onnx", image_size=32, ood=True)
    return onnx.load(str(path)).SerializeToString()


def _with_image_size(model, size: int, preprocessing: dict | None = None):
    """`model` declaring image size `size` (in both metadata keys) over an input whose height, width and
    channels are symbolic, so nothing but the declared size can refuse it; `preprocessing`: more of the recipe
    replaced."""
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[1:], ("H", "W", "C"), strict=True):
        dim.dim_param = name  # clears dim_value: the input no longer fixes the size
    recipe = {p.key: p.value for p in model.metadata_props}["fedmedclip.preprocessing"]
    _set_meta(model, "fedmedclip.image_size", str(size))
    _set_meta(
        model,
        "fedmedclip.preprocessing",
        json.dumps({**json.loads(recipe), "size": size, **(preprocessing or {})}),
    )
    return model


_NAN, _INF = float("nan"), float("inf")

# (metadata key, JSON value written there, a part of the refusal): values a hostile registrant can write that
# crash registration's card writer, or serve a model whose OOD fields say nothing.
_HOSTILE_OOD = [
    ("fedmedclip.ood.calibration", {"holder": "server", "calibration_images": _NAN, "fit_images": -7},
     "calibration_images is nan, not an integer from 0"),
    ("fedmedclip.ood.calibration", {"fit_images": -7}, "fit_images is -7, not an integer from 0"),
    ("fedmedclip.ood.calibration", {"fit_classes": 3.0}, "fit_classes is 3.0, not an integer from 0"),
    ("fedmedclip.ood.calibration", {"reference_images": True}, "reference_images is True, not an integer"),
    ("fedmedclip.ood.calibration", {"embedding_dims": "8"}, "embedding_dims is '8', not an integer"),
    ("fedmedclip.ood.calibration", {"holder": 7}, "holder is 7, not a string"),
    ("fedmedclip.ood.calibration", {"covariance_shrinkage": _INF}, "covariance_shrinkage is inf, not a number from 0 to 1"),
    ("fedmedclip.ood.calibration", {"covariance_shrinkage": -0.5}, "covariance_shrinkage is -0.5, not a number from 0 to 1"),
    ("fedmedclip.ood.calibration", {"holder": "server", "note": _NAN}, "has keys ['note'] that `fedmedclip export` never writes"),
    ("fedmedclip.ood.calibration", [1, 2], "is not a JSON object"),
    ("fedmedclip.drift.sigma", 1e-200, "2 sigma^2 of kernel bandwidth 1e-200 is not a finite number above 0"),
    ("fedmedclip.drift.sigma", 1e200, "2 sigma^2 of kernel bandwidth 1e+200 is not a finite number above 0"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value", "expected"), _HOSTILE_OOD, ids=[c[2].split(",")[0] for c in _HOSTILE_OOD]
)
def test_hostile_ood_metadata_is_refused_the_same_way_by_both(scored_export, tmp_path, key, value, expected):
    """What `fedmedclip export` never writes in the OOD calibration (fedmedclip.ood.fit_ood and export's
    `described`: three strings, five counts and a shrinkage, nothing else), and a kernel bandwidth whose
    2 sigma^2 (serving/monitor.py's denominator) underflows to 0 or overflows: refused before registration."""
    model = onnx.ModelProto.FromString(scored_export)
    _set_meta(model, key, json.dumps(value))
    proto, session = both(model, tmp_path, "hostile")
    assert isinstance(proto, str) and proto == session, proto
    assert proto.startswith("hostile: ") and expected in proto, proto


_HOSTILE_SIZES = [
    (0, None, "fedmedclip.image_size is 0; an image side is an integer from 1 to 2048"),
    (-4, None, "fedmedclip.image_size is -4; an image side is an integer from 1 to 2048"),
    (1_000_000_000, None, "fedmedclip.image_size is 1000000000; an image side is an integer from 1 to 2048"),
    (4096, None, "fedmedclip.image_size is 4096; an image side is an integer from 1 to 2048"),
    (32, {"mean": [_NAN, 0.5, 0.5]}, "preprocessing mean is [nan, 0.5, 0.5], not three finite numbers"),
    (32, {"mean": [0.5, 0.5]}, "preprocessing mean is [0.5, 0.5], not three finite numbers"),
    (32, {"std": [0, 1, 1]}, "preprocessing std is [0, 1, 1], not three finite numbers above 0"),
    (32, {"std": [-1e308, 1, 1]}, "preprocessing std is [-1e+308, 1, 1], not three finite numbers above 0"),
    (32, {"std": "abc"}, "preprocessing std is 'abc', not three finite numbers above 0"),
    (32, {"resample": "nearest"}, "preprocessing resample is 'nearest', not one of ['bicubic', 'bilinear']"),
    (32, {"center_crop": "false"}, "preprocessing center_crop is 'false', not true or false"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("size", "recipe", "expected"), _HOSTILE_SIZES, ids=[c[2].split(",")[0] for c in _HOSTILE_SIZES]
)
def test_an_image_size_or_preprocessing_no_export_writes_is_refused_by_both(
    scored_export, tmp_path, size, recipe, expected
):
    """An image side of 0 serves a model that answers every image wrongly, a negative one crashes registration's
    input example, one above what a backbone may declare (backbone._SIZE_BOUNDS) is no export's; a mean or std
    that is not three finite numbers (the std's above 0) standardises every pixel to NaN or infinity. Each is
    refused even over an input whose height and width are symbolic (nothing else then checks the size)."""
    model = _with_image_size(onnx.ModelProto.FromString(scored_export), size, recipe)
    proto, session = both(model, tmp_path, "hostile")
    assert isinstance(proto, str) and proto == session, proto
    assert proto.startswith("hostile: ") and expected in proto, proto


def test_the_largest_image_side_is_the_backbones_and_is_accepted(scored_export, tmp_path):
    """The contract's bound is the one a backbone's config is held to, and a model at either end of it (over
    symbolic input dims) is accepted by both readers, as is the export's own recipe read back unchanged."""
    from fedmedclip.backbone import _SIZE_BOUNDS
    from fedmedclip.preprocess import MAX_IMAGE_SIZE, Preprocessing

    assert _SIZE_BOUNDS["image_size"] == (1, MAX_IMAGE_SIZE)
    for size in (1, MAX_IMAGE_SIZE):
        model = _with_image_size(onnx.ModelProto.FromString(scored_export), size)
        proto, session = both(model, tmp_path, f"side{size}")
        assert proto.image_size == session.image_size == proto.preprocessing.size == size
    recipe = contract_preprocessing(32)
    assert Preprocessing.from_dict(recipe.describe()) == recipe


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["normal\x1b[2J", "b", "c", "d"], "holds control characters"),
        (["a", "b\r", "c", "d"], "holds control characters"),
        (["a", " ", "c", "d"], "is empty"),
        (["a", "a", "c", "d"], "class name 'a' is listed twice"),
    ],
)
def test_class_names_that_would_drive_a_terminal_or_answer_ambiguously_are_refused_by_both(
    scored_export, tmp_path, names, expected
):
    """The exported class names are answered to every client, logged and printed by `predict`: a registrant's
    ESC or CR would reach their terminals, a name twice makes two answers one; refused as the data's are."""
    model = onnx.ModelProto.FromString(scored_export)
    _set_meta(model, "fedmedclip.class_names", json.dumps(names))
    proto, session = both(model, tmp_path, "hostile")
    assert isinstance(proto, str) and proto == session, proto
    assert proto.startswith("hostile: fedmedclip.class_names: ") and expected in proto, proto

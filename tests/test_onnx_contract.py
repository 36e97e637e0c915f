"""ONE check of the exported model's contract (fedmedclip.onnx_contract) for registration (the onnx ModelProto)
and serving (the ONNX Runtime session): the same file gives the same contract, or the same refusal, both ways;
an export with the OOD score (two more outputs) is accepted by both."""

from __future__ import annotations

import pytest
from serving_fixtures import make_contract_onnx

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

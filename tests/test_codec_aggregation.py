"""The wire codec (round trips, byte counts, corruption) and server-side aggregation (weights, averages,
integer counters)."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch

from fedmedclip.aggregation import aggregation_weights, weighted_average
from fedmedclip.codec import CODECS, MAGIC, CodecError, decode_state, encode_state
from fedmedclip.errors import ConfigError
from fedmedclip.methods import MethodContext
from fedmedclip.methods.facmic import Facmic
from fedmedclip.methods.fedmedclip_method import FedMedClip
from fedmedclip.modules import FacmicAttention


def _state(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(6, 5, generator=g) * 0.1,
        "fc1.bias": torch.randn(6, generator=g),
        "conv": torch.randn(3, 2, 2, 2, generator=g) * 5,  # > 2-D: rows are the first dimension
        "scalar": torch.tensor(3.25),
        "bn.num_batches_tracked": torch.tensor(17),
    }


def _split(payload: bytes):
    (n,) = struct.unpack("<I", payload[4:8])
    return json.loads(payload[8 : 8 + n]), payload[8 + n :], n


def test_fp32_round_trip_is_exact():
    s = _state()
    out = decode_state(encode_state(s, "fp32-zlib"))
    assert list(out) == list(s)
    for k, v in s.items():
        assert out[k].shape == v.shape
        assert out[k].dtype == (torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
        assert torch.equal(out[k], v)


def test_fp16_round_trip_is_fp16_rounding():
    s = _state(1)
    s["tiny"] = torch.tensor([1e-3, -2.5e-4, 65000.0, 1 / 3])
    out = decode_state(encode_state(s, "fp16-zlib"))
    for k, v in s.items():
        if not v.is_floating_point():
            assert torch.equal(out[k], v)
            continue
        want = np.asarray(v.numpy(), dtype=np.float16).astype(np.float32)  # numpy's own rounding
        assert np.array_equal(out[k].numpy(), want), k
        # within half an fp16 ulp (relative 2^-11) for normal numbers
        assert torch.all((out[k] - v).abs() <= v.abs() * 2.0**-11 + 1e-7)
    assert not torch.equal(out["fc1.weight"], s["fc1.weight"])  # it really is lossy


def test_int8_per_row_within_half_a_step():
    s = _state(2)
    s["zeros"] = torch.zeros(2, 3)
    payload = encode_state(s, "int8-zlib")
    out = decode_state(payload)
    for k, v in s.items():
        if not v.is_floating_point():
            assert torch.equal(out[k], v)
            continue
        rows = v.reshape(v.shape[0], -1) if v.dim() > 1 else v.reshape(1, -1)
        got = out[k].reshape(rows.shape)
        for r in range(rows.shape[0]):
            scale = max(abs(float(x)) for x in rows[r]) / 127.0
            err = (got[r] - rows[r]).abs().max().item()
            assert err <= scale / 2 + 1e-7, (k, r, err, scale)
        assert out[k].shape == v.shape
    assert torch.equal(out["zeros"], s["zeros"])
    # each row's largest magnitude is represented exactly (it maps to ±127)
    w = s["fc1.weight"]
    idx = w.abs().argmax(1)
    assert torch.allclose(out["fc1.weight"][torch.arange(6), idx], w[torch.arange(6), idx], rtol=1e-6)
    header, _, _ = _split(payload)
    assert {e["name"]: e["rows"] for e in header["tensors"] if e["dtype"] == "int8-rows"}["conv"] == 3


@pytest.mark.parametrize("codec", [name for name, c in CODECS.items() if c.fmc1])
def test_byte_counts(codec):
    s = _state(3)
    payload = encode_state(s, codec)
    header, body, n = _split(payload)
    assert payload[:4] == MAGIC
    assert len(payload) == 8 + n + len(body)
    raw = zlib.decompress(body)
    per_float = {"fp16-zlib": 2, "fp32-zlib": 4, "int8-zlib": 1}[codec]
    expected = 0
    for v in s.values():
        if not v.is_floating_point():
            expected += 8 * v.numel()
        elif codec == "int8-zlib":
            rows = v.shape[0] if v.dim() > 1 else 1
            expected += v.numel() + 4 * rows  # int8 values + one fp32 scale per row
        else:
            expected += per_float * v.numel()
    assert len(raw) == expected == sum(e["nbytes"] for e in header["tensors"])
    assert header["codec"] == codec


def test_fam_payload_size_matches_the_doc():
    # ~1.05 MB per direction: the FAM's W and b (thresholds do not travel) at 2 bytes each, before zlib.
    torch.manual_seed(0)
    m = FedMedClip(MethodContext(512, 4, torch.randn(4, 512)))
    state = m.shared_state(m.new_global())
    assert sorted(state) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    payload = encode_state(state, "fp16-zlib")
    _, body, _ = _split(payload)
    assert len(zlib.decompress(body)) == (526_336 - 1_024) * 2
    assert 0.9e6 < len(payload) < 1.06e6  # random weights barely compress


def test_zlib_compresses_a_compressible_tensor():
    s = {"w": torch.zeros(256, 256)}
    payload = encode_state(s, "fp32-zlib")
    assert len(payload) < 256 * 256 * 4 / 50
    noisy = encode_state({"w": torch.randn(256, 256)}, "fp32-zlib")
    assert len(noisy) > len(payload) * 50
    assert torch.equal(decode_state(payload)["w"], s["w"])


def _rebuild(header: dict, body: bytes) -> bytes:
    hb = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(hb)) + hb + body


def test_corrupt_payloads_raise_codec_error():
    payload = encode_state(_state(4), "fp16-zlib")
    header, body, n = _split(payload)
    flipped = bytearray(payload)
    flipped[8 + n + len(body) // 2] ^= 0xFF
    wrong_shape = json.loads(json.dumps(header))
    wrong_shape["tensors"][0]["shape"] = [7, 5]
    wrong_dtype = json.loads(json.dumps(header))
    wrong_dtype["tensors"][0]["dtype"] = "complex64"
    short_bytes = json.loads(json.dumps(header))
    short_bytes["tensors"][0]["nbytes"] -= 2
    bad = {
        "empty": b"",
        "bad magic": b"XXXX" + payload[4:],
        "truncated": payload[: len(payload) - 10],
        "flipped byte": bytes(flipped),
        "header length too long": MAGIC + struct.pack("<I", n + 5000) + payload[8:],
        "header not json": MAGIC + struct.pack("<I", 4) + b"{{{{" + body,
        "header not a dict": _rebuild([1, 2], body),
        "no tensor list": _rebuild({"codec": "fp16-zlib"}, body),
        "wrong shape": _rebuild(wrong_shape, body),
        "wrong dtype": _rebuild(wrong_dtype, body),
        "byte count off": _rebuild(short_bytes, body),
        "extra bytes": _rebuild(header, zlib.compress(zlib.decompress(body) + b"\0\0")),
    }
    for name, p in bad.items():
        with pytest.raises(CodecError):
            decode_state(p)
            pytest.fail(f"{name}: decoded without error")
    with pytest.raises(CodecError, match="unknown codec"):
        encode_state(_state(), "bf16-zlib")


# ----------------------------------------------------------------------------- aggregation


def test_aggregation_weights():
    assert aggregation_weights([10, 30, 60], "samples") == pytest.approx([0.1, 0.3, 0.6])
    assert aggregation_weights([7, 7, 0], "samples") == pytest.approx([0.5, 0.5, 0.0])
    assert aggregation_weights([10, 30, 60], "equal") == pytest.approx([1 / 3] * 3)
    assert aggregation_weights([5], "samples") == [1.0]
    with pytest.raises(ConfigError, match="weighting"):
        aggregation_weights([1, 2], "median")
    with pytest.raises(ConfigError):
        aggregation_weights([], "equal")
    with pytest.raises(ConfigError):
        aggregation_weights([0, 0], "samples")


def test_weighted_average_matches_reference():
    states = [_state(s) for s in range(3)]
    w = [0.2, 0.5, 0.3]
    out = weighted_average(states, w)
    for k in states[0]:
        if not states[0][k].is_floating_point():
            continue
        flat = [s[k].reshape(-1).tolist() for s in states]
        want = [sum(w[i] * flat[i][j] for i in range(3)) for j in range(len(flat[0]))]
        assert out[k].dtype == torch.float32 and out[k].shape == states[0][k].shape
        assert np.allclose(out[k].reshape(-1).numpy(), want, rtol=1e-6, atol=1e-7)
    same = weighted_average([states[0]] * 3, [1 / 3] * 3)
    for k in states[0]:
        assert torch.equal(same[k], states[0][k])  # accumulated in float64: no drift
    bad = dict(states[1])
    bad.pop("fc1.bias")
    with pytest.raises(ConfigError, match="fc1.bias"):
        weighted_average([states[0], bad], [0.5, 0.5])


def test_method_aggregate_keeps_server_counters_and_averages_bn_stats():
    """FACMIC averages every state entry (BN running stats included), by sample size; the integer
    counter keeps the server's previous value (algorithms.md §2.4)."""
    ctx = MethodContext(8, 3, torch.randn(3, 8))
    m = Facmic(ctx)
    assert m.weighting == "samples" and FedMedClip.weighting == "equal"
    states = []
    for s in range(2):
        torch.manual_seed(s)
        a = FacmicAttention(8)
        a.train()
        for _ in range(s + 2):
            a(torch.randn(4, 8) * (s + 1))
        states.append({k: v.clone() for k, v in a.state_dict().items()})
    previous = {k: v.clone() for k, v in states[0].items()}
    previous["net.1.num_batches_tracked"] = torch.tensor(41)
    w = aggregation_weights([30, 10], m.weighting)
    out = m.aggregate(previous, states, w)
    assert out["net.1.num_batches_tracked"].item() == 41
    for k in ("net.1.running_mean", "net.1.running_var", "net.0.weight", "net.3.bias"):
        assert torch.allclose(out[k], 0.75 * states[0][k] + 0.25 * states[1][k], atol=1e-7)


def test_facmic_weights_count_full_batches_only():
    """FACMIC's n_k = 32·⌊n_train_k/32⌋ (algorithms.md §2.4), applied by the server's aggregate_round:
    sites of 95 and 33 training images weigh 64 : 32, not 95 : 33."""
    from fedmedclip.federation.server import aggregate_updates

    m = Facmic(MethodContext(8, 3, torch.randn(3, 8), batch_size=32))
    assert m.aggregation_counts([95, 33, 32, 7]) == [64, 32, 32, 7]
    assert FedMedClip(MethodContext(8, 3, torch.randn(3, 8))).aggregation_counts([95, 33]) == [95, 33]
    a, b = {"w": torch.zeros(2)}, {"w": torch.full((2,), 3.0)}
    out = aggregate_updates(m, a, [a, b], [95, 33])
    assert torch.allclose(out["w"], torch.full((2,), 1.0))  # 3 * 32 / (64 + 32)

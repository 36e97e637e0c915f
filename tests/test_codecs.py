"""The codec registry and the FMC2 format: round trips of every codec, error feedback, header meta, the
historic FMC1 payloads, every refusal (non-finite values, fp16 overflow, truncation, lying headers,
decompression bombs, template mismatches), and FedMedCLIP's FAM update under 250 kB."""

from __future__ import annotations

import json
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedmedclip.codec import (
    CODECS,
    DEFAULT_MAX_BYTES,
    BlockQuant,
    Codec,
    CodecError,
    Float32,
    TensorTransform,
    Zlib,
    decode,
    decode_state,
    encode,
    encode_state,
    get_codec,
    register_codec,
    template_of,
    unregister_codec,
)
from fedmedclip.methods import MethodContext, SiteData
from fedmedclip.methods.fedmedclip_method import FedMedClip

FAM_CODEC = "delta-ef-q4-zlib"
HISTORIC = ("fp16-zlib", "int8-zlib", "fp32-zlib")


def _state(seed=0, scale=1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(6, 5, generator=g) * 0.1 * scale,
        "fc1.bias": torch.randn(6, generator=g) * scale,
        "conv": torch.randn(3, 2, 2, 2, generator=g) * 5 * scale,
        "scalar": torch.tensor(3.25 * scale),
        "bn.num_batches_tracked": torch.tensor(17),
    }


def _moved(state, seed, size=1e-2):
    """`state` plus a small random update of its float entries (what a site sends back)."""
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        k: (v + torch.randn(v.shape, generator=g) * size if v.is_floating_point() else v.clone())
        for k, v in state.items()
    }


def _split(payload: bytes) -> tuple[bytes, dict, bytes]:
    (n,) = struct.unpack("<I", payload[4:8])
    return payload[:4], json.loads(payload[8 : 8 + n]), payload[8 + n :]


def _pack(magic: bytes, header, body: bytes) -> bytes:
    hb = json.dumps(header).encode()
    return magic + struct.pack("<I", len(hb)) + hb + body


def _fam_shaped(seed=0) -> dict[str, torch.Tensor]:
    m = FedMedClip(MethodContext(512, 4, torch.randn(4, 512, generator=torch.Generator().manual_seed(seed))))
    return m.shared_state(m.new_global())


# ----------------------------------------------------------------------------- the historic format
def historic_fmc1(state: dict[str, torch.Tensor], codec: str) -> bytes:
    """FMC1 as fedmedclip has always written it, built here with numpy alone: a payload from before the
    registry, for checking that such payloads still decode and that encode_state still writes them."""
    entries, chunks = [], []
    for name, t in state.items():
        a = t.numpy()
        entry = {"name": name, "shape": list(a.shape)}
        if not t.is_floating_point():
            data, entry["dtype"] = a.astype("<i8").tobytes(), "int64"
        elif codec == "fp16-zlib":
            data, entry["dtype"] = a.astype(np.float16).tobytes(), "float16"
        elif codec == "fp32-zlib":
            data, entry["dtype"] = a.astype(np.float32).tobytes(), "float32"
        else:
            rows = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
            scale = np.maximum(np.abs(rows).max(axis=1), np.float32(1e-12)) / np.float32(127.0)
            q = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
            data = scale.astype(np.float32).tobytes() + q.tobytes()
            entry["dtype"], entry["rows"] = "int8-rows", int(rows.shape[0])
        entry["nbytes"] = len(data)
        entries.append(entry)
        chunks.append(data)
    return _pack(b"FMC1", {"codec": codec, "tensors": entries}, zlib.compress(b"".join(chunks), 6))


def historic_values(state, codec) -> dict[str, np.ndarray]:
    """What an FMC1 payload of `codec` decodes to, computed with numpy alone."""
    out = {}
    for name, t in state.items():
        a = t.numpy()
        if not t.is_floating_point():
            out[name] = a.astype(np.int64)
        elif codec == "fp16-zlib":
            out[name] = a.astype(np.float16).astype(np.float32)
        elif codec == "fp32-zlib":
            out[name] = a.astype(np.float32)
        else:
            rows = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
            scale = np.maximum(np.abs(rows).max(axis=1), np.float32(1e-12)) / np.float32(127.0)
            q = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.float32)
            out[name] = (q * scale[:, None]).reshape(a.shape)
    return out


@pytest.mark.parametrize("codec", HISTORIC)
def test_historic_payloads_decode_and_encode_state_writes_them_byte_for_byte(codec):
    s = _state(1)
    s["fam"] = torch.randn(64, 32, generator=torch.Generator().manual_seed(5)) * 0.03
    old = historic_fmc1(s, codec)
    assert encode_state(s, codec) == old  # the engine's payloads (and byte ledger) are unchanged
    want = historic_values(s, codec)
    for got in (decode_state(old), decode(old).state, decode(encode(s, codec).payload).state):
        assert list(got) == list(s)
        for k in s:
            assert got[k].dtype == (torch.float32 if s[k].is_floating_point() else torch.int64)
            assert np.array_equal(got[k].numpy(), want[k]), (codec, k)
    d = decode(old, template=template_of(s))
    assert d.codec == codec and d.meta == {}


# ----------------------------------------------------------------------------- round trips
def test_every_codec_round_trips_within_its_bound():
    reference = _state(2)
    update = _moved(reference, 0)
    template = template_of(reference)
    for name, codec in CODECS.items():
        enc = encode(update, name, reference=reference, meta={"round": 3})
        got = decode(enc.payload, reference=reference, template=template, codec=name)
        assert got.codec == name and got.meta == {"round": 3}
        assert list(got.state) == list(update)
        assert torch.equal(got.state["bn.num_batches_tracked"], update["bn.num_batches_tracked"])
        for k, v in update.items():
            if not v.is_floating_point():
                continue
            err = (got.state[k] - v).abs()
            if name == "fp32-zlib":
                assert torch.equal(got.state[k], v)
            elif name == "fp16-zlib":
                assert torch.all(err <= v.abs() * 2.0**-11 + 2.0**-25), k
            elif name == "int8-zlib":
                rows = v.reshape(v.shape[0], -1) if v.dim() > 1 else v.reshape(1, -1)
                bound = rows.abs().amax(dim=1, keepdim=True) / 127 / 2 + 1e-7
                assert torch.all(err.reshape(rows.shape) <= bound), k
            else:  # a difference to the reference: the error is relative to the update, not the weights
                # half a step, and a step is at most max(absmax / 7, rms / 2) <= absmax / 2
                assert float(err.max()) <= float((v - reference[k]).abs().max()) / 4 * (1 + 1e-5), (name, k)
        assert (enc.memory is not None) == codec.keeps_memory


def test_blockq_error_is_at_most_half_a_step_per_block():
    q = BlockQuant(bits=4, block=16, rms_step=0.5)
    codec = Codec("test-blockq", q, coders=(Zlib(6),))
    g = torch.Generator().manual_seed(3)
    t = torch.cat([torch.randn(100, generator=g) * 1e-3, torch.zeros(20), torch.tensor([5e-2])])
    raw = codec._encode_tensors({"w": t}, None, None)
    got = q.decode_tensor("w", tuple(t.shape), {}, raw[1])
    blocks = torch.nn.functional.pad(t, (0, 16 * 8 - t.numel())).reshape(8, 16)
    counts = torch.tensor([16.0] * 7 + [t.numel() - 7 * 16])
    step = torch.maximum(blocks.abs().amax(1) / 7, 0.5 * (blocks.pow(2).sum(1) / counts).sqrt())
    err = torch.nn.functional.pad((got - t).abs(), (0, 16 * 8 - t.numel())).reshape(8, 16)
    assert torch.all(err <= step.unsqueeze(1) / 2 * (1 + 1e-5))
    assert torch.equal(got[100:120], torch.zeros(20))  # an all-zero block stays exactly zero
    assert torch.all((got[:100] != 0).sum() > 50)  # and the rest is really coded


def test_error_feedback_sends_everything_eventually():
    """Sum of the decoded differences + the sender's residual = sum of the true differences."""
    reference = _state(4)
    sent_true = {k: torch.zeros_like(v) for k, v in reference.items() if v.is_floating_point()}
    sent_decoded = {k: torch.zeros_like(v) for k, v in sent_true.items()}
    memory = None
    for r in range(6):
        update = _moved(reference, r, size=1e-2 * (r + 1))
        enc = encode(update, FAM_CODEC, reference=reference, memory=memory)
        got = decode(enc.payload, reference=reference).state
        for k in sent_true:
            sent_true[k] += update[k] - reference[k]
            sent_decoded[k] += got[k] - reference[k]
        memory = enc.memory
        assert set(memory) == set(sent_true)  # counters have no residual
        for k in sent_true:
            assert torch.allclose(sent_decoded[k] + memory[k], sent_true[k], atol=1e-6), (r, k)
    assert any(float(m.abs().max()) > 0 for m in memory.values())  # quantisation really left something


def test_memory_survives_a_checkpoint_and_encoding_is_deterministic():
    """A site that saves its residual (safetensors), restarts and goes on sends the same bytes."""
    reference = _fam_shaped(0)
    updates = [_moved(reference, r, size=3e-4) for r in range(3)]
    straight, memory = [], None
    for u in updates:
        enc = encode(u, FAM_CODEC, reference=reference, memory=memory, meta={"round": len(straight)})
        straight.append(enc.payload)
        memory = enc.memory
    first = encode(updates[0], FAM_CODEC, reference=reference, meta={"round": 0})
    restored = load_safetensors(save_safetensors(first.memory))
    resumed = [first.payload]
    memory = restored
    for u in updates[1:]:
        enc = encode(u, FAM_CODEC, reference=reference, memory=memory, meta={"round": len(resumed)})
        resumed.append(enc.payload)
        memory = enc.memory
    assert resumed == straight


def test_meta_and_chain_are_recorded_in_the_header():
    reference = _state(5)
    meta = {"run_id": "r-1", "round": 7, "site": "site_2", "n_train": 412, "present": ["a", "b"], "x": None}
    payload = encode(_moved(reference, 1), FAM_CODEC, reference=reference, meta=meta).payload
    magic, header, _ = _split(payload)
    assert magic == b"FMC2" and header["codec"] == FAM_CODEC
    assert [s["name"] for s in header["chain"]] == ["delta", "error-feedback", "blockq", "zlib"]
    assert header["chain"][2] == {"name": "blockq", **get_codec(FAM_CODEC).quantiser.params()}
    d = decode(payload, reference=reference)
    assert d.meta == meta and d.codec == FAM_CODEC
    for bad in ({"x": float("nan")}, {"x": object()}, {1: "a"}, ["not", "a", "dict"], {"x": "y" * 70_000}):
        with pytest.raises(CodecError, match="meta"):
            encode(reference, "fp32-zlib", meta=bad)


# ----------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_never_encoded(codec, bad):
    reference = _state(6)
    update = _moved(reference, 2)
    update["fc1.bias"][3] = bad
    with pytest.raises(CodecError, match=r"'fc1.bias'.*NaN or Inf"):
        encode(update, codec, reference=reference)
    if get_codec(codec).fmc1:
        with pytest.raises(CodecError, match="'fc1.bias'"):
            encode_state(update, codec)
    if get_codec(codec).needs_reference:
        broken = dict(reference)
        broken["conv"] = reference["conv"].clone()
        broken["conv"][0, 0, 0, 0] = bad
        with pytest.raises(CodecError, match=r"'conv'.*reference"):
            encode(_moved(reference, 2), codec, reference=broken)


def test_fp16_overflow_is_an_error_not_inf():
    s = {"ok": torch.tensor([65504.0, -65504.0]), "w": torch.tensor([1.0, -70000.0])}
    for call in (lambda: encode_state(s, "fp16-zlib"), lambda: encode(s, "fp16-zlib")):
        with pytest.raises(CodecError, match=r"'w'.*overflows fp16"):
            call()
    fine = decode_state(encode_state({"ok": s["ok"]}, "fp16-zlib"))["ok"]
    assert torch.equal(fine, s["ok"])
    # fp32 carries it exactly, and a difference to a reference carries it too
    assert torch.equal(decode_state(encode_state(s, "fp32-zlib"))["w"], s["w"])


def test_non_finite_values_are_never_decoded():
    s = {"w": torch.ones(4), "b": torch.zeros(2)}
    # fp16 bit patterns of inf and NaN, in a historic payload and in an FMC2 one
    for pattern in (0x7C00, 0x7E00, 0xFC00):
        raw = np.array([1, 1, pattern, 1], dtype=np.uint16).tobytes() + np.zeros(2, np.float16).tobytes()
        _, header, _ = _split(encode_state(s, "fp16-zlib"))
        with pytest.raises(CodecError, match=r"'w'.*NaN or Inf"):
            decode(_pack(b"FMC1", header, zlib.compress(raw)))
        _, header2, _ = _split(encode(s, "fp16-zlib").payload)
        with pytest.raises(CodecError, match=r"'w'.*NaN or Inf"):
            decode(_pack(b"FMC2", header2, zlib.compress(raw)))
    # a difference that overflows float32 once added to the reference
    reference = {"w": torch.full((4,), 3e38), "b": torch.zeros(2)}
    big = encode({"w": torch.full((4,), 3.2e38), "b": torch.zeros(2)}, FAM_CODEC, reference=reference)
    _, header, body = _split(big.payload)
    raw = zlib.decompress(body)
    step = np.array([3e38], np.float32)  # finite, but 7 steps are not
    tampered = _pack(b"FMC2", header, zlib.compress(step.tobytes() + raw[4:]))
    with pytest.raises(CodecError, match=r"'w'.*NaN or Inf"):
        decode(tampered, reference=reference)


# ----------------------------------------------------------------------------- references
def test_difference_codecs_need_the_right_reference():
    reference = _state(7)
    payload = encode(_moved(reference, 3), FAM_CODEC, reference=reference).payload
    with pytest.raises(CodecError, match="reference"):
        decode(payload)
    with pytest.raises(CodecError, match="reference"):
        decode_state(payload)
    with pytest.raises(CodecError, match="another reference"):
        decode(payload, reference=_moved(reference, 9, size=1e-3))  # e.g. the global module of another round
    missing = {k: v for k, v in reference.items() if k != "conv"}
    with pytest.raises(CodecError, match="'conv'"):
        decode(payload, reference=missing)
    with pytest.raises(CodecError, match="reference"):
        encode(reference, FAM_CODEC)  # no reference to difference against
    with pytest.raises(CodecError, match="use fedmedclip.codec.encode"):
        encode_state(reference, FAM_CODEC)
    with pytest.raises(CodecError, match="keeps no error-feedback memory"):
        encode(reference, "fp16-zlib", memory={"conv": torch.zeros(3, 2, 2, 2)})
    wrong = {k: torch.zeros(2) for k in ("fc1.weight",)}
    with pytest.raises(CodecError, match="'fc1.weight'"):
        encode(reference, FAM_CODEC, reference=reference, memory=wrong)


# ----------------------------------------------------------------------------- hostile payloads
def _payloads():
    reference = _state(8)
    return reference, {
        "fp16-zlib FMC1": encode_state(reference, "fp16-zlib"),
        "int8-zlib FMC2": encode(reference, "int8-zlib", meta={"round": 1}).payload,
        FAM_CODEC: encode(_moved(reference, 4), FAM_CODEC, reference=reference).payload,
    }


def test_truncated_payloads_are_refused_at_every_length():
    reference, payloads = _payloads()
    for name, p in payloads.items():
        for cut in sorted({0, 3, 4, 7, 8, 9, 20, len(p) // 2, len(p) - 20, len(p) - 2, len(p) - 1}):
            with pytest.raises(CodecError):
                decode(p[:cut], reference=reference)
                pytest.fail(f"{name} cut at {cut} of {len(p)} decoded")


def test_wrong_magic_garbage_and_bad_json_are_refused():
    reference, payloads = _payloads()
    p = payloads[FAM_CODEC]
    _, header, body = _split(p)
    _, int8_header, int8_body = _split(payloads["int8-zlib FMC2"])
    hb = json.dumps(int8_header).encode().replace(b'"round": 1', b'"round": NaN')
    assert b"NaN" in hb
    cases = {
        "bad magic": (b"FMC9" + p[4:], "magic"),
        "not bytes": ("FMC2 a string", "bytes"),
        "empty": (b"", "too short"),
        "huge header length": (b"FMC2" + struct.pack("<I", 0xFFFFFFFF) + p[8:], "truncated"),
        "garbage json": (b"FMC2" + struct.pack("<I", 6) + b"{{{{{{" + body, "not JSON"),
        "not utf-8": (b"FMC2" + struct.pack("<I", 4) + b"\xff\xfe\xfd\xfc" + body, "not JSON"),
        "json list": (_pack(b"FMC2", [1, 2], body), "JSON object"),
        "NaN in json": (b"FMC2" + struct.pack("<I", len(hb)) + hb + int8_body, "not JSON"),
        "format 3": (_pack(b"FMC2", {**header, "format": 3}, body), "format"),
        "unknown codec": (_pack(b"FMC2", {**header, "codec": "zstd-magic"}, body), "unknown codec"),
        "other chain": (_pack(b"FMC2", {**header, "chain": header["chain"][1:]}, body), "chain"),
        "meta not an object": (_pack(b"FMC2", {**header, "meta": [1]}, body), "meta"),
        "trailing data": (p + b"\x00junk", "trailing"),
        "corrupt body": (
            p[: len(p) - 40] + bytes(b ^ 0xFF for b in p[len(p) - 40 :]),
            "zlib|truncated|trailing",
        ),
    }
    for name, (payload, message) in cases.items():
        with pytest.raises(CodecError, match=message):
            decode(payload, reference=reference)
            pytest.fail(f"{name}: decoded")
    with pytest.raises(CodecError, match="expected 'fp16-zlib'"):
        decode(p, reference=reference, codec="fp16-zlib")


def test_a_header_nested_past_the_parsers_depth_is_a_codec_error():
    """A payload header of 100,000 nested brackets raised Python's RecursionError out of `unpack`, where every
    other malformed envelope is a CodecError the reader turns into a rejection naming the party."""
    from fedmedclip.codec.wire import MAGIC_V2, unpack

    header = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(CodecError, match=r"corrupt payload header \(not JSON\): nested too deeply"):
        unpack(MAGIC_V2 + struct.pack("<I", len(header)) + header)


def test_headers_that_lie_about_sizes_and_shapes_are_refused():
    reference, payloads = _payloads()
    for name, p in payloads.items():
        magic, header, body = _split(p)

        def lie(edit, magic=magic, header=header, body=body):
            h = json.loads(json.dumps(header))
            edit(h, h["tensors"][0])  # the first entry is fc1.weight, a float tensor
            return _pack(magic, h, body)

        lies = {
            "shape": lie(lambda h, e: e.update(shape=[7, 5])),
            "shape and bytes": lie(lambda h, e: e.update(shape=[7, 5], nbytes=e["nbytes"] + 5 * 2)),
            "bytes": lie(lambda h, e: e.update(nbytes=e["nbytes"] - 2)),
            "negative bytes": lie(lambda h, e: e.update(nbytes=-1)),
            "negative dim": lie(lambda h, e: e.update(shape=[-6, -5])),
            "float dim": lie(lambda h, e: e.update(shape=[6.0, 5])),
            "stored dtype": lie(lambda h, e: e.update(dtype="complex64")),
            "duplicate": lie(lambda h, e: h["tensors"].append(dict(e))),
            "no tensor list": lie(lambda h, e: h.pop("tensors")),
            "entry not an object": lie(lambda h, e: h["tensors"].append(3)),
            "no name": lie(lambda h, e: e.pop("name")),
            "counter as float": lie(lambda h, e: h["tensors"][-1].update(dtype=e["dtype"])),
        }
        if magic == b"FMC2":
            lies["raw size"] = lie(lambda h, e: h.update(raw_nbytes=h["raw_nbytes"] + 1))
        if "int8" in name:
            lies["rows"] = lie(lambda h, e: e.update(rows=3))
        for what, payload in lies.items():
            with pytest.raises(CodecError):
                decode(payload, reference=reference)
                pytest.fail(f"{name}: a header lying about {what} decoded")


def test_a_huge_claimed_size_is_refused_before_allocating():
    reference, payloads = _payloads()
    for p in payloads.values():
        magic, header, body = _split(p)
        h = json.loads(json.dumps(header))
        # 2^40 values: 2-8 TB if anything believed it
        h["tensors"][0].update(shape=[1 << 20, 1 << 20])
        h["tensors"][0]["nbytes"] = {"float16": 2, "int8-rows": 1, "blockq": 1}[
            h["tensors"][0]["dtype"]
        ] << 40
        if h["tensors"][0]["dtype"] == "int8-rows":
            h["tensors"][0]["nbytes"] += 4 << 20
            h["tensors"][0]["rows"] = 1 << 20
        if h["tensors"][0]["dtype"] == "blockq":
            h["tensors"][0]["nbytes"] += 4 * ((1 << 40) // 256)
        tracemalloc.start()
        try:
            with pytest.raises(CodecError, match="size cap"):
                decode(_pack(magic, h, body), reference=reference)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20


def _bomb(megabytes: int) -> bytes:
    c = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    return b"".join(c.compress(zeros) for _ in range(megabytes)) + c.flush()


def test_decompression_bombs_are_refused_without_inflating_them():
    bomb = _bomb(64)  # 64 MiB of zeros in ~64 kB
    assert len(bomb) < 100_000
    s = {"w": torch.ones(16)}
    cases = []
    for p in (encode_state(s, "fp32-zlib"), encode(s, "fp32-zlib").payload):
        magic, header, _ = _split(p)
        cases.append((_pack(magic, header, bomb), {}))  # the header says 64 bytes
    # a header that admits the size: refused by the template's and by max_bytes' cap before inflating
    _, header, _ = _split(encode(s, "fp32-zlib").payload)
    honest = dict(
        header, raw_nbytes=64 << 20, tensors=[dict(header["tensors"][0], shape=[16 << 20], nbytes=64 << 20)]
    )
    cases.append((_pack(b"FMC2", honest, bomb), {"template": template_of(s)}))
    cases.append((_pack(b"FMC2", honest, bomb), {"max_bytes": 1 << 20}))
    for payload, kwargs in cases:
        tracemalloc.start()
        try:
            with pytest.raises(CodecError, match="inflates past|size cap|expected module|shape"):
                decode(payload, **kwargs)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 << 20, peak  # never the 64 MiB the bomb holds
    # the default cap without template or max_bytes is generous but finite
    assert DEFAULT_MAX_BYTES == 1 << 30
    claim = dict(
        header, raw_nbytes=2 << 30, tensors=[dict(header["tensors"][0], shape=[1 << 29], nbytes=2 << 30)]
    )
    with pytest.raises(CodecError, match="size cap"):
        decode(_pack(b"FMC2", claim, bomb))


def test_template_mismatches_are_refused_naming_the_tensor():
    reference = _state(9)
    template = template_of(reference)
    assert template["fc1.weight"] == ((6, 5), "float32") and template["bn.num_batches_tracked"] == (
        (),
        "int64",
    )
    variants = {
        "missing": ({k: v for k, v in reference.items() if k != "conv"}, r"missing 'conv'"),
        "extra": ({**reference, "fc3.weight": torch.zeros(2)}, r"unexpected 'fc3.weight'"),
        "renamed": (
            {("fc1.weights" if k == "fc1.weight" else k): v for k, v in reference.items()},
            r"missing 'fc1.weight'; unexpected 'fc1.weights'",
        ),
        "shape": ({**reference, "fc1.bias": torch.zeros(7)}, r"'fc1.bias': shape \[7\]"),
        "dtype": ({**reference, "scalar": torch.tensor(3)}, r"'scalar': dtype int64"),
    }
    for what, (state, message) in variants.items():
        for codec in ("fp16-zlib", "fp32-zlib"):
            with pytest.raises(CodecError, match=message):
                decode(encode(state, codec).payload, template=template)
                pytest.fail(f"{what} accepted")
        with pytest.raises(CodecError, match=message):
            decode(encode_state(state, "int8-zlib"), template=template)
    # duplicated: two entries with one name
    magic, header, body = _split(encode(reference, "fp32-zlib").payload)
    header["tensors"].insert(1, dict(header["tensors"][0]))
    with pytest.raises(CodecError, match="'fc1.weight' twice"):
        decode(_pack(magic, header, body), template=template)
    # template dtypes may be torch dtypes or names, shapes tuples or lists (as in a JSON manifest)
    loose = {k: (list(shape), getattr(torch, dtype)) for k, (shape, dtype) in template.items()}
    assert list(decode(encode_state(reference, "fp16-zlib"), template=loose).state) == list(reference)


# ----------------------------------------------------------------------------- registry and directions
class Negate(TensorTransform):
    """A toy wire transform: what a new filter (masking, noise) takes to add."""

    name = "negate"

    def forward(self, tensors, ctx):
        return {k: -v for k, v in tensors.items()}

    def inverse(self, tensors, ctx):
        return {k: -v for k, v in tensors.items()}


def test_a_new_transform_is_one_class_and_one_registry_line():
    codec = register_codec(Codec("negate-fp32-zlib", Float32(), transforms=(Negate(),), coders=(Zlib(1),)))
    try:
        s = _state(10)
        enc = encode(s, "negate-fp32-zlib")
        _, header, body = _split(enc.payload)
        assert header["chain"] == [{"name": "negate"}, {"name": "fp32"}, {"name": "zlib", "level": 1}]
        assert np.frombuffer(zlib.decompress(body)[:4], np.float32)[0] == -s["fc1.weight"].reshape(-1)[0]
        got = decode(enc.payload, template=template_of(s)).state
        assert all(torch.equal(got[k], s[k]) for k in s)
        assert codec.directions == ("up", "down") and "negate-fp32-zlib" in CODECS
        with pytest.raises(CodecError, match="already registered"):
            register_codec(Codec("negate-fp32-zlib", Float32()))
    finally:
        unregister_codec("negate-fp32-zlib")
    assert "negate-fp32-zlib" not in CODECS
    with pytest.raises(CodecError, match="unknown codec 'negate-fp32-zlib'"):
        decode(enc.payload)  # nobody decodes a chain that is not registered here
    with pytest.raises(CodecError, match="built in"):
        unregister_codec("fp16-zlib")


def test_codecs_are_chosen_per_direction():
    assert list(CODECS)[:3] == list(HISTORIC)
    for name in HISTORIC:
        assert get_codec(name, "up") is get_codec(name, "down") is CODECS[name]
    assert get_codec(FAM_CODEC, "up").needs_reference
    with pytest.raises(CodecError, match="uplink"):
        get_codec(FAM_CODEC, "down")
    with pytest.raises(CodecError, match="unknown codec 'bf16-zlib'"):
        get_codec("bf16-zlib")
    with pytest.raises(ValueError):
        Codec("bad-order", Float32(), transforms=(Zlib(6),))


# ----------------------------------------------------------------------------- FedMedCLIP's FAM at 250 kB
def _one_fedmedclip_round(seed=0):
    """A real FedMedCLIP site round at ViT-B/32 width: (the received global module, the site's update)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(4, 512, generator=g)
    m = FedMedClip(MethodContext(512, 4, text, seed=seed))
    y = torch.randint(0, 4, (256,), generator=g)
    x = text[y] + torch.randn(256, 512, generator=g) * 2  # features near their class prompt
    site = m.new_site(SiteData("site_0", x, y, x[:32], y[:32], x[:32], y[:32]), 0)
    received = decode(encode_state(m.shared_state(m.new_global()), "fp16-zlib")).state
    site.load_shared(received)
    site.train_round(1)
    return received, site.shared_update()


def test_fam_update_travels_in_under_250_kB():
    received, update = _one_fedmedclip_round()
    assert sum(v.numel() for v in update.values()) == 525_312
    fp16 = len(encode(update, "fp16-zlib").payload)
    enc = encode(update, FAM_CODEC, reference=received, meta={"run_id": "r", "round": 1, "site": "site_0"})
    assert len(enc.payload) < 250_000 < fp16
    got = decode(enc.payload, reference=received, template=template_of(received)).state
    delta = torch.cat([(update[k] - received[k]).reshape(-1) for k in update])
    err = torch.cat([(got[k] - update[k]).reshape(-1) for k in update])
    assert float(err.norm() / delta.norm()) < 0.25  # and the rest stays in the site's memory
    assert torch.allclose(torch.cat([enc.memory[k].reshape(-1) for k in update]), -err, atol=1e-7)


def test_fam_codec_worst_case_stays_under_250_kB():
    """The step is at least half the block's rms, so symbols have an rms of at most 2 steps: Gaussian noise,
    with that rms and the most entropy for it, is the least compressible update (~3.3 bits per value)."""
    reference = _fam_shaped(1)
    g = torch.Generator().manual_seed(2)
    update = {k: v + torch.randn(v.shape, generator=g) * 3e-4 for k, v in reference.items()}
    enc = encode(update, FAM_CODEC, reference=reference)
    assert 200_000 < len(enc.payload) < 250_000
    _, header, _ = _split(enc.payload)
    assert header["stage_data"]["blockq"]["coarseness"] == 1.0  # it fits without coarsening


def test_a_size_budget_coarsens_the_steps_until_the_body_fits():
    fam = get_codec(FAM_CODEC)
    tight = Codec("tight", fam.quantiser, fam.transforms, fam.coders, max_bits_per_value=2.0)
    plain = Codec("plain", fam.quantiser, fam.transforms, fam.coders)
    reference = _fam_shaped(2)
    values = sum(v.numel() for v in reference.values())
    memory, sent, true = None, 0, 0
    for r in range(3):
        update = _moved(reference, r, size=3e-4)
        assert len(plain.encode(update, reference=reference).payload) > values * 2 / 8 + 2048
        enc = tight.encode(update, reference=reference, memory=memory)
        magic, header, body = _split(enc.payload)
        assert header["stage_data"]["blockq"]["coarseness"] > 1
        assert 8 * (len(body) - 1024) <= 2.0 * values
        got = tight.decode(header, body, reference=reference, template=None, cap=DEFAULT_MAX_BYTES).state
        sent = sent + torch.cat([(got[k] - reference[k]).reshape(-1) for k in got])
        true = true + torch.cat([(update[k] - reference[k]).reshape(-1) for k in update])
        memory = enc.memory
        # what the coarser steps left out is in the memory, sent in later rounds
        assert torch.allclose(sent + torch.cat([memory[k].reshape(-1) for k in got]), true, atol=1e-6)
    with pytest.raises(ValueError, match="scalable"):
        Codec("no-budget-for-fp32", Float32(), max_bits_per_value=8)


def test_random_damage_gives_a_codec_error_or_a_faithful_decode():
    """Bytes flipped anywhere (header included): the receiver gets a CodecError, never another exception;
    whatever still decodes against the template and reference is finite and of the template's shapes."""
    reference, payloads = _payloads()
    template = template_of(reference)
    rng = np.random.default_rng(0)
    outcomes = {"refused": 0, "decoded": 0}
    for p in payloads.values():
        for _ in range(150):
            damaged = bytearray(p)
            for i in rng.integers(0, len(p), size=int(rng.integers(1, 4))):
                damaged[i] = int(rng.integers(0, 256))
            try:
                got = decode(bytes(damaged), reference=reference, template=template)
            except CodecError:
                outcomes["refused"] += 1
                continue
            outcomes["decoded"] += 1
            for k, (shape, _) in template.items():
                assert tuple(got.state[k].shape) == shape
                assert bool(torch.isfinite(got.state[k].float()).all())
    assert outcomes["refused"] > 300

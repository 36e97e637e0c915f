"""The server against the Open Inference Protocol's own files (tests/specs/open-inference-protocol, copied
unmodified from kserve/open-inference-protocol): every endpoint's answers, errors included, validated
against the REST OpenAPI file and parsed with the protocol's gRPC proto; driven with tritonclient over HTTP
and gRPC, sync and asyncio. And what a client must not be able to do (issue 17): control the model, block
other clients with JSON, grow /metrics, flood the log, get a short file classified, hold a connection open
with a body it never sends; and the shutdown order.

One server for the module (model control enabled with a token, a short body timeout); the shutdown test
starts its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import free_port
from serving_fixtures import (
    base64_json,
    make_contract_onnx,
    metric,
    metric_samples,
    running_server,
    uint8_json,
)

REPO = Path(__file__).resolve().parents[1]
MODEL = "fedmedclip"
S = 32
MAX_REQUEST_BYTES = 2_000_000
BODY_TIMEOUT = 3
TOKEN = "t" * 40


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory) -> Path:
    return make_contract_onnx(tmp_path_factory.mktemp("protocol") / "model.onnx", image_size=S)


@pytest.fixture(scope="module")
def server(onnx_path, tmp_path_factory):
    options = [
        "--max-request-bytes", str(MAX_REQUEST_BYTES), "--body-timeout", str(BODY_TIMEOUT),
        "--max-batch-delay-ms", "1", "--metrics-port", str(free_port()),
    ]  # fmt: skip
    with running_server(
        [str(onnx_path)], tmp_path_factory.mktemp("protocol-server"), *options, token=TOKEN
    ) as s:
        yield s


@pytest.fixture(scope="module")
def version(onnx_path) -> str:
    from fedmedclip.digests import sha256_file

    return sha256_file(onnx_path)[:12]


def url(server, path: str) -> str:
    return f"http://{server.http}{path}"


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, S, S, 3), dtype=np.uint8)


def ready_gauges(server) -> tuple[float, float]:
    """/metrics' fedmedclip_server_ready and the model's fedmedclip_model_ready."""
    samples = metric_samples(server.metrics)
    return metric(samples, "fedmedclip_server_ready"), metric(samples, "fedmedclip_model_ready", model=MODEL)


def refusals(server) -> int:
    return server.log().count(" refused ")


def wait_for_refusals(server, count: int) -> None:
    """The server logs asynchronously to a file: wait (minutes at most) until `count` refusals are there."""
    deadline = time.monotonic() + 120
    while refusals(server) < count:
        assert time.monotonic() < deadline, f"only {refusals(server)} of {count} refusals logged"
        time.sleep(0.05)


# ---------------------------------------------------------------------- every endpoint against the spec


def test_every_rest_endpoint_answers_the_openapi_schema(server, spec, version):
    """200s and errors alike: metadata with versions and platform (no nulls), answers with model_version
    and no null parameters, versioned routes, the protocol's {"error"} for 404/405/400/413/503."""
    img = images(2)
    checks = [
        ("GET", "/v2", None, 200),
        ("GET", "/v2/", None, 200),
        ("GET", "/v2/health/live", None, 200),
        ("GET", "/v2/health/ready", None, 200),
        ("GET", f"/v2/models/{MODEL}", None, 200),
        ("GET", f"/v2/models/{MODEL}/versions/{version}", None, 200),
        ("GET", f"/v2/models/{MODEL}/ready", None, 200),
        ("GET", f"/v2/models/{MODEL}/versions/{version}/ready", None, 200),
        ("POST", f"/v2/models/{MODEL}/infer", uint8_json(img, id="a"), 200),
        ("POST", f"/v2/models/{MODEL}/versions/{version}/infer", uint8_json(img), 200),
        ("GET", "/v2/models/nope", None, 404),
        ("GET", f"/v2/models/{MODEL}/versions/999", None, 404),
        ("GET", f"/v2/models/{MODEL}/versions/999/ready", None, 404),
        ("POST", f"/v2/models/{MODEL}/versions/999/infer", uint8_json(img), 404),
        ("POST", "/v2/models/nope/infer", uint8_json(img), 404),
        ("GET", f"/v2/models/{MODEL}/infer", None, 405),
        ("POST", f"/v2/models/{MODEL}/infer", {"inputs": []}, 400),
        ("POST", f"/v2/models/{MODEL}/infer", {"id": 5, "inputs": [{}]}, 400),
    ]
    for method, path, body, status in checks:
        resp = requests.request(method, url(server, path), json=body, timeout=30)
        assert resp.status_code == status, (method, path, resp.status_code, resp.text[:300])
        got = spec.check(resp)
        if path.endswith("/infer") and status == 200:
            assert got["model_version"] == version and got["model_name"] == MODEL
            assert all(o.get("parameters", {}) is not None for o in got["outputs"])
        if "versions" in (got or {}):
            assert got["versions"] == [version] and got["platform"] == "onnx_onnxv1"
    # Unknown routes and v1 are not the protocol's: still {"error": string}, 404.
    for path in ("/", "/v1/models/fedmedclip:predict", "/v2/repository/index", "/docs"):
        resp = requests.post(url(server, path), data=b"{}", timeout=10)
        assert resp.status_code in (404, 405) and set(resp.json()) == {"error"}, (path, resp.text)


def test_binary_answers_have_their_content_type(server, spec):
    body = uint8_json(images(1), parameters={"binary_data_output": True})
    resp = requests.post(url(server, f"/v2/models/{MODEL}/infer"), json=body, timeout=30)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/octet-stream"
    header = spec.check(resp)
    assert {o["name"] for o in header["outputs"]} >= {"probabilities", "ood_score", "out_of_distribution"}


def test_grpc_answers_parse_with_the_protocols_proto(server, pb, version):
    """Each RPC of the protocol's service, answered bytes parsed by classes built from its own .proto:
    ModelMetadata carries versions, the platform and the `properties` map (the ONNX metadata)."""
    import grpc

    channel = grpc.insecure_channel(server.grpc)

    def call(method: str, request):
        stub = channel.unary_unary(
            f"/inference.GRPCInferenceService/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb[f"{method}Response"].FromString,
        )
        return stub(request, timeout=30)

    assert call("ServerLive", pb["ServerLiveRequest"]()).live
    assert call("ServerReady", pb["ServerReadyRequest"]()).ready
    assert call("ModelReady", pb["ModelReadyRequest"](name=MODEL, version=version)).ready
    meta = call("ServerMetadata", pb["ServerMetadataRequest"]())
    assert meta.name == "fedmedclip" and "model_repository" in meta.extensions
    model = call("ModelMetadata", pb["ModelMetadataRequest"](name=MODEL))
    assert list(model.versions) == [version] and model.platform == "onnx_onnxv1"
    assert model.properties["onnx.metadata.fedmedclip.ood.false_alarm_rate"] == "0.05"
    assert model.properties["served.version"] == version

    img = images(3, seed=4)
    request = pb["ModelInferRequest"](model_name=MODEL, model_version=version, id="g1")
    request.inputs.add(name="images", datatype="UINT8", shape=list(img.shape))
    request.raw_input_contents.append(img.tobytes())
    answer = call("ModelInfer", request)
    assert answer.model_version == version and answer.id == "g1"
    assert [o.name for o in answer.outputs] == [
        "probabilities", "class_index", "class_name", "ood_score", "out_of_distribution"
    ]  # fmt: skip
    # gRPC honours the version: another one is NOT_FOUND.
    request.model_version = "999"
    with pytest.raises(grpc.RpcError) as info:
        call("ModelInfer", request)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "version" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        call("ModelMetadata", pb["ModelMetadataRequest"](name=MODEL, version="999"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # A gRPC request's tensors pass the checks a REST request's pass (serving.protocol): typed contents
    # within the datatype's range (uint_contents are 32 bits: 300 would wrap to 44), a known datatype.
    bad = pb["ModelInferRequest"](model_name=MODEL)
    bad.inputs.add(name="images", datatype="UINT8", shape=[1, S, S, 3])
    bad.inputs[0].contents.uint_contents.extend([300] + [0] * (S * S * 3 - 1))
    bad_dtype = pb["ModelInferRequest"](model_name=MODEL)
    bad_dtype.inputs.add(name="images", datatype="UINT9", shape=[1])
    # The request's own parameters too (kserve's gRPC server never read them): bounded in number and size.
    many_params = pb["ModelInferRequest"](model_name=MODEL)
    many_params.inputs.add(name="images", datatype="UINT8", shape=[1, S, S, 3])
    for k in range(40):
        many_params.parameters[f"p{k}"].string_param = "x"
    long_param = pb["ModelInferRequest"](model_name=MODEL)
    long_param.parameters["note"].string_param = "x" * 5000
    # The protocol's double parameter, which kserve's message does not declare: read, and a NaN refused.
    nan_param = pb["ModelInferRequest"](model_name=MODEL)
    nan_param.inputs.add(name="images", datatype="UINT8", shape=[1, S, S, 3])
    nan_param.inputs[0].parameters["scale"].double_param = float("nan")
    many_uint64 = pb["ModelInferRequest"](model_name=MODEL)  # uint64 parameters count as any other
    for k in range(40):
        many_uint64.parameters[f"u{k}"].uint64_param = 2**64 - 1
    # Counted as sent: parameters holding no value (kserve's converter drops them) were never counted, after
    # the whole map was converted on the event loop (bench/bench_grpc_parameters.py).
    many_empty = pb["ModelInferRequest"](model_name=MODEL)
    many_empty.inputs.add(name="images", datatype="UINT8", shape=[1, S, S, 3])
    for k in range(40):
        many_empty.inputs[0].parameters.get_or_create(f"e{k}")
    cases = (
        (bad, "integers 0-255, got 300"),
        (bad_dtype, "unknown datatype 'UINT9'"),
        (many_params, "the request: 40 parameters, over the limit of 32"),
        (long_param, "the request: parameter 'note' is over 4096 characters"),
        (nan_param, "input 'images': parameter 'scale' is nan, not a finite number"),
        (many_uint64, "the request: 40 parameters, over the limit of 32"),
        (many_empty, "input 'images': 40 parameters, over the limit of 32"),
    )
    for request, text in cases:
        with pytest.raises(grpc.RpcError) as info:
            call("ModelInfer", request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in info.value.details()
    channel.close()


def test_tritonclient_http_and_grpc_sync_and_asyncio(server, onnx_path, version):
    """Clients nobody here wrote: versioned calls, metadata, binary and JSON outputs, and errors they can
    decode (tritonclient raises with the server's message)."""
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as agrpc
    import tritonclient.http as httpclient
    import tritonclient.http.aio as ahttp
    from tritonclient.utils import InferenceServerException

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    img = images(4, seed=7)
    want = session.run(["probabilities", "ood_score"], {"images": img})

    def check(result) -> None:
        np.testing.assert_allclose(result.as_numpy("probabilities"), want[0], atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("ood_score"), want[1], rtol=1e-5)

    for module, address in ((httpclient, server.http), (grpcclient, server.grpc)):
        client = module.InferenceServerClient(address)
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL, version) and not client.is_model_ready("nope")
        inp = module.InferInput("images", list(img.shape), "UINT8")
        inp.set_data_from_numpy(img)
        check(client.infer(MODEL, [inp], model_version=version))
        outputs = [module.InferRequestedOutput(n) for n in ("probabilities", "ood_score")]
        check(client.infer(MODEL, [inp], outputs=outputs))
        with pytest.raises(InferenceServerException, match="has no version '999'"):
            client.infer(MODEL, [inp], model_version="999")
        bad = module.InferInput("images", [1, S, S, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, S, S, 3), np.float32))
        with pytest.raises(InferenceServerException, match="must have datatype UINT8"):
            client.infer(MODEL, [bad])
        client.close()

    async def asyncio_clients() -> None:
        for module, address in ((ahttp, server.http), (agrpc, server.grpc)):
            client = module.InferenceServerClient(address)
            assert await client.is_server_ready()
            meta = await client.get_model_metadata(MODEL, version)
            assert (meta["platform"] if isinstance(meta, dict) else meta.platform) == "onnx_onnxv1"
            inp = module.InferInput("images", list(img.shape), "UINT8")
            inp.set_data_from_numpy(img)
            check(await client.infer(MODEL, [inp]))
            await client.close()

    asyncio.run(asyncio_clients())


# ---------------------------------------------------------------------------- model control and readiness


def test_model_control_needs_the_token_and_readiness_follows_the_model(server, spec, onnx_path):
    import grpc
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    unload, load = (url(server, f"/v2/repository/models/{MODEL}/{a}") for a in ("unload", "load"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        resp = requests.post(unload, headers=headers, timeout=10)
        assert resp.status_code == 401 and set(resp.json()) == {"error"}, resp.text
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="model control"'
    client = grpcclient.InferenceServerClient(server.grpc)
    with pytest.raises(InferenceServerException) as info:
        client.unload_model(MODEL)
    assert info.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
    assert requests.get(url(server, "/v2/health/ready"), timeout=10).status_code == 200

    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.post(unload, headers=auth, timeout=10).status_code == 200
    try:
        for path in ("/v2/health/ready", f"/v2/models/{MODEL}/ready"):
            resp = requests.get(url(server, path), timeout=10)
            assert resp.status_code == 503, path
            spec.check(resp)
        assert not client.is_server_ready() and not client.is_model_ready(MODEL)
        assert ready_gauges(server) == (0, 0)
        resp = requests.post(url(server, f"/v2/models/{MODEL}/infer"), json=uint8_json(images(1)), timeout=10)
        assert resp.status_code == 503
        spec.check(resp)
        # A file changed since it was verified is not loaded: the operator is told why, in one log line.
        original = onnx_path.read_bytes()
        onnx_path.write_bytes(original + b"\0")
        try:
            resp = requests.post(load, headers=auth, timeout=120)
            assert resp.status_code == 500 and "changed after its sha256" in resp.json()["error"], resp.text
            # kserve's RepositoryModelLoadRequest is one string field, model_name (1): written by hand
            with grpc.insecure_channel(server.grpc) as channel, pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(
                    "/inference.GRPCInferenceService/RepositoryModelLoad",
                    request_serializer=lambda name: b"\n" + bytes([len(name)]) + name.encode(),
                )(MODEL, metadata=[("authorization", auth["Authorization"])], timeout=120)
            assert info.value.code() == grpc.StatusCode.INTERNAL, info.value.details()
            assert "changed after its sha256" in info.value.details()
            # Triton's message, which tritonclient sends, has model_name as field 2
            with pytest.raises(InferenceServerException) as info:
                client.load_model(MODEL, headers={"authorization": auth["Authorization"]})
            assert info.value.status() == str(grpc.StatusCode.INTERNAL), info.value.message()
            assert "changed after its sha256" in info.value.message()
            assert "Traceback" not in server.log()
        finally:
            onnx_path.write_bytes(original)
    finally:
        assert requests.post(load, headers=auth, timeout=120).status_code == 200
    assert client.is_server_ready() and client.is_model_ready(MODEL)
    assert ready_gauges(server) == (1, 1)
    client.unload_model(MODEL, headers={"authorization": auth["Authorization"]})  # tritonclient, both ways
    assert not client.is_model_ready(MODEL)
    client.load_model(MODEL, headers={"authorization": auth["Authorization"]})
    assert client.is_server_ready() and client.is_model_ready(MODEL)
    resp = requests.post(url(server, f"/v2/models/{MODEL}/infer"), json=uint8_json(images(1)), timeout=30)
    assert resp.status_code == 200
    client.close()
    # Each load logs the model's line again: its parts (operators read them) each after a "; "
    assert "; providers ['CPUExecutionProvider']; batching Batching(" in server.log()


# --------------------------------------------------------------------- hostile JSON: 4xx, one line, no echo


def _raw(server, body: bytes, headers: dict | None = None) -> requests.Response:
    return requests.post(
        url(server, f"/v2/models/{MODEL}/infer"), data=body, headers=headers or {}, timeout=60
    )


HOSTILE = {
    # name: JSON body (bytes), the text of the error
    "nan_in_id": (b'{"id": NaN, "inputs": []}', "not valid JSON"),
    "infinity_in_shape": (
        b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [Infinity], "data": []}]}',
        "not valid JSON",
    ),
    "1e400_in_shape": (
        b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1e400], "data": []}]}',
        "not valid JSON",
    ),
    "1e400_in_id": (b'{"id": 1e400, "inputs": []}', "not valid JSON"),
    "nan_in_datatype": (
        b'{"inputs": [{"name": "images", "datatype": NaN, "shape": [1], "data": [1]}]}',
        "JSON",
    ),
    "number_as_datatype": (
        b'{"inputs": [{"name": "images", "datatype": 1e300, "shape": [1], "data": [1]}]}',
        "'datatype' must be a string",
    ),
    "string_in_shape": (
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "UINT8",
                        "shape": ["1", S, S, 3],
                        "data": [0] * (S * S * 3),
                    }
                ]
            }
        ).encode(),
        "'shape' entries must be non-negative integers",
    ),
    "true_in_shape": (
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "UINT8",
                        "shape": [True, S, S, 3],
                        "data": [0] * (S * S * 3),
                    }
                ]
            }
        ).encode(),
        "'shape' entries must be non-negative integers",
    ),
    "true_among_uint8": (
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "UINT8",
                        "shape": [1, S, S, 3],
                        "data": [True] + [0] * (S * S * 3 - 1),
                    }
                ]
            }
        ).encode(),
        "bool values such as True",
    ),
    "too_many_elements": (b'{"inputs": [{"data": [' + b"0," * (64 * S * S * 3 + 5000) + b"0]}]}", "budget"),
    "no_inputs_9mb_echo_bait": (b'{"x": "' + b"A" * 1_900_000 + b'"}', '"inputs"'),
    "deep_nesting": (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", "not valid JSON"),
    # numpy warned "overflow encountered in cast" on the server's stderr: two more lines, with a source line
    "fp16_overflow": (
        b'{"inputs": [{"name": "images", "datatype": "FP16", "shape": [1], "data": [1e6]}]}',
        "not finite as FP16",
    ),
    # 2**64 - 1 is a UINT64, but read as int64 it overflows: it was called "out of the UINT64 range"
    "uint64_top": (
        b'{"inputs": [{"name": "images", "datatype": "UINT64", "shape": [1], "data": [18446744073709551615]}]}',
        "beyond the 64-bit signed integers this server reads",
    ),
}


def test_hostile_json_gets_a_4xx_one_log_line_and_no_echo(server, spec, tmp_path):
    before = refusals(server)
    for case, (body, text) in HOSTILE.items():
        resp = _raw(server, body, {"content-type": "application/json"})
        assert 400 <= resp.status_code < 500, (case, resp.status_code, resp.text[:300])
        error = spec.check(resp, "POST", f"/v2/models/{MODEL}/infer")["error"]
        assert text in error, (case, error)
        assert len(resp.content) < 1000, (case, len(resp.content))  # the request is never echoed
    wait_for_refusals(server, before + len(HOSTILE))
    log = server.log()
    assert refusals(server) == before + len(HOSTILE)  # one line per refused request
    assert "Traceback" not in log and "Warning" not in log and "A" * 100 not in log
    assert requests.post(url(server, f"/v2/models/{MODEL}/infer"), json=uint8_json(images(1)), timeout=30).ok


def test_an_inference_header_length_of_thousands_of_digits_is_a_client_error(server, spec):
    """A 5,000-digit Inference-Header-Content-Length passed the digits check, then int() refused it (Python's
    4,300-digit limit): HTTP 500 "internal server error" and a traceback in the log. Now the 400 of any other
    length outside the body; leading zeros still read as the number they pad."""
    infer = f"/v2/models/{MODEL}/infer"
    body = json.dumps(uint8_json(images(1))).encode()
    before = refusals(server)
    for length in ("9" * 5000, "1" + "0" * 4999):
        resp = _raw(server, body, {"Inference-Header-Content-Length": length})
        assert resp.status_code == 400, (len(length), resp.status_code, resp.text[:300])
        assert spec.check(resp, "POST", infer)["error"] == (
            f"header Inference-Header-Content-Length must be an integer in 1..{len(body)} (the body's size), "
            f"got '{length[:20]}..."
        ), resp.text[:300]
    wait_for_refusals(server, before + 2)
    log = server.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    padded = {"Inference-Header-Content-Length": "0" * 5000 + str(len(body))}
    assert _raw(server, body, padded).status_code == 200


def test_a_compressed_body_is_refused_naming_its_content_encoding(server, spec):
    """A client that compresses its body (Content-Encoding: gzip) got 'not valid JSON' for a valid request:
    now 415 naming the encoding. The body is not inflated: a client's gzip would need a bound of its own."""
    import gzip

    body = json.dumps(uint8_json(images(1))).encode()
    infer = url(server, f"/v2/models/{MODEL}/infer")
    resp = requests.post(infer, data=gzip.compress(body), headers={"Content-Encoding": "gzip"}, timeout=30)
    assert resp.status_code == 415, resp.text[:300]
    assert (
        "Content-Encoding 'gzip' is not supported"
        in spec.check(resp, "POST", f"/v2/models/{MODEL}/infer")["error"]
    )
    assert requests.post(infer, data=body, headers={"Content-Encoding": "identity"}, timeout=30).ok


def test_a_client_cannot_write_control_characters_into_the_log(server):
    """The URL path reaches the server percent-decoded and a refusal's log line names it: its ESC sequences,
    NEL, U+2028, backspace and DEL are written as escapes, never as themselves."""
    hostile = "%1b[2J%1b[31mFORGED%c2%85NEL%e2%80%a8LS%08%7f"
    before = refusals(server)
    assert requests.get(url(server, f"/nope{hostile}"), timeout=10).status_code == 404
    resp = requests.post(url(server, f"/v2/models/{MODEL}/versions/{hostile}/infer"), data=b"{}", timeout=10)
    assert resp.status_code == 404
    wait_for_refusals(server, before + 2)
    log = server.log()
    assert not {"\x1b", "\x85", "\u2028", "\x08", "\x7f"} & set(log), "a client wrote control characters"
    forged = [line for line in log.splitlines() if "FORGED" in line]
    assert len(forged) == 2 and all("\\x1b[31mFORGED\\x85NEL\\u2028LS\\x08\\x7f" in f for f in forged), forged


def test_a_grpc_message_that_is_not_protobuf_is_invalid_argument(server):
    """Bytes protobuf cannot parse made gRPC answer UNKNOWN naming a Python exception class, and the server
    log a call 'without a request message'. Now: INVALID_ARGUMENT saying what was wrong, logged so."""
    import grpc

    before = refusals(server)
    with grpc.insecure_channel(server.grpc) as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff" * 10, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert "(10 bytes) is not valid protobuf" in info.value.details(), info.value.details()
    wait_for_refusals(server, before + 1)
    assert "is not valid protobuf" in server.log().rsplit(" refused ", 1)[1]


def test_a_grpc_message_over_grpcs_own_limit_is_logged_as_ended_by_grpc(server):
    """gRPC refuses a message over its limit itself (RESOURCE_EXHAUSTED) and hands the handler an end of
    stream: the server logged a call 'without a request message' and counted a bad_request. Now the log line
    and the metric say gRPC (or the client) ended the call."""
    import grpc

    before = refusals(server)
    counted = metric(metric_samples(server.metrics), "fedmedclip_request_errors_total", reason="call_ended")
    message = b"\0" * (MAX_REQUEST_BYTES + 2 * 2**20)  # past gRPC's 1 MiB framing allowance too
    with grpc.insecure_channel(server.grpc) as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(message, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    wait_for_refusals(server, before + 1)
    logged = server.log().rsplit(" refused ", 1)[1]
    assert "call_ended: gRPC or the client ended the call" in logged and "without a request" not in logged
    after = metric(metric_samples(server.metrics), "fedmedclip_request_errors_total", reason="call_ended")
    assert after == counted + 1


def _stalled_grpc_call(server, answer: dict) -> None:
    """A ModelInfer call whose request message never comes (the stream stays open, nothing is sent): what the
    server answers, in `answer`."""
    import grpc

    sent = threading.Event()

    def nothing():
        sent.wait(120)
        yield from ()

    with grpc.insecure_channel(server.grpc) as channel:
        try:
            channel.stream_unary("/inference.GRPCInferenceService/ModelInfer")(nothing(), timeout=60)
        except grpc.RpcError as exc:
            answer.update(code=exc.code(), details=exc.details())
        finally:
            sent.set()


def _until_closed(sock: socket.socket) -> bytes:
    """What the server sends on `sock` until it closes it (a failed test after two minutes)."""
    sock.settimeout(120)
    got = b""
    while data := sock.recv(65536):
        got += data
    sock.close()
    return got


def _http2_connection_without_calls(host: str, port: int) -> socket.socket:
    """An HTTP/2 connection as a gRPC client opens one (preface, SETTINGS, and the ACK of the server's: gRPC
    drops a peer that never acknowledges them), on which no call is ever made."""
    sock = socket.create_connection((host, port), timeout=60)
    settings, settings_ack = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]), bytes([0, 0, 0, 4, 1, 0, 0, 0, 0])  # empty
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings)
    head = b""
    while len(head) < 9:  # the server's SETTINGS frame comes first: its header, then its payload
        head += sock.recv(9 - len(head))
    assert head[3] == 4, head
    length, payload = int.from_bytes(head[:3], "big"), b""
    while len(payload) < length:
        payload += sock.recv(length - len(payload))
    sock.sendall(settings_ack)
    return sock


def test_short_png_and_chunked_and_slow_bodies(server, spec):
    """A PNG whose data ends after one of its rows: 400 (PIL would pad it with zeros). A chunked body over
    --max-request-bytes: 413. A body announced and never sent: 408 after --body-timeout, and a gRPC request
    message announced and never sent: DEADLINE_EXCEEDED after --body-timeout (it was held for good). Nor is a
    connection held that never completes a request head (REST: closed, with a 408 if part of one came) or
    never starts a call (gRPC): they were held for good, each a file descriptor, until the process had none
    left and its probes failed."""
    import struct
    import zlib

    import grpc

    grpc_answer: dict = {}
    stalled = threading.Thread(target=_stalled_grpc_call, args=(server, grpc_answer))
    stalled.start()  # these wait out --body-timeout alongside the REST body below
    rest_host, rest_port = server.http.split(":")
    grpc_host, grpc_port = server.grpc.split(":")
    silent = socket.create_connection((rest_host, int(rest_port)))
    slow_head = socket.create_connection((rest_host, int(rest_port)))
    slow_head.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: a")
    grpc_silent = _http2_connection_without_calls(grpc_host, int(grpc_port))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    short = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 3000, 1000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 3001, 9))
        + chunk(b"IEND", b"")
    )
    resp = requests.post(url(server, f"/v2/models/{MODEL}/infer"), json=base64_json([short]), timeout=30)
    assert resp.status_code == 400 and "truncated" in spec.check(resp)["error"], resp.text

    def chunks():
        for _ in range(40):
            yield b"0" * 100_000

    resp = requests.post(url(server, f"/v2/models/{MODEL}/infer"), data=chunks(), timeout=60)
    assert resp.status_code == 413 and "--max-request-bytes" in spec.check(resp)["error"]

    host, port = server.http.split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(
            f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            'Content-Length: 1000\r\n\r\n{"inputs"'.encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"--body-timeout" in answer
    stalled.join(120)
    assert grpc_answer.get("code") == grpc.StatusCode.DEADLINE_EXCEEDED, grpc_answer
    assert "--body-timeout" in grpc_answer["details"], grpc_answer
    assert _until_closed(silent) == b""
    answer = _until_closed(slow_head)
    assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer, answer[:300]
    _until_closed(grpc_silent)


def test_requests_sent_far_ahead_of_their_answers_are_refused(server):
    """HTTP/1.1 pipelining, which v2 clients do not use: a 256 KiB read of 6,393 small GETs whose answers were
    never read held 6.4 MiB per connection (httptools parses a whole read, a request cycle each), outside every
    limit. More than MAX_PIPELINED waiting behind the one being answered: 429 and the connection closed; a
    few are answered, each."""
    from serving._uvicorn import MAX_PIPELINED

    host, port = server.http.split(":")
    live = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(live * 200)
        answer = _until_closed(sock)
    assert b"HTTP/1.1 429 Too Many Requests\r\n" in answer, answer[-600:]
    assert f"more than {MAX_PIPELINED} requests sent ahead".encode() in answer, answer[-600:]
    assert answer.count(b"HTTP/1.1 200 OK\r\n") <= MAX_PIPELINED + 1, answer.count(b"HTTP/1.1 200 OK\r\n")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(live * 3 + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = _until_closed(sock)
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 4 and b"HTTP/1.1 4" not in answer, answer[:300]


def test_a_huge_request_head_or_trailers_are_refused_and_bodies_are_not_heads(server, spec):
    """A request head that never ends: httptools kept every header in memory until the head ended, so one
    client sending headers for --body-timeout made the server hold gigabytes (400 MB in 3.5 s on loopback),
    outside --max-inflight-bytes. Now a head over 64 KiB gets 431 and the connection is closed at once, and
    so do the trailers of a chunked body. The bodies of pipelined requests, which follow a head already in,
    and the rest of a body refused before it was read, are not counted as a head."""
    from serving._uvicorn import MAX_HEAD_BYTES

    host, port = server.http.split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(
            b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * MAX_HEAD_BYTES + b"\r\n"
        )
        answer = _until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), answer[:300]
    assert set(json.loads(body)) == {"error"} and "over 65,536 bytes" in json.loads(body)["error"]

    pixels = images(2 * MAX_HEAD_BYTES // (S * S * 3))
    binary = {"binary_data_size": pixels.nbytes}
    tensor = {"name": "images", "datatype": "UINT8", "shape": list(pixels.shape), "parameters": binary}
    header = json.dumps({"inputs": [tensor]}).encode()
    request = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: {len(header)}"
        f"\r\nContent-Length: {len(header) + pixels.nbytes}\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall((request + b"\r\n" + header + pixels.tobytes()) * 2)
        sock.sendall(request + b"Connection: close\r\n\r\n" + header + pixels.tobytes())
        answer = _until_closed(sock)
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 3 and b"HTTP/1.1 4" not in answer, answer[:300]
    # Nor is the rest of a body the server refused before reading it all.
    chunked = f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = (
        b"%x\r\n%s\r\n" % (MAX_HEAD_BYTES, b"0" * MAX_HEAD_BYTES) * (2 * MAX_REQUEST_BYTES // MAX_HEAD_BYTES)
    )
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(
            chunked.encode() + chunks + b"0\r\n\r\nGET /v2/health/live HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        answer = _until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 413") and answer.count(b"HTTP/1.1 200 OK\r\n") == 1, answer[:300]
    # The trailers of a chunked body, which httptools kept in memory as a head's headers: refused the same.
    before = refusals(server)
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        with contextlib.suppress(OSError):  # the server may close while these are on their way
            sock.sendall(chunked.encode() + b"2\r\n{}\r\n0\r\n")
            for _ in range(16):
                sock.sendall(b"X-Trailer: " + b"t" * MAX_HEAD_BYTES + b"\r\n")
        with contextlib.suppress(OSError):
            _until_closed(sock)
    wait_for_refusals(server, before + 1)
    assert "HTTP 431 head_too_large" in server.log().rsplit(" refused ", 1)[1]


def test_a_request_that_is_not_http_gets_the_protocols_error_object(server):
    """Bytes uvicorn's parser refuses (a method it does not know, a doubled or negative Content-Length,
    Content-Length with Transfer-Encoding, an HTTP/2 preface) were answered text/plain, not the protocol's
    `{"error": string}`."""
    host, port = server.http.split(":")
    post = f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n".encode()
    for request in (
        b"FOO /v2 HTTP/1.1\r\nHost: x\r\n\r\n",
        post + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
        post + b"Content-Length: -1\r\n\r\n{}",
        post + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ):
        with socket.create_connection((host, int(port)), timeout=120) as sock:
            sock.sendall(request)
            head, _, body = _until_closed(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, (request, head)
        assert "not valid HTTP/1.1" in json.loads(body)["error"], (request, body)


def test_a_request_asking_for_an_upgrade_is_answered_over_http(server, spec):
    """uvicorn made WebSocket handshakes on every route (text/plain 400, an empty 403: not the protocol's
    errors), and its httptools parser reads a request asking for an Upgrade without its body: `curl --http2`
    (`Upgrade: h2c`) got 'not valid JSON' for a valid request. Now the Upgrade header is ignored, and a body
    cut short is refused naming why."""
    websocket = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
    resp = requests.get(url(server, "/v2/health/live"), headers=websocket, timeout=30)
    assert resp.status_code == 200 and resp.json() == {"live": True}, resp.text[:300]
    h2c = {
        "Connection": "Upgrade, HTTP2-Settings",
        "Upgrade": "h2c",
        "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA",
    }
    resp = requests.post(
        url(server, f"/v2/models/{MODEL}/infer"), json=uint8_json(images(1)), headers=h2c, timeout=30
    )
    assert resp.status_code == 400 and "without Upgrade" in spec.check(resp)["error"], resp.text[:300]
    # The body after such a head was parsed as a request of its own: a second 400 ("not valid HTTP/1.1") came
    # after the answer, or instead of it when the body arrived first (on a loaded machine). Now the rest of the
    # connection is not read: one answer, then it closes.
    body = json.dumps(uint8_json(images(1))).encode()
    head = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    host, port = server.http.split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(head)
        answer = b""
        while not answer.endswith(b"}"):  # the answer to the head: an error object
            answer += sock.recv(65536) or b"}"
        # The server may have closed (and then reset) before the body comes: what it sent before is kept.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(body)
            while data := sock.recv(65536):
                answer += data
    assert answer.count(b"HTTP/1.1 4") == 1 and b"without Upgrade" in answer, answer[:600]


def test_metrics_only_on_the_metrics_port(server):
    """/metrics counts what every client's requests held: an inference client reading it before and after
    another client's request learnt how many images it sent, their pixel counts and whether they were out of
    distribution. With --metrics-port it is served there only, and that port serves nothing else, so a network
    policy can admit Prometheus to it and inference clients to the REST and gRPC ports only."""
    resp = requests.get(url(server, "/metrics"), timeout=10)
    assert resp.status_code == 404 and set(resp.json()) == {"error"}, resp.text[:300]
    resp = requests.get(f"http://{server.metrics}/metrics", timeout=10)
    assert resp.status_code == 200 and "fedmedclip_decoded_pixels_total" in resp.text
    for method, path in (("GET", "/v2/health/ready"), ("GET", f"/v2/models/{MODEL}"), ("POST", "/metrics")):
        resp = requests.request(method, f"http://{server.metrics}{path}", json={}, timeout=10)
        assert resp.status_code in (404, 405), (path, resp.status_code)
        assert "GET /metrics only" in resp.json()["error"], (path, resp.text)


def test_metric_labels_stay_bounded(server):
    """Requests naming invented models (oversized, unknown, malformed) never become label values."""

    def metrics_text() -> str:
        return requests.get(f"http://{server.metrics}/metrics", timeout=30).text

    requests.post(url(server, "/v2/models/warm-up-name/infer"), data=b"{}", timeout=10)
    size = len(metrics_text())
    for i in range(150):
        name = f"invented-{i}"
        requests.post(
            url(server, f"/v2/models/{name}/infer"),
            data=b"x",
            headers={"Content-Length": str(MAX_REQUEST_BYTES + 1)},
            timeout=10,
        )
        requests.post(url(server, f"/v2/models/{name}/infer"), data=b"{}", timeout=10)
        requests.get(url(server, f"/v2/models/{name}/versions/{i}/ready"), timeout=10)
    text = metrics_text()
    assert "invented-" not in text
    assert len(text) - size < 2000, f"/metrics grew by {len(text) - size} bytes"


def test_kserve_is_the_pinned_version_with_the_shortcomings_we_work_around():
    """serving/_kserve.py lists what the pinned kserve does that the server must not: if the pin changes,
    this fails, and the list is checked again. (A subprocess: kserve's gRPC stubs and tritonclient's claim
    the same protobuf names in one process.)"""
    code = """
import json, sys
from importlib.metadata import version
from serving._kserve import PINNED_VERSION, InferRequest
from kserve.protocol.rest import v2_endpoints
from kserve.protocol.dataplane import DataPlane
import inspect
src = inspect.getsource(v2_endpoints.register_v2_endpoints)
try:
    InferRequest.from_bytes(b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":5}}]}\\x01\\x00\\x00\\x00\\xff', 99, "m")
    from_bytes_breaks = False
except Exception:
    from_bytes_breaks = True
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
proto_gaps = [sorted(f.name for f in pb.InferParameter.DESCRIPTOR.fields),
              sorted(pb.ModelMetadataResponse.DESCRIPTOR.fields_by_number),
              sorted(pb.RepositoryModelLoadRequest.DESCRIPTOR.fields_by_name)]
print(json.dumps([PINNED_VERSION, version("kserve"), "/repository/models/{model_name}/unload" in src,
                  "model_repository_extension" in str(DataPlane.metadata.__code__.co_consts), from_bytes_breaks,
                  proto_gaps]))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    pinned, installed, mounts_repository, advertises, from_bytes_breaks, proto_gaps = json.loads(
        out.stdout.strip().splitlines()[-1]
    )
    assert installed == pinned == "0.21.0"
    assert mounts_repository and advertises and from_bytes_breaks
    # The gRPC messages' gaps that grpc_parameters, metadata_response and control_model_name fill: no double or
    # uint64 parameter, no `properties` (6), the model of a model-control request only as field 1.
    assert proto_gaps == [["bool_param", "int64_param", "string_param"], [1, 2, 3, 4, 5], ["model_name"]]


# ------------------------------------------------------------------------------------------- shutdown


def test_sigterm_not_ready_first_then_drain_then_ports_close(onnx_path, tmp_path):
    """A request is in flight (its body half sent) when SIGTERM arrives: readiness turns false on REST and
    gRPC while both still answer; the request then completes with a 200; only then do the ports close and
    the process exits 0."""
    import signal

    import tritonclient.grpc as grpcclient

    body = json.dumps(uint8_json(images(1))).encode()
    with running_server(
        [str(onnx_path)], tmp_path, "--drain-seconds", "1", "--grace-period", "120", "--body-timeout", "300"
    ) as server:
        host, port = server.http.split(":")
        sock = socket.create_connection((host, int(port)), timeout=300)
        sock.sendall(
            f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:100]
        )
        client = grpcclient.InferenceServerClient(server.grpc)
        assert client.is_server_ready()
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 120
        while requests.get(url(server, "/v2/health/ready"), timeout=30).status_code == 200:
            assert time.monotonic() < deadline, "readiness never turned false"
            time.sleep(0.02)
        # Not ready, but both ports still answer: the load balancer can see it.
        assert not client.is_server_ready() and client.is_server_live()
        assert ready_gauges(server) == (0, 1)  # the model is still loaded and answers
        while metric(metric_samples(server.metrics), "fedmedclip_requests_in_flight") != 1:  # the one sending
            assert time.monotonic() < deadline, "the request being sent is not in flight"
            time.sleep(0.02)
        assert requests.get(url(server, f"/v2/models/{MODEL}/ready"), timeout=30).status_code == 503
        assert requests.get(url(server, "/v2/health/live"), timeout=30).status_code == 200
        client.close()
        sock.sendall(body[100:])
        answer = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert server.proc.wait(timeout=180) == 0
        log = server.log()
        assert log.index("not ready now") < log.index("closing the ports") < log.index("stopped")
        for address in (server.http, server.grpc):
            h, p = address.split(":")
            with pytest.raises(OSError):
                socket.create_connection((h, int(p)), timeout=5).close()


def test_the_uvicorn_internals_the_server_relies_on_are_the_pinned_ones():
    """serving/_uvicorn.py lists what the server takes from uvicorn beyond its settings: if the pin
    (constraints.txt) changes, this fails, and the list is checked again (the slow-client tests of
    tests/test_serving_hardening.py exercise the head deadline itself)."""
    import inspect
    from importlib.metadata import version

    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from serving._uvicorn import PINNED_VERSION

    assert version("uvicorn") == PINNED_VERSION == "0.55.0"
    pinned = {line.strip() for line in (REPO / "constraints.txt").read_text().splitlines()}
    assert f"uvicorn=={PINNED_VERSION}" in pinned and f"httptools=={version('httptools')}" in pinned
    hooks = (
        "connection_made",
        "data_received",
        "on_response_complete",
        "connection_lost",
        "send_400_response",
        "_unsupported_upgrade_warning",
        "on_message_begin",
        "on_headers_complete",
        "on_message_complete",
        "pause_writing",
        "resume_writing",
    )
    for hook in hooks:
        assert callable(getattr(AutoHTTPProtocol, hook, None)), hook
    source = inspect.getsource(AutoHTTPProtocol)
    assert "self.cycle" in source and "self.loop" in source and "self.transport" in source
    assert "self.pipeline" in source or "h11" in AutoHTTPProtocol.__module__
    assert "capture_signals" in inspect.getsource(uvicorn.Server.serve)

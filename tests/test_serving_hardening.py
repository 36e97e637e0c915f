"""Serving hardening (issue 12, "Serving hardening"; issue 13, non-finite values at the serving boundary),
against a real server process on loopback: where it listens, the server-wide budget of request bytes held at
once, the per-request pixel and decode budgets, fair decoding between clients, malformed binary-request
parameters and JSON UINT8 values as client errors, model files verified against their sidecar, and models
answering NaN refused at start-up or per request.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import free_port, wait_for
from PIL import Image
from serving_fixtures import (
    contract_preprocessing,
    make_contract_onnx,
    metric,
    metric_samples,
    refused_to_serve,
    running_server,
)

MODEL = "fedmedclip"
S = 64
TRAP_PIXEL = 17  # the served model answers NaN for an image whose every pixel is 17
BIG = 2000  # side of the large test images: 4 M pixels each
MAX_REQUEST_PIXELS = 33 * BIG * BIG  # a request of 32 large images fits, one of 34 does not
MAX_BATCH_IMAGES = 40
MAX_INFLIGHT_BYTES = 64 * 2**20  # as small as it may be: the default --max-request-bytes


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory) -> Path:
    return make_contract_onnx(
        tmp_path_factory.mktemp("hardening") / "model.onnx", image_size=S, nan_for_pixel=TRAP_PIXEL
    )


@pytest.fixture(scope="module")
def server(onnx_path, tmp_path_factory):
    """(http, grpc port, pid) of a server started without --host (so on its default), two decoding threads."""
    options = [
        "--name", MODEL, "--max-batch-size", "16", "--max-batch-delay-ms", "5", "--decode-threads", "2",
        "--max-batch-images", str(MAX_BATCH_IMAGES), "--max-image-pixels", str(BIG * BIG),
        "--max-request-pixels", str(MAX_REQUEST_PIXELS), "--max-inflight-bytes", str(MAX_INFLIGHT_BYTES),
    ]  # fmt: skip
    with running_server([str(onnx_path)], tmp_path_factory.mktemp("hardening-log"), *options) as s:
        yield s.http, int(s.grpc.rsplit(":", 1)[1]), s.proc.pid


@pytest.fixture(scope="module")
def ort_session(onnx_path):
    import onnxruntime as ort

    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------- helpers


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@functools.cache
def large_png(seed: int) -> bytes:
    """A BIG x BIG gradient: a few KB of PNG, 4 M pixels to decode (about 50 ms of CPU here)."""
    y, x = np.mgrid[0:BIG, 0:BIG]
    return png(np.stack([(x + seed) % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8))


def binary_request(header: dict, tail: bytes = b"") -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + tail, {"Inference-Header-Content-Length": str(len(head))}


def bytes_request(blobs: list[bytes]) -> tuple[bytes, dict]:
    from serving.cli import encode_bytes_request

    body, json_length = encode_bytes_request(blobs)
    return body, {"Inference-Header-Content-Length": str(json_length)}


def post(http: str, body, headers=None, timeout: float = 60) -> requests.Response:
    url = f"http://{http}/v2/models/{MODEL}/infer"
    if isinstance(body, dict):
        return requests.post(url, json=body, timeout=timeout)
    return requests.post(url, data=body, headers=headers, timeout=timeout)


def counter(http: str, name: str) -> float:
    return metric(metric_samples(http), name, model=MODEL)


def probabilities(resp: requests.Response) -> np.ndarray:
    out = {o["name"]: o for o in resp.json()["outputs"]}["probabilities"]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def reference(session, blobs: list[bytes]) -> np.ndarray:
    pre = contract_preprocessing(S)
    return session.run(None, {"images": np.stack([pre.to_uint8(Image.open(io.BytesIO(b))) for b in blobs])})[
        0
    ]


def assert_serving(http: str, session) -> None:
    blob = png(np.random.default_rng(5).integers(0, 256, (80, 70, 3), dtype=np.uint8))
    resp = post(http, *bytes_request([blob]))
    assert resp.status_code == 200, resp.text
    np.testing.assert_allclose(probabilities(resp), reference(session, [blob]), atol=1e-5)


def _listening(port: int) -> list[str]:
    """Local addresses of the LISTEN sockets on `port` (from /proc/net/tcp and tcp6, hex as the kernel has it)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


# ------------------------------------------------------------------------------------------------ --host


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads Linux's socket tables")
def test_listens_on_loopback_only_by_default(server):
    http, grpc_port, _ = server
    # 127.0.0.1, ::1, and ::ffff:127.0.0.1 (gRPC listens on IPv4 loopback through an IPv6 socket)
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    for port in (int(http.rsplit(":", 1)[1]), grpc_port):
        addresses = _listening(port)
        assert addresses, f"nothing listens on port {port}"
        assert set(addresses) <= loopback, f"port {port} listens on {addresses}, not only on loopback"


def test_host_option(onnx_path, capsys):
    from serving.cli import main

    assert (
        main(["serve", str(onnx_path), "--host", "no-such-host.invalid", "--http-port", str(free_port())])
        == 2
    )
    err = capsys.readouterr().err
    assert "--host" in err and "cannot be listened on" in err


def test_a_request_limit_over_what_grpc_can_carry_still_serves_both(onnx_path, tmp_path):
    """--max-request-bytes over 2 GiB: gRPC takes a message length as a C int (the server crashed with an
    OverflowError traceback as it built the gRPC server); REST keeps the limit, gRPC its 2 GiB ceiling."""
    import tritonclient.grpc as grpcclient  # not kserve's stubs: both register the protocol's proto

    big = str(3 * 2**30)
    with running_server(
        [str(onnx_path)], tmp_path, "--max-request-bytes", big, "--max-inflight-bytes", big
    ) as s:
        assert requests.get(f"http://{s.http}/v2/health/ready", timeout=10).status_code == 200
        client = grpcclient.InferenceServerClient(s.grpc)
        assert client.is_server_ready()
        client.close()
        assert "Traceback" not in s.log()


def test_a_batch_size_that_cannot_fit_in_memory_is_refused_in_one_line(onnx_path):
    """The warm-up runs a full batch of --max-batch-size images: one that cannot be allocated was a
    MemoryError traceback (exit status 1), not a refusal naming the flag."""
    err = refused_to_serve(onnx_path, "--max-batch-size", str(10**12), "--grpc-port", str(free_port()))
    assert "does not fit in memory; lower --max-batch-size" in err, err


# ------------------------------------------------------------------------- request bytes held server-wide


def test_request_bytes_in_flight_are_bounded_server_wide(server, ort_session):
    """Per-request limits alone let ~250 clients, each announcing a 64 MB body and sending it slowly within
    --body-timeout, fill a 16 GiB pod. A body sent near --max-inflight-bytes and not finished holds the
    budget: another request, REST or gRPC, is refused at once, its body unread (503 with Retry-After /
    RESOURCE_EXHAUSTED, naming the option); once that client goes away, requests are served again. A body
    only announced holds nothing: 16 heads announcing 64 MiB (2 kB sent) kept every other client out."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    http, grpc_port, _ = server
    host, port = http.rsplit(":", 1)

    def in_flight() -> float:
        return metric(metric_samples(http), "fedmedclip_requests_in_flight")

    def refused() -> float:
        return metric(
            metric_samples(http), "fedmedclip_request_errors_total", model=MODEL, reason="server_busy"
        )

    image = np.full((1, S, S, 3), 90, np.uint8)
    with socket.create_connection((host, int(port)), timeout=30) as stalled:
        stalled.sendall(
            f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {MAX_INFLIGHT_BYTES - 1000}\r\n\r\n".encode()
        )
        wait_for(lambda: in_flight() == 1, "the stalled request to be in flight")
        # Announced, not sent: it holds nothing of the budget.
        assert post(http, _uint8_header(data=image.ravel().tolist())).status_code == 200
        # Sent but for its last byte: held (as they arrive: no request may take the budget meanwhile, or the
        # stalled one would be the one refused), so every other request is refused until it ends.
        stalled.sendall(b" " * (MAX_INFLIGHT_BYTES - 1001))

        def held() -> bool:
            assert in_flight() == 1, "the stalled request ended before its bytes were held"
            return metric(metric_samples(http), "fedmedclip_request_bytes_held") == MAX_INFLIGHT_BYTES - 1001

        wait_for(held, "the stalled body's bytes to be held")
        refused_before = refused()
        resp = post(http, _uint8_header(data=image.ravel().tolist()))
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"] == "1"
        error = resp.json()["error"]
        assert "server is busy" in error and f"over the limit of {MAX_INFLIGHT_BYTES:,} bytes" in error, error
        assert "(server option --max-inflight-bytes)" in error, error

        client = grpcclient.InferenceServerClient(f"{host}:{grpc_port}")
        tensor = grpcclient.InferInput("images", list(image.shape), "UINT8")
        tensor.set_data_from_numpy(image)
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, [tensor])
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED", info.value.message()
        assert "--max-inflight-bytes" in info.value.message()
        assert refused() == refused_before + 2
    wait_for(lambda: in_flight() == 0, "the stalled request to be let go")  # its reservation with it
    assert client.infer(MODEL, [tensor]).as_numpy("probabilities").shape == (1, 4)
    client.close()
    assert_serving(http, ort_session)


def test_a_budget_below_one_request_is_refused_in_one_line(onnx_path, capsys):
    from serving.cli import main

    options = ["--max-request-bytes", "2000", "--max-inflight-bytes", "1000", "--http-port", str(free_port())]
    assert main(["serve", str(onnx_path), *options]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "--max-inflight-bytes 1,000 is below --max-request-bytes 2,000" in err, err


# ------------------------------------------------------------------------------------ per-request budgets


def test_request_over_the_pixel_budget_is_refused_before_decoding(server, ort_session):
    http = server[0]
    decoded_before = counter(http, "fedmedclip_images_decoded_total")
    blobs = [large_png(0)] * 34  # 34 x 4 M pixels, in about 0.5 MB of PNG
    resp = post(http, *bytes_request(blobs))
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert "--max-request-pixels" in error and f"{34 * BIG * BIG:,} pixels" in error
    assert counter(http, "fedmedclip_images_decoded_total") == decoded_before  # not one image decoded
    assert counter(http, "fedmedclip_request_errors_total") >= 1
    assert_serving(http, ort_session)


def test_a_big_request_does_not_hold_up_a_small_one(server, ort_session):
    """32 large images (about 1.6 s of decoding) in flight; a one-image request sent meanwhile is answered
    while the big one has decoded at most half of its images, and both answers are right."""
    http = server[0]
    big = [large_png(k % 2) for k in range(32)]
    small = png(np.random.default_rng(1).integers(0, 256, (S, S, 3), dtype=np.uint8))
    before = counter(http, "fedmedclip_images_decoded_total")
    answers: dict[str, requests.Response] = {}
    sender = threading.Thread(target=lambda: answers.update(big=post(http, *bytes_request(big))))
    sender.start()
    deadline = time.monotonic() + 60
    while counter(http, "fedmedclip_images_decoded_total") == before:  # the big request is decoding
        assert sender.is_alive() and time.monotonic() < deadline, "the big request never started decoding"
        time.sleep(0.005)
    resp = post(http, *bytes_request([small]))
    big_decoded = counter(http, "fedmedclip_images_decoded_total") - before - 1
    sender.join(120)
    assert resp.status_code == 200, resp.text
    np.testing.assert_allclose(probabilities(resp), reference(ort_session, [small]), atol=1e-5)
    print(f"big images decoded when the small request was answered: {big_decoded:.0f} of {len(big)}")
    assert big_decoded <= len(big) // 2, f"the small request waited for {big_decoded} of the big one's images"
    assert answers["big"].status_code == 200, answers["big"].text
    got = probabilities(answers["big"])
    assert got.shape == (len(big), 4)
    np.testing.assert_allclose(got[[0, -1]], reference(ort_session, [big[0], big[-1]]), atol=1e-5)


def test_decode_time_budget_refuses_the_rest_of_a_request():
    """The pool alone (real PIL decoding on real threads): once a request's images have taken its CPU
    budget, the next one is not started and the request is refused; within the budget all decode."""
    from prometheus_client import REGISTRY

    from serving.errors import RequestRejected
    from serving.images import DecodePool, Limits

    pre = contract_preprocessing(S)
    blobs = [large_png(k) for k in range(3)]
    pool = DecodePool(2, "decode-budget-unit")
    try:
        with pytest.raises(RequestRejected) as info:
            asyncio.run(pool.decode(blobs, pre, Limits(max_decode_seconds=1e-6)))
        assert info.value.code == "decode_budget" and "--max-decode-seconds" in info.value.message
        # the first image decoded, and then it stopped
        decoded = {"model": "decode-budget-unit"}
        assert REGISTRY.get_sample_value("fedmedclip_images_decoded_total", decoded) < len(blobs)
        images = asyncio.run(pool.decode(blobs, pre, Limits(max_request_pixels=3 * BIG * BIG)))
        assert images.shape == (3, S, S, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(images[1], pre.to_uint8(Image.open(io.BytesIO(blobs[1]))))
    finally:
        pool.shutdown()


# ------------------------------------------------------------------------------- malformed requests: 4xx

IMAGE = bytes(S * S * 3)


def _uint8_header(**extra) -> dict:
    spec = {"name": "images", "datatype": "UINT8", "shape": [1, S, S, 3]}
    spec.update(extra)
    return {"inputs": [spec]}


MALFORMED_BINARY = {
    # case: (header, tail, text the error names)
    "input_parameters_string": (_uint8_header(parameters="binary_data_size"), IMAGE, "'parameters' must be"),
    "request_parameters_list": (
        {**_uint8_header(parameters={"binary_data_size": len(IMAGE)}), "parameters": [1]},
        IMAGE,
        "'parameters' must be a JSON object",
    ),
    "request_parameters_string": (
        {**_uint8_header(parameters={"binary_data_size": len(IMAGE)}), "parameters": "x"},
        IMAGE,
        "'parameters' must be a JSON object",
    ),
    "binary_data_size_true": (
        _uint8_header(parameters={"binary_data_size": True}),
        IMAGE[:1],
        "binary_data_size",
    ),
    "binary_data_size_float": (
        _uint8_header(parameters={"binary_data_size": float(len(IMAGE))}),
        IMAGE,
        "binary_data_size must be a non-negative integer",
    ),
    "request_id_object": (
        {**_uint8_header(parameters={"binary_data_size": len(IMAGE)}), "id": {"a": 1}},
        IMAGE,
        '"id" must be a string',
    ),
    "output_parameters_list": (
        {
            **_uint8_header(parameters={"binary_data_size": len(IMAGE)}),
            "outputs": [{"name": "probabilities", "parameters": [1]}],
        },
        IMAGE,
        "'parameters' must be a JSON object",
    ),
    "output_binary_data_string": (
        {
            **_uint8_header(parameters={"binary_data_size": len(IMAGE)}),
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": "yes"}}],
        },
        IMAGE,
        "'binary_data' must be true or false",
    ),
    "request_binary_data_output_string": (
        {
            **_uint8_header(parameters={"binary_data_size": len(IMAGE)}),
            "parameters": {"binary_data_output": "false"},
        },
        IMAGE,
        "the request: parameter 'binary_data_output' must be true or false, got 'false'",
    ),
    "input_name_number": (
        {
            "inputs": [
                {"name": 5, "datatype": "UINT8", "shape": [1, S, S, 3], "parameters": {"binary_data_size": 1}}
            ]
        },
        b"\0",
        "'name' must be a string",
    ),
    "uint8_floats_in_header_data": (_uint8_header(data=[1.5] * (S * S * 3)), b"", "integers 0-255"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_BINARY))
def test_malformed_binary_request_parameters_are_client_errors(case, server, ort_session):
    header, tail, text = MALFORMED_BINARY[case]
    resp = post(server[0], *binary_request(header, tail))
    assert resp.status_code == 400, (case, resp.status_code, resp.text)
    assert text in resp.json()["error"], (case, resp.json())
    assert_serving(server[0], ort_session)


def test_a_binary_request_without_its_header_is_told_what_is_missing(server, ort_session):
    """Without Inference-Header-Content-Length the whole body is read as JSON: PNG bytes after it were "str
    is not valid UTF-8: surrogates not allowed", zero bytes "unexpected content after document", neither
    naming the header."""
    blob = png(np.full((8, 8, 3), 40, np.uint8))
    for body, problem in (
        (bytes_request([blob])[0], "is not UTF-8 text"),
        (
            binary_request(_uint8_header(parameters={"binary_data_size": len(IMAGE)}), IMAGE)[0],
            "unexpected content after document",
        ),
    ):
        resp = post(server[0], body, {"Content-Type": "application/octet-stream"})
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert problem in error and "surrogates" not in error, error
        assert "needs the Inference-Header-Content-Length header" in error, error
    # With the header, a JSON part that is not JSON is not told the header is missing.
    resp = post(server[0], b"\xff{}", {"Inference-Header-Content-Length": "3"})
    assert resp.json()["error"] == "the request is not valid JSON: byte 0 (0xff) is not UTF-8 text", resp.text
    # A digit that is not ASCII ('²', Latin-1 0xb2) was taken for one, then failed as a 500 with a traceback.
    resp = post(server[0], b"{}", {"Inference-Header-Content-Length": "\u00b2"})
    assert resp.status_code == 400 and "must be an integer" in resp.json()["error"], resp.text
    assert_serving(server[0], ort_session)


@pytest.mark.parametrize(
    ("value", "text"),
    [(1.5, "float values such as 1.5"), (7.0, "float values"), (True, "bool values"), ("7", "str values")],
)
def test_uint8_json_values_must_be_integers(value, text, server, ort_session):
    """JSON numbers of a UINT8 tensor are never rounded or converted: 1.5 would have become 1, "7" 7."""
    body = _uint8_header(data=[value] * (S * S * 3))
    resp = post(server[0], body)
    assert resp.status_code == 400, resp.text
    assert "integers 0-255" in resp.json()["error"] and text in resp.json()["error"]
    images = np.full((1, S, S, 3), 200, np.uint8)
    ok = post(server[0], _uint8_header(data=images.reshape(S, S * 3).tolist()))  # nested lists are fine
    assert ok.status_code == 200, ok.text
    np.testing.assert_allclose(probabilities(ok), ort_session.run(None, {"images": images})[0], atol=1e-5)


# --------------------------------------------------------------------------------- non-finite outputs


def test_nan_answer_is_an_error_never_a_null_probability(server, ort_session):
    http = server[0]
    trapped = np.full((2, S, S, 3), TRAP_PIXEL, np.uint8)
    trapped[0] = 90  # only image 1 makes this model answer NaN
    body = {
        "inputs": [
            {"name": "images", "datatype": "UINT8", "shape": [2, S, S, 3], "data": trapped.ravel().tolist()}
        ]
    }
    resp = post(http, body)
    assert resp.status_code == 500, resp.text
    assert "NaN or inf" in resp.json()["error"] and "[1]" in resp.json()["error"]
    assert "null" not in resp.text
    assert counter(http, "fedmedclip_request_errors_total") >= 1
    assert_serving(http, ort_session)


def test_model_with_non_finite_outputs_refuses_to_start(tmp_path):
    from serving.errors import ServingError
    from serving.runtime import OnnxClassifier

    path = make_contract_onnx(tmp_path / "nan.onnx", image_size=32, non_finite=True)
    classifier = OnnxClassifier(path, device="cpu")
    with pytest.raises(ServingError, match="not finite"):
        classifier.warm_up((1, 4))
    # The real command: exit status 2 with the reason, before it listens, no traceback.
    stderr = refused_to_serve(path, "--device", "cpu")
    assert "refusing to serve" in stderr and "not finite" in stderr


# ------------------------------------------------------------------------------ model files and sidecars


def test_model_file_is_verified_against_its_sidecar(tmp_path, capsys):
    from fedmedclip.digests import sha256_file, sha256_sidecar
    from serving.cli import main
    from serving.errors import ServingError
    from serving.runtime import OnnxClassifier
    from serving.source import resolve_model

    path = make_contract_onnx(tmp_path / "model.onnx", image_size=32)
    sidecar = sha256_sidecar(path)
    assert sidecar.read_text() == f"{sha256_file(path)}  model.onnx\n"
    resolved = resolve_model(str(path))
    assert resolved.sha256 == sha256_file(path)

    # The file changed after export: refused, naming both hashes.
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ServingError, match=r"refusing to serve .* recorded in model\.onnx\.sha256"):
        resolve_model(str(path))
    assert main(["serve", str(path), "--http-port", str(free_port())]) == 2
    assert "refusing to serve" in capsys.readouterr().err
    path.write_bytes(original)

    # No sidecar and no --expected-sha256: refused, saying how to fix it; --expected-sha256 alone suffices.
    sidecar.unlink()
    with pytest.raises(ServingError, match="no sha256 sidecar"):
        resolve_model(str(path))
    assert resolve_model(str(path), expected_sha256=sha256_file(path)).sha256 == sha256_file(path)
    # A sidecar of another file, or one that is not a hash.
    sidecar.write_text(f"{sha256_file(path)}  other.onnx\n")
    with pytest.raises(ServingError, match="not of 'model.onnx'"):
        resolve_model(str(path))
    sidecar.write_text("not a hash\n")
    with pytest.raises(ServingError, match="not a sha256 sidecar"):
        resolve_model(str(path))
    sidecar.unlink()
    sidecar.mkdir()  # something there that is no file: an error reading it, not "it has no sidecar"
    with pytest.raises(ServingError, match=r"cannot verify .*Is a directory"):
        resolve_model(str(path))
    sidecar.rmdir()

    # The session is built from the bytes that were hashed: a file swapped after the check is refused.
    with pytest.raises(ServingError, match="changed after its sha256 was verified"):
        OnnxClassifier(path, device="cpu", expected_sha256="0" * 64)


def test_every_limit_is_refused_with_its_unit_and_its_flag():
    """A limit's unit is declared with it (its flag's metavar): each refusal says how much, of what, and which
    server option sets it; a limit declared without a unit fails here, not at its first refusal in service."""
    from fedmedclip.flags import declared
    from serving.options import Limits

    limits = Limits()
    for d in declared(Limits):
        unit, flag = d.meta["metavar"], "--" + d.name.replace("_", "-")
        assert unit, f"{flag} declares no unit (metavar)"
        refusal = limits.exceeded("code", d.name, "this request is")
        want = f"this request is over the limit of {getattr(limits, d.name):,} {unit.lower()} (server option {flag})"
        assert refusal.message == want

"""The server attacked again as a hostile or careless network client, after the hardening of
tests/test_serving_hardening.py and tests/test_serving_protocol.py. Each test names what happened before:

- a thin strip of an image (a 952-byte 300000x1 PNG) was resized to the crop size on its short side before
  its centre crop: a 9,600,000x32 image, 1.7 GB in the decoding thread (the per-image pixel limit read only
  the file's header);
- a BYTES tensor sent as binary data (REST binary extension, gRPC raw_input_contents) was decoded element by
  element on the event loop, every element the data held whatever its shape said: 64 MB of tiny elements held
  every client, REST and gRPC, for 8 s and took 800 MB;
- a gRPC tensor's typed contents were copied into Python lists on the event loop before their count was
  checked against the shape: 64 M one-byte UINT8 values held every client for 7.5 s and took 1.5 GB;
- a JSON BYTES tensor of millions of tiny base64 strings was decoded and sent back from the parsing worker
  before its count was refused (4 s of the worker, half a second of the server's interpreter lock, 550 MB);
- an output requested twice was answered twice;
- a model unloaded (model control, with the token) while requests were inside it had their decoding cancelled
  and their batcher taken away: answers in text/plain ("Internal Server Error") or a 500, each with a
  traceback in the log;
- a client holding every file descriptor of the process made asyncio log each failed accept with its
  traceback, up to 2048 per try: 355,000 log lines in five seconds;
- and the other way round, `fedmedclip predict` took a server's probabilities as given: none for an image
  ended in a traceback, -3 or 1e300 were printed as percentages.

One server for the module (model control enabled, one decoding thread, a small per-image pixel limit); the
file descriptor test starts its own, the predict test a stand-in server.
"""

from __future__ import annotations

import io
import json
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import free_port, wait_for
from PIL import Image
from serving_fixtures import (
    REPO,
    base64_json,
    make_contract_onnx,
    metric,
    metric_samples,
    running_server,
    uint8_json,
    wait_ready,
)

MODEL = "fedmedclip"
S = 32
TOKEN = "h" * 40
MAX_IMAGE_PIXELS = 4_000_000
MAX_BATCH_IMAGES = 64


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory) -> Path:
    return make_contract_onnx(tmp_path_factory.mktemp("hostile") / "model.onnx", image_size=S)


@pytest.fixture(scope="module")
def server(onnx_path, tmp_path_factory):
    options = [
        "--decode-threads", "1", "--max-image-pixels", str(MAX_IMAGE_PIXELS),
        "--max-batch-images", str(MAX_BATCH_IMAGES), "--max-batch-delay-ms", "1",
    ]  # fmt: skip
    with running_server(
        [str(onnx_path)], tmp_path_factory.mktemp("hostile-server"), *options, token=TOKEN
    ) as s:
        yield s


def infer_url(server) -> str:
    return f"http://{server.http}/v2/models/{MODEL}/infer"


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, S, S, 3), dtype=np.uint8)


def binary_bytes(raw: bytes, shape: list[int]) -> tuple[bytes, dict]:
    """A REST binary-extension request carrying `raw` as the image_bytes tensor's data."""
    head = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": shape}]}
    head["inputs"][0]["parameters"] = {"binary_data_size": len(raw)}
    text = json.dumps(head).encode()
    return text + raw, {"Inference-Header-Content-Length": str(len(text))}


def grpc_infer(server, pb, request):
    import grpc

    with grpc.insecure_channel(server.grpc) as channel:
        stub = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb["ModelInferResponse"].FromString,
        )
        return stub(request, timeout=60)


def grpc_refusal(server, pb, request):
    import grpc

    with pytest.raises(grpc.RpcError) as info:
        grpc_infer(server, pb, request)
    return info.value


# --------------------------------------------------------------------------------------------- images


def test_a_thin_strip_image_is_refused_before_its_resize(server, spec):
    """A 20000x1 PNG (a hundred bytes) within --max-image-pixels became a 640000x32 image before its centre
    crop: 20 M pixels, five times the per-image limit, for one tiny file (300000x1: 1.7 GB). Now refused from
    its header with 400, naming the limit; a strip that stays within it is still classified."""
    strip = png(np.zeros((1, 20_000, 3), np.uint8))
    resp = requests.post(infer_url(server), json=base64_json([png(images(1)[0]), strip]), timeout=60)
    assert resp.status_code == 400, resp.text[:300]
    error = spec.check(resp)["error"]
    assert "image 1 is 20000x1" in error and "640000x32" in error and "--max-image-pixels" in error, error
    ok = png(np.zeros((1, 2_000, 3), np.uint8))  # 64000x32 = 2 M pixels: within the limit
    resp = requests.post(infer_url(server), json=base64_json([ok]), timeout=60)
    assert resp.status_code == 200, resp.text[:300]


def _with_empty_chunks(data: bytes, count: int) -> bytes:
    """PNG `data` with `count` empty private ancillary chunks after its header chunk (IHDR: 25 bytes)."""
    chunk = struct.pack(">I", 0) + b"abCd" + struct.pack(">I", zlib.crc32(b"abCd"))
    return data[:33] + chunk * count + data[33:]


def test_a_png_of_many_empty_chunks_is_refused_before_pillow_walks_them(server, spec):
    """300,000 empty chunks in a 3.6 MB PNG took 1.4 s of a decoding thread in the header pass, outside
    --max-decode-seconds (about 25 s of CPU for one 64 MB request). Now refused from a count of its chunks;
    a PNG with a few hundred (text, a profile) is still classified."""
    image = png(images(1)[0])
    resp = requests.post(
        infer_url(server), json=base64_json([_with_empty_chunks(image, 300_000)]), timeout=60
    )
    assert resp.status_code == 400, resp.text[:300]
    assert "image 0 (PNG) holds over 65,536 chunks, or over 1,024 besides" in spec.check(resp)["error"]
    resp = requests.post(infer_url(server), json=base64_json([_with_empty_chunks(image, 300)]), timeout=60)
    assert resp.status_code == 200, resp.text[:300]


# ----------------------------------------------------------------------- tensor data beyond the shape


def test_binary_bytes_elements_beyond_the_shape_are_never_read(server, spec):
    """A BYTES tensor of shape [1] whose binary data held 200,000 empty elements had every one decoded on
    the event loop before the shape was checked ("cannot reshape array of size 200000"). Now at most the
    shape's elements are read and the rest refused as what it is; a well-formed tensor is still served."""
    body, headers = binary_bytes(b"\0\0\0\0" * 200_000, [1])
    resp = requests.post(infer_url(server), data=body, headers=headers, timeout=60)
    assert resp.status_code == 400, resp.text[:300]
    assert "799,996 bytes of binary data follow its 1 elements" in spec.check(resp)["error"]

    body, headers = binary_bytes(struct.pack("<I", 10**9) + b"x", [1])  # a length past the end
    resp = requests.post(infer_url(server), data=body, headers=headers, timeout=60)
    assert resp.status_code == 400 and "runs past the end" in spec.check(resp)["error"], resp.text[:300]

    file = png(images(1)[0])
    body, headers = binary_bytes(struct.pack("<I", len(file)) + file, [1, 1])
    resp = requests.post(infer_url(server), data=body, headers=headers, timeout=60)
    assert resp.status_code == 200, resp.text[:300]


def test_grpc_bytes_raw_contents_beyond_the_shape_are_never_read(server, pb):
    """The same over gRPC raw_input_contents."""
    import grpc

    tensor = pb["ModelInferRequest"].InferInputTensor(name="image_bytes", datatype="BYTES", shape=[1])
    raw = b"\0\0\0\0" * 100_000
    request = pb["ModelInferRequest"](model_name=MODEL, inputs=[tensor], raw_input_contents=[raw])
    refused = grpc_refusal(server, pb, request)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
    assert "399,996 bytes of binary data follow its 1 elements" in refused.details(), refused.details()


def test_grpc_typed_contents_are_counted_before_they_are_read(server, pb):
    """uint_contents of 1,000,000 values for an image of 3,072 were copied into Python lists, on the event
    loop, before the shape was checked; so were 200,000 for a shape that said so. Now the count is checked
    against the shape, and the request's JSON element budget, before anything reads them."""
    import grpc

    tensor = pb["ModelInferRequest"].InferInputTensor
    contents = pb["InferTensorContents"]
    ones = np.ones(1_000_000, np.uint32)
    request = pb["ModelInferRequest"](
        model_name=MODEL,
        inputs=[
            tensor(name="images", datatype="UINT8", shape=[1, S, S, 3], contents=contents(uint_contents=ones))
        ],
    )
    refused = grpc_refusal(server, pb, request)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
    assert "its contents hold 1,000,000 values but shape [1, 32, 32, 3] needs 3,072" in refused.details()

    budget = MAX_BATCH_IMAGES * S * S * 3  # the largest legal request's elements
    over = np.ones(budget + 1, np.uint32)
    request = pb["ModelInferRequest"](
        model_name=MODEL,
        inputs=[
            tensor(name="images", datatype="UINT8", shape=[budget + 1], contents=contents(uint_contents=over))
        ],
    )
    refused = grpc_refusal(server, pb, request)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
    assert f"over the budget of {budget:,} tensor elements" in refused.details(), refused.details()

    good = images(1)
    request = pb["ModelInferRequest"](
        model_name=MODEL,
        inputs=[
            tensor(
                name="images",
                datatype="UINT8",
                shape=[1, S, S, 3],
                contents=contents(uint_contents=good.ravel()),
            )
        ],
    )
    assert grpc_infer(server, pb, request).model_name == MODEL


def test_a_json_bytes_tensor_is_counted_before_its_base64_is_decoded(server, spec):
    """100,000 base64 strings in one JSON BYTES tensor were each decoded, and the list sent back from the
    parsing worker, before the model refused 100,000 images. Now refused by the parser for its count."""
    body = {
        "inputs": [
            {"name": "image_bytes", "datatype": "BYTES", "shape": [100_000], "data": ["AAA="] * 100_000}
        ]
    }
    resp = requests.post(infer_url(server), json=body, timeout=60)
    assert resp.status_code == 400, resp.text[:300]
    error = spec.check(resp)["error"]
    assert "100,000 BYTES elements" in error and f"limit of {MAX_BATCH_IMAGES} images" in error, error


# ------------------------------------------------------------------------------------ requested outputs


def test_an_output_requested_twice_is_refused(server, spec, pb):
    """`outputs: [class_index, class_index]` was answered with the output twice (REST and gRPC)."""
    import grpc

    body = uint8_json(images(1), outputs=[{"name": "class_index"}, {"name": "class_index"}])
    resp = requests.post(infer_url(server), json=body, timeout=60)
    assert resp.status_code == 400, resp.text[:300]
    assert spec.check(resp)["error"] == "output 'class_index' is requested more than once"

    img = images(1)
    tensor = pb["ModelInferRequest"].InferInputTensor(name="images", datatype="UINT8", shape=list(img.shape))
    output = pb["ModelInferRequest"].InferRequestedOutputTensor(name="probabilities")
    request = pb["ModelInferRequest"](
        model_name=MODEL, inputs=[tensor], raw_input_contents=[img.tobytes()], outputs=[output, output]
    )
    refused = grpc_refusal(server, pb, request)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused

    body = uint8_json(images(1), outputs=[{"name": "class_index"}, {"name": "probabilities"}])
    resp = requests.post(infer_url(server), json=body, timeout=60)
    assert [o["name"] for o in spec.check(resp)["outputs"]] == ["class_index", "probabilities"]


# ---------------------------------------------------------------------------------- model control races


def test_unloading_a_model_lets_the_requests_inside_it_finish(server, spec):
    """A request decoding its images (one decoding thread: one image after another) when the model was
    unloaded had its decoding cancelled: text/plain "Internal Server Error" or a 500, a traceback in the log.
    Now the unload waits for the requests inside the model, new ones get 503 with the protocol's error, and
    a load serves again."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    control = f"http://{server.http}/v2/repository/models/{MODEL}"
    y, x = np.mgrid[0:2000, 0:2000]
    big = png(np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8))
    body = base64_json([big] * 12)

    def post_into(answers: list) -> None:
        answers.append(requests.post(infer_url(server), json=body, timeout=120))

    def decoded() -> float:  # the images the model has decoded so far
        return metric(metric_samples(server.http), "fedmedclip_images_decoded_total", model=MODEL)

    try:
        for _ in range(2):
            answers: list[requests.Response] = []
            before = decoded()
            inside = threading.Thread(target=post_into, args=(answers,))
            inside.start()
            wait_for(
                lambda before=before, answers=answers: decoded() > before or bool(answers),
                "the request's first image to be decoded",
            )
            assert requests.post(f"{control}/unload", headers=auth, timeout=120).status_code == 200
            inside.join()
            (resp,) = answers
            assert resp.headers["content-type"].startswith("application/json"), resp.text[:200]
            assert resp.status_code in (200, 503), resp.text[:300]
            spec.check(resp)
            late = requests.post(infer_url(server), json=body, timeout=120)
            assert late.status_code == 503 and "is not loaded" in spec.check(late)["error"]
            assert requests.post(f"{control}/load", headers=auth, timeout=120).status_code == 200
    finally:
        requests.post(f"{control}/load", headers=auth, timeout=120)
    assert requests.post(infer_url(server), json=base64_json([big]), timeout=120).status_code == 200
    log = server.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


# ------------------------------------------------------------------------------------ file descriptors


def test_running_out_of_file_descriptors_is_one_log_line(onnx_path, tmp_path):
    """A client opening more connections than the process has file descriptors made asyncio log every failed
    accept with its traceback, up to 2048 per try (355,000 lines in five seconds). Now one line at most
    every ten seconds; the server serves again once the idle connections are closed (--body-timeout)."""
    http = free_port()
    log_path = tmp_path / "server.log"
    cmd = [
        sys.executable, "-m", "serving", "serve", str(onnx_path), "--device", "cpu", "--http-port", str(http),
        "--no-grpc", "--drain-seconds", "0", "--body-timeout", "2",
    ]  # fmt: skip

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, preexec_fn=few_descriptors
        )
    connections: list[socket.socket] = []

    def exhaust() -> None:
        for _ in range(300):
            connections.append(socket.create_connection(("127.0.0.1", http), timeout=120))
        time.sleep(1.5)  # asyncio tries the accept again every second

    def close_all() -> None:
        while connections:
            connections.pop().close()

    try:
        wait_ready(proc, f"127.0.0.1:{http}", MODEL, log_path)
        started = time.monotonic()
        exhaust()
        wait_for(lambda: "accept" in log_path.read_text(), "the accept failure", timeout=300)
        close_all()
        resp = requests.get(f"http://127.0.0.1:{http}/v2/health/live", timeout=120)
        assert resp.status_code == 200
        exhaust()  # and stopped while they are held: asyncio's retries come after the port has closed
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        seconds = time.monotonic() - started
    finally:
        close_all()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    # One line per ten seconds at most, whichever way the machine's load stretches the steps above.
    assert 1 <= text.count("cannot accept new connections") <= 2 + int(seconds // 10), text[-3000:]


# ------------------------------------------------------------------------- predict against a server's numbers

NOT_PROBABILITIES = {
    # name: the `probabilities` output, what the refusal says
    # No class: a traceback (`max() arg is an empty sequence`), or with --json an empty "top".
    "no_class": ({"shape": [1, 0], "data": []}, "probabilities' shape [1, 0] gives each image 0 classes"),
    "negative_width": ({"shape": [1, -1], "data": []}, "gives each image -1 classes"),
    # Printed as they came: "-300.0%" and "400.0%", or a percentage of 300 digits.
    "below_0_above_1": ({"shape": [1, 2], "data": [-3, 4]}, "probability -3 is not within [0, 1]"),
    "huge": ({"shape": [1, 2], "data": [1e300, 0.5]}, "probability 1e+300 is not within [0, 1]"),
    # An integer beyond a float's range: float() raised OverflowError, a traceback.
    "beyond_float": ({"shape": [1, 2], "data": [10**400, 0.5]}, "probability 1000000000"),
    # Not numbers at all: float() read the text "0.5" and true as probabilities.
    "text": ({"shape": [1, 2], "data": ["0.5", 0.5]}, "probability '0.5' is not a finite number"),
    "boolean": ({"shape": [1, 2], "data": [True, False]}, "probability True is not a finite number"),
}


@pytest.mark.parametrize("case", sorted(NOT_PROBABILITIES))
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_predict_refuses_probabilities_a_model_cannot_give(case, as_json, tmp_path, capsys):
    """`fedmedclip predict` read a server's probabilities as given: none at all ended in a traceback (or an
    empty "top" with --json), -3 or 1e300 were printed as percentages. Now each is refused in one line naming
    the server and the images, exit 2; values within a float's rounding of [0, 1] are read as [0, 1]."""
    from conftest import error_lines, stand_in_http_server

    from serving.cli import main

    probabilities, text = NOT_PROBABILITIES[case]
    answer = json.dumps({"outputs": [{"name": "probabilities", **probabilities}]}).encode()
    image = tmp_path / "scan.png"
    image.write_bytes(png(images(1)[0]))
    as_json_flag = ["--json"] if as_json else []
    with stand_in_http_server(lambda method, path, headers: (200, answer, "application/json")) as url:
        status = main(["predict", "--url", url, "--model", "m", *as_json_flag, str(image)])
    out, err = capsys.readouterr()
    assert status == 2 and out == "", (status, out, err)
    (line,) = error_lines(err)
    assert line.startswith(
        f"error: {url} answered HTTP 200 for ['{image}'] without a v2 inference response with `probabilities`"
    ), line
    assert text in line and "Traceback" not in err, err

    # A float's rounding either side of 0 and 1 (a softmax in float32 or float16) is still an answer.
    rounded = {"shape": [1, 2], "data": [1 + 1e-7, -1e-7]}
    answer = json.dumps({"outputs": [{"name": "probabilities", **rounded}]}).encode()
    with stand_in_http_server(lambda method, path, headers: (200, answer, "application/json")) as url:
        assert main(["predict", "--url", url, "--model", "m", "--json", str(image)]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert [t["probability"] for t in top] == [1.0, 0.0], top

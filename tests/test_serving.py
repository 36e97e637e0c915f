"""The inference server against a real KServe ModelServer on loopback (REST + gRPC), nothing mocked.

One server process for the module (started with `python -m serving serve`, the same handler as
`fedmedclip serve`) on a contract ONNX model from tests/serving_fixtures.py; answers are compared with an
in-process ONNX Runtime session on the same file.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import error_lines, free_port
from PIL import Image
from serving_fixtures import (
    CLASS_NAMES,
    base64_json,
    contract_preprocessing,
    make_contract_onnx,
    metric,
    metric_samples,
    refused_to_serve,
    running_server,
    uint8_json,
)

REPO = Path(__file__).resolve().parents[1]
MODEL = "fedmedclip"
S = 64  # image size of the fixture model
MAX_BATCH_IMAGES = 8
MAX_IMAGE_PIXELS = 1_000_000
MAX_REQUEST_BYTES = 2_000_000
TOL = 1e-5


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory) -> Path:
    return make_contract_onnx(tmp_path_factory.mktemp("serving") / "model.onnx", image_size=S)


@pytest.fixture(scope="module")
def ort_session(onnx_path):
    import onnxruntime as ort

    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def server(onnx_path, tmp_path_factory):
    """(http, grpc) host:port of a running server; stopped with SIGTERM after the module."""
    options = [
        "--name", MODEL, "--max-batch-size", "16", "--max-batch-delay-ms", "25",
        "--max-batch-images", str(MAX_BATCH_IMAGES), "--max-image-pixels", str(MAX_IMAGE_PIXELS),
        "--max-request-bytes", str(MAX_REQUEST_BYTES),
    ]  # fmt: skip
    with running_server([str(onnx_path)], tmp_path_factory.mktemp("serving-log"), *options) as s:
        yield s.http, s.grpc


@pytest.fixture(scope="module")
def http_client(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server[0])
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server[1])
    yield client
    client.close()


# ----------------------------------------------------------------------------------------------- helpers


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def random_images(n: int, seed: int, size: int = S) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A photo-like image (smooth gradients + noise) so JPEG and the resize do real work."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * rng.uniform(100, 255, 3)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def reference(session, images: np.ndarray) -> tuple[np.ndarray, ...]:
    """(probabilities, class_index, ood_score) from ONNX Runtime directly."""
    probs, index, score, _ = session.run(None, {"images": images})
    return probs, index, score


def ood_threshold(session) -> float:
    return float(session.get_modelmeta().custom_metadata_map["fedmedclip.ood.threshold"])


def reference_from_files(session, blobs: list[bytes]) -> tuple[np.ndarray, ...]:
    """What the server must compute: the training geometry on the decoded file, then the graph."""
    pre = contract_preprocessing(S)
    return reference(session, np.stack([pre.to_uint8(Image.open(io.BytesIO(b))) for b in blobs]))


def infer(client, protocol: str, name: str, array: np.ndarray, datatype: str, **kw):
    if protocol == "http":
        import tritonclient.http as tc
    else:
        import tritonclient.grpc as tc
    inp = tc.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return client.infer(MODEL, [inp], **kw)


def bytes_tensor(blobs: list[bytes]) -> np.ndarray:
    return np.array(blobs, dtype=np.object_)


def check_answer(
    result, probs_ref: np.ndarray, index_ref: np.ndarray, score_ref: np.ndarray, threshold: float
) -> None:
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == probs_ref.shape
    np.testing.assert_allclose(probs, probs_ref, atol=TOL, rtol=0)
    index = result.as_numpy("class_index")
    assert index.dtype == np.int64
    np.testing.assert_array_equal(index, index_ref)
    names = [n.decode() if isinstance(n, bytes) else n for n in result.as_numpy("class_name")]
    assert names == [CLASS_NAMES[i] for i in index_ref]
    score = result.as_numpy("ood_score")
    assert score.dtype == np.float32
    np.testing.assert_allclose(score, score_ref, rtol=1e-5, atol=1e-6)
    flags = result.as_numpy("out_of_distribution")
    assert flags.dtype == np.bool_
    np.testing.assert_array_equal(flags, score_ref > threshold)


def assert_still_serving(http_client, ort_session) -> None:
    images = random_images(1, seed=99)
    check_answer(
        infer(http_client, "http", "images", images, "UINT8"),
        *reference(ort_session, images),
        ood_threshold(ort_session),
    )


# ----------------------------------------------------------------------------------- health and metadata


def test_health_endpoints(server):
    http = server[0]
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        assert requests.get(f"http://{http}{path}", timeout=60).status_code == 200, path
    assert requests.get(f"http://{http}/v2/models/nope/ready", timeout=60).status_code == 404


def test_model_metadata_rest_and_grpc(server, grpc_client, onnx_path, ort_session):
    from fedmedclip.digests import sha256_file

    expected_inputs = {"images": ("UINT8", [-1, S, S, 3]), "image_bytes": ("BYTES", [-1])}
    expected_outputs = {
        "probabilities": ("FP32", [-1, len(CLASS_NAMES)]),
        "class_index": ("INT64", [-1]),
        "class_name": ("BYTES", [-1]),
        "ood_score": ("FP32", [-1]),
        "out_of_distribution": ("BOOL", [-1]),
    }
    meta = requests.get(f"http://{server[0]}/v2/models/{MODEL}", timeout=60).json()
    assert meta["name"] == MODEL
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == expected_inputs
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]} == expected_outputs
    # The protocol's platform name; the one version is the file's sha256 prefix (no registry here).
    version = sha256_file(onnx_path)[:12]
    assert meta["platform"] == "onnx_onnxv1" and meta["versions"] == [version]
    # Every metadata_props entry of the ONNX file, under one prefix, as the file has it.
    props = meta["properties"]
    for key, value in ort_session.get_modelmeta().custom_metadata_map.items():
        shown = props[f"onnx.metadata.{key}"]
        assert shown == value or (
            (len(value) > 4096 or key == "fedmedclip.drift.reference") and shown.startswith("sha256:")
        ), key
    # The drift reference (one embedding per held-out image of the exporting party, which no DP covers) by its
    # hash whatever its size: the fixture's 64 x 8 embeddings fit in 4,096 characters and were shown in full.
    reference = ort_session.get_modelmeta().custom_metadata_map["fedmedclip.drift.reference"]
    assert len(reference) < 4096
    assert props["onnx.metadata.fedmedclip.drift.reference"].startswith("sha256:")
    assert props["served.sha256"] == sha256_file(onnx_path) and props["served.version"] == version
    # The file by its name: its absolute path told every client the server's folders.
    assert props["served.origin"] == onnx_path.name

    gmeta = grpc_client.get_model_metadata(MODEL, as_json=True)
    assert {
        t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in gmeta["inputs"]
    } == expected_inputs
    assert {
        t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in gmeta["outputs"]
    } == expected_outputs


# ------------------------------------------------------------------------------------- correct answers


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_uint8_matches_onnxruntime(protocol, http_client, grpc_client, ort_session):
    client = http_client if protocol == "http" else grpc_client
    images = random_images(5, seed=1)
    result = infer(client, protocol, "images", images, "UINT8")
    check_answer(result, *reference(ort_session, images), ood_threshold(ort_session))
    # The response names every column of `probabilities`.
    params = result.get_response()["parameters"] if protocol == "http" else None
    if params is not None:
        assert json.loads(params["class_names"]) == list(CLASS_NAMES)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_encoded_files_match_onnxruntime(protocol, fmt, http_client, grpc_client, ort_session):
    client = http_client if protocol == "http" else grpc_client
    # Non-square, larger and smaller than S, and greyscale: the server must resize/crop/convert like training.
    arrays = [smooth_image(120, 90, 1), smooth_image(50, 77, 2), smooth_image(S, S, 3)]
    blobs = [encode(a, fmt) for a in arrays]
    grey = Image.fromarray(smooth_image(70, 70, 4)).convert("L")
    buf = io.BytesIO()
    grey.save(buf, fmt)
    blobs.append(buf.getvalue())
    result = infer(client, protocol, "image_bytes", bytes_tensor(blobs), "BYTES")
    check_answer(result, *reference_from_files(ort_session, blobs), ood_threshold(ort_session))


def test_request_without_id_and_with_id(server, ort_session):
    """kserve 0.21 answers 500 to an id-less v2 request unless the model fills the id: plain JSON, no id."""
    http = server[0]
    images = random_images(2, seed=5)
    body = uint8_json(images)
    resp = requests.post(f"http://{http}/v2/models/{MODEL}/infer", json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["id"]
    out = {o["name"]: o for o in answer["outputs"]}
    probs = np.array(out["probabilities"]["data"], dtype=np.float32).reshape(out["probabilities"]["shape"])
    np.testing.assert_allclose(probs, reference(ort_session, images)[0], atol=TOL, rtol=0)

    body["id"] = "my-request-7"
    assert (
        requests.post(f"http://{http}/v2/models/{MODEL}/infer", json=body, timeout=10).json()["id"]
        == "my-request-7"
    )


def test_base64_json_bytes(server, ort_session):
    """JSON cannot carry raw bytes: a BYTES element sent as a JSON string is base64 of the file."""
    blob = encode(smooth_image(80, 100, 6), "PNG")
    resp = requests.post(f"http://{server[0]}/v2/models/{MODEL}/infer", json=base64_json([blob]), timeout=10)
    assert resp.status_code == 200, resp.text
    out = {o["name"]: o for o in resp.json()["outputs"]}
    np.testing.assert_allclose(
        np.array(out["probabilities"]["data"]),
        reference_from_files(ort_session, [blob])[0].ravel(),
        atol=TOL,
        rtol=0,
    )


def test_predict_cli(server, tmp_path, capsys, ort_session):
    from serving.cli import main

    paths = []
    for i, fmt in enumerate(("JPEG", "PNG")):
        p = tmp_path / f"scan{i}.{fmt.lower()}"
        p.write_bytes(encode(smooth_image(90, 110, 10 + i), fmt))
        paths.append(p)
    # Uniform noise: what this test model's OOD score was fitted on, so in distribution for it.
    noise = np.random.default_rng(7).integers(0, 256, (S, S, 3), dtype=np.uint8)
    paths.append(tmp_path / "noise.png")
    paths[-1].write_bytes(encode(noise, "PNG"))
    assert main(["predict", "--url", f"http://{server[0]}", "--top", "2", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    probs, index, scores = reference_from_files(ort_session, [p.read_bytes() for p in paths])
    threshold = ood_threshold(ort_session)
    flagged = scores > threshold
    assert flagged.any() and not flagged.all()  # both kinds of line below
    for p, row, i, out_of in zip(paths, probs, index, flagged, strict=True):
        line = next(x for x in out.splitlines() if x.startswith(f"{p}: "))
        assert line.startswith(f"{p}: {CLASS_NAMES[i]} ({row[i]:.1%})"), line
        assert ("OUT OF DISTRIBUTION" in line) == out_of, line
    assert main(["predict", "--url", f"http://{server[0]}", "--json", *map(str, paths)]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed[0]["top"][0]["class"] == CLASS_NAMES[index[0]] and len(parsed[0]["top"]) == 3
    assert [r["out_of_distribution"] for r in parsed] == flagged.tolist()
    np.testing.assert_allclose([r["ood_score"] for r in parsed], scores, rtol=1e-4)
    assert {r["ood_threshold"] for r in parsed} == {threshold}

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    assert main(["predict", "--url", f"http://{server[0]}", str(bad)]) == 2
    assert "HTTP 400" in capsys.readouterr().err


@contextlib.contextmanager
def _other_server(answer, tmp_path):
    """(URL, image) of a plain HTTP server on loopback (not a fedmedclip server) whose answer to each request is
    `answer(method, path)` -> (status, body), and a PNG to send it."""
    from conftest import stand_in_http_server

    image = tmp_path / "scan.png"
    image.write_bytes(encode(smooth_image(40, 40, 1), "PNG"))
    with stand_in_http_server(lambda method, path, _headers: (*answer(method, path), None)) as url:
        yield url, image


@pytest.mark.parametrize(
    "body",
    [
        b"<html>busy</html>",
        b'{"outputs": 3}',
        b'{"outputs": [{"name": "probabilities", "shape": [1]}]}',
        # A probability that is no number (Python's JSON reads NaN): it was printed as "nan".
        b'{"outputs": [{"name": "probabilities", "shape": [1, 2], "data": [NaN, 0.5]}]}',
        # An OOD screen that says nothing: a score that is no number, a decision that is no boolean.
        b'{"outputs": [{"name": "probabilities", "shape": [1, 2], "data": [0.5, 0.5]}, '
        b'{"name": "ood_score", "data": [NaN]}]}',
        b'{"outputs": [{"name": "probabilities", "shape": [1, 2], "data": [0.5, 0.5]}, '
        b'{"name": "ood_score", "data": [1.0]}, {"name": "out_of_distribution", "data": ["false"]}]}',
    ],
)
def test_predict_cli_says_in_one_line_that_a_server_answered_no_inference_response(body, tmp_path, capsys):
    """Whatever answers at --url (a proxy's page, another service) is read as a hostile party's bytes: a
    one-line error naming the server and the images, exit 2, no traceback."""
    from serving.cli import main

    with _other_server(lambda method, path: (200, body), tmp_path) as (url, image):
        assert main(["predict", "--url", url, "--model", "m", str(image)]) == 2
    err = capsys.readouterr().err
    assert f"{url} answered HTTP 200 for ['{image}'] without a v2 inference response" in err, err
    assert len(err.strip().splitlines()) == 1


def test_predict_cli_reads_a_refusal_or_a_model_list_that_is_not_an_object(tmp_path, capsys):
    """An error answer whose JSON is an array, or a model list that is not a list: one line, exit 2."""
    from serving.cli import main

    def answer(method: str, path: str) -> tuple[int, bytes]:
        return (200, b'{"models": 5}') if method == "GET" else (500, b"[1, 2]")

    with _other_server(answer, tmp_path) as (url, image):
        assert main(["predict", "--url", url, "--model", "m", str(image)]) == 2
        assert f"{url} answered HTTP 500 for ['{image}']: [1, 2]" in capsys.readouterr().err
        assert main(["predict", "--url", url, str(image)]) == 2
        assert f"{url} serves 5: pass --model NAME" in capsys.readouterr().err


def test_predict_cli_never_sends_a_servers_control_characters_to_the_terminal(tmp_path, capsys):
    """Class names and refusals are the server's words, and predict printed them as they came: ESC sequences
    (clearing the screen, colouring or rewriting earlier lines) and CR reached the operator's terminal.
    Now written as escapes; --json escapes them as JSON does."""
    from serving.cli import main

    forged = "\x1b[2J\x1b[31mglioma\rnotumor"
    answer = {
        "outputs": [{"name": "probabilities", "shape": [1, 2], "data": [0.9, 0.1]}],
        "parameters": {"class_names": json.dumps([forged, "b"])},
    }

    refuse = []

    def reply(method: str, path: str) -> tuple[int, bytes]:
        return (400, json.dumps({"error": forged}).encode()) if refuse else (200, json.dumps(answer).encode())

    with _other_server(reply, tmp_path) as (url, image):
        assert main(["predict", "--url", url, "--model", "m", str(image)]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\r" not in out and "\\x1b[2J\\x1b[31mglioma\\rnotumor (90.0%)" in out, (
            out
        )
        assert main(["predict", "--url", url, "--model", "m", "--json", str(image)]) == 0
        assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] == forged
        refuse.append(True)
        assert main(["predict", "--url", url, "--model", "m", str(image)]) == 2
        err = capsys.readouterr().err
        assert "\x1b" not in err and "\r" not in err and "HTTP 400" in err, err


def test_predict_cli_refuses_a_model_name_that_would_build_another_url(tmp_path, capsys):
    """--model went into the URL as given: 'a/b', 'm?x', 'm#x', '..' or 'a b' asked another path (a model of
    another name, or none) or sent a query. A model name is what `serve` accepts as one; anything else is
    refused in one line before any request, and so is such a name in the server's own model list."""
    from serving.cli import main

    asked = []

    def answer(method: str, path: str) -> tuple[int, bytes]:
        asked.append((method, path))
        return (200, b'{"models": ["a b/c"]}') if method == "GET" else (404, b'{"error": "no such model"}')

    rule = "a model name is 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit"
    with _other_server(answer, tmp_path) as (url, image):
        for name in ("a/b", "m?x=1", "m#x", "..", "a b", "", "x" * 64):
            assert main(["predict", "--url", url, "--model", name, str(image)]) == 2
            assert error_lines(capsys.readouterr().err) == [f"error: --model {name!r}: {rule}"], name
        assert asked == []
        assert main(["predict", "--url", url, str(image)]) == 2
        assert error_lines(capsys.readouterr().err) == [f"error: {url} serves a model named 'a b/c': {rule}"]
        assert asked == [("GET", "/v2/models")]


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_predict_cli_refuses_a_timeout_that_is_not_a_positive_number(timeout, tmp_path, capsys):
    """requests raised a ValueError or OverflowError traceback for each of these, after reading the images."""
    from serving.cli import main

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["predict", "--url", url, "--model", "m", "--timeout", timeout, str(image)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --timeout must be a positive number of seconds, got {float(timeout)}\n", err


def test_predict_cli_refuses_a_url_that_is_not_http(tmp_path, capsys):
    """ftp://HOST was sent as http://ftp://HOST: an error about resolving a host named 'ftp'."""
    from serving.cli import main

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    url = f"ftp://127.0.0.1:{free_port()}"
    assert main(["predict", "--url", url, "--model", "m", str(image)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --url {url}: the server speaks HTTP; give http://HOST:PORT or https://...\n", err


def test_predict_cli_says_in_a_few_words_that_no_server_answers(tmp_path, capsys):
    """Nothing listening on the port: the line was urllib3's 200 characters ("HTTPConnectionPool(host=...):
    Max retries exceeded with url: ... (Caused by NewConnectionError(...))")."""
    from serving.cli import main

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["predict", "--url", url, "--model", "m", str(image)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"error: cannot reach the server at {url} (Connection refused): is `fedmedclip serve` running?\n"
    )


def test_predict_cli_says_a_folder_is_a_folder(tmp_path, capsys):
    """A folder given as an image was 'image file(s) not found', although it is there."""
    from serving.cli import main

    url = f"http://127.0.0.1:{free_port()}"
    assert main(["predict", "--url", url, "--model", "m", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err == f"error: {tmp_path}: a folder; give image files (e.g. {tmp_path}/*.jpg)\n"
    )
    assert main(["predict", "--url", url, "--model", "m", str(tmp_path / "none.png")]) == 2
    assert capsys.readouterr().err == f"error: image file(s) not found: {tmp_path / 'none.png'}\n"


# ------------------------------------------------------------------------------------------- bad input


def _png_bomb() -> bytes:
    """A 5000x5000 PNG of a few KB: 25 M pixels, over the server's 1 M limit."""
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, "PNG")
    return buf.getvalue()


def _bad_cases() -> dict[str, tuple[str, np.ndarray, str, str]]:
    """case -> (input name, array, datatype, text the error must contain)."""
    jpeg = encode(smooth_image(100, 100, 7), "JPEG")
    png = encode(smooth_image(100, 100, 8), "PNG")
    ok = random_images(1, seed=0)
    return {
        "truncated_jpeg": ("image_bytes", bytes_tensor([jpeg[: len(jpeg) // 2]]), "BYTES", "truncated"),
        "truncated_png": ("image_bytes", bytes_tensor([png[: len(png) // 2]]), "BYTES", "truncated"),
        "corrupt_jpeg_header": ("image_bytes", bytes_tensor([jpeg[:30]]), "BYTES", "corrupt"),
        "not_an_image": (
            "image_bytes",
            bytes_tensor([b"%PDF-1.4 not an image"]),
            "BYTES",
            "not a JPEG or PNG",
        ),
        "second_image_bad": ("image_bytes", bytes_tensor([jpeg, b"garbage"]), "BYTES", "image 1"),
        "decompression_bomb": (
            "image_bytes",
            bytes_tensor([_png_bomb()]),
            "BYTES",
            # PIL's own words named its limit, twice ours: "exceeds limit of 2000000 pixels"
            "image 0 is 25,000,000 pixels, over the limit of 1,000,000 pixels (server option --max-image-pixels)",
        ),
        "wrong_dtype": ("images", ok.astype(np.float32), "FP32", "must have datatype UINT8"),
        "wrong_shape": ("images", random_images(1, 0, size=32), "UINT8", f"must have shape [N,{S},{S},3]"),
        "wrong_channels": ("images", ok[..., :1].copy(), "UINT8", f"must have shape [N,{S},{S},3]"),
        "bytes_as_int": ("image_bytes", np.zeros(2, dtype=np.int32), "INT32", "must have datatype BYTES"),
        "empty_batch_uint8": ("images", np.zeros((0, S, S, 3), np.uint8), "UINT8", "no images"),
        "empty_batch_bytes": ("image_bytes", np.array([], dtype=np.object_), "BYTES", "no images"),
        "too_many_images": (
            "images",
            random_images(MAX_BATCH_IMAGES + 1, 0),
            "UINT8",
            f"limit of {MAX_BATCH_IMAGES}",
        ),
        "unknown_input": ("pixels", ok, "UINT8", "unknown input 'pixels'"),
    }


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_a_client_error(case, protocol, http_client, grpc_client, ort_session):
    from tritonclient.utils import InferenceServerException

    name, array, datatype, text = BAD_CASES[case]
    client = http_client if protocol == "http" else grpc_client
    with pytest.raises(InferenceServerException) as info:
        infer(client, protocol, name, array, datatype)
    err = info.value
    if protocol == "http":
        assert err.status() == "400", (case, err.status(), err.message())
    else:
        assert err.status() == "StatusCode.INVALID_ARGUMENT", (case, err.status(), err.message())
    assert text in err.message(), (case, err.message())
    assert_still_serving(http_client, ort_session)


@pytest.mark.parametrize(
    ("kind", "args", "fields"),
    [
        ("RequestRejected", ("bad_shape", "shape is wrong", 400), ("bad_shape", "shape is wrong", 400)),
        ("NotServed", ("model 'x' is not served",), ("unknown_model", "model 'x' is not served", 404)),
        ("NotReady", ("model 'x' was unloaded",), ("not_ready", "model 'x' was unloaded", 503)),
        ("ServerBusy", ("over --max-inflight-bytes",), ("server_busy", "over --max-inflight-bytes", 503)),
    ],
)
def test_a_rejection_survives_pickling_with_its_fields(kind, args, fields):
    """Raised in a JSON worker process, a rejection reaches the server pickled: NotServed, NotReady and
    ServerBusy were rebuilt with the base's three arguments, which their __init__ refused (TypeError)."""
    import pickle

    from serving import errors

    got = pickle.loads(pickle.dumps(getattr(errors, kind)(*args)))
    assert type(got) is getattr(errors, kind)
    assert (got.code, got.message, got.status) == fields and str(got) == got.message


def test_oversized_request_is_refused(server, http_client, ort_session):
    """Over --max-request-bytes: 413 from the Content-Length, before the body is read (REST);
    RESOURCE_EXHAUSTED from gRPC's message limit."""
    from tritonclient.utils import InferenceServerException

    big = [os.urandom(MAX_REQUEST_BYTES // 2) for _ in range(3)]
    body = b"".join(struct.pack("<I", len(b)) + b for b in big)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "image_bytes",
                    "datatype": "BYTES",
                    "shape": [3],
                    "parameters": {"binary_data_size": len(body)},
                }
            ]
        }
    ).encode()
    resp = requests.post(
        f"http://{server[0]}/v2/models/{MODEL}/infer",
        data=head + body,
        headers={"Inference-Header-Content-Length": str(len(head))},
        timeout=30,
    )
    assert resp.status_code == 413 and "--max-request-bytes" in resp.json()["error"]
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server[1])
    with pytest.raises(InferenceServerException) as info:
        infer(client, "grpc", "image_bytes", bytes_tensor(big * 2), "BYTES")
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    # Over the limit by less than gRPC's 1 MiB allowance for framing: the server's own check, the same code
    # (it was INVALID_ARGUMENT, where the docs say RESOURCE_EXHAUSTED).
    just_over = [os.urandom(MAX_REQUEST_BYTES // 2 + 1000) for _ in range(2)]
    with pytest.raises(InferenceServerException) as info:
        infer(client, "grpc", "image_bytes", bytes_tensor(just_over), "BYTES")
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED", info.value.message()
    assert "--max-request-bytes" in info.value.message()
    client.close()
    assert_still_serving(http_client, ort_session)


def test_malformed_binary_request(server, http_client, ort_session):
    http = server[0]
    url = f"http://{http}/v2/models/{MODEL}/infer"
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [1, S, S, 3],
                    "parameters": {"binary_data_size": S * S * 3},
                }
            ]
        }
    ).encode()
    short = requests.post(
        url, data=head + b"\0" * 10, headers={"Inference-Header-Content-Length": str(len(head))}, timeout=10
    )
    assert short.status_code == 400 and "runs past the end" in short.json()["error"]
    bad_json = requests.post(
        url, data=b"{nope" + b"\0" * 10, headers={"Inference-Header-Content-Length": "5"}, timeout=10
    )
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]
    v1 = requests.post(f"http://{http}/v1/models/{MODEL}:predict", json={"instances": [[1, 2]]}, timeout=10)
    assert v1.status_code == 404 and "v2 Open Inference Protocol" in v1.json()["error"]
    assert_still_serving(http_client, ort_session)


# --------------------------------------------------------------------------------- batching and metrics


def test_concurrent_single_image_requests_are_batched(server, ort_session):
    """32 clients at once, one image each (half REST, half gRPC): every answer right, and fewer ONNX Runtime
    runs than requests (read from the server's batch-size histogram)."""
    import tritonclient.grpc as grpcclient

    from serving.cli import encode_bytes_request

    http, grpc_url = server
    n = 32
    arrays = [smooth_image(70 + i, 90, 100 + i) for i in range(n)]
    blobs = [encode(a, "PNG") for a in arrays]
    probs_ref, index_ref, _ = reference_from_files(ort_session, blobs)
    before = metric_samples(http)
    barrier = threading.Barrier(n)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            if i % 2:
                client = grpcclient.InferenceServerClient(grpc_url)
                inp = grpcclient.InferInput("image_bytes", [1], "BYTES")
                inp.set_data_from_numpy(bytes_tensor([blobs[i]]))
                barrier.wait()
                results[i] = client.infer(MODEL, [inp]).as_numpy("probabilities")[0]
                client.close()
            else:
                body, json_length = encode_bytes_request([blobs[i]])
                barrier.wait()
                resp = requests.post(
                    f"http://{http}/v2/models/{MODEL}/infer",
                    data=body,
                    headers={"Inference-Header-Content-Length": str(json_length)},
                    timeout=30,
                )
                resp.raise_for_status()
                results[i] = np.array(resp.json()["outputs"][0]["data"], dtype=np.float32)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(results) == list(range(n))
    for i in range(n):
        np.testing.assert_allclose(results[i], probs_ref[i], atol=TOL, rtol=0)

    after = metric_samples(http)
    runs = metric(after, "fedmedclip_batch_size_count", model=MODEL) - metric(
        before, "fedmedclip_batch_size_count", model=MODEL
    )
    images = metric(after, "fedmedclip_batch_size_sum", model=MODEL) - metric(
        before, "fedmedclip_batch_size_sum", model=MODEL
    )
    assert images == n
    # Fewer runs than requests: how many fewer depends on how close together a loaded machine lets the 32
    # clients' requests arrive within the 25 ms batching window.
    assert runs < n, f"{n} concurrent requests took {runs} ONNX Runtime runs: not batched"
    print(f"{n} concurrent requests -> {runs:.0f} ONNX Runtime runs")


def test_metrics_exposed(server, http_client, ort_session):
    from tritonclient.utils import InferenceServerException

    http = server[0]
    with pytest.raises(InferenceServerException):
        infer(http_client, "http", "image_bytes", bytes_tensor([b"junk"]), "BYTES")
    assert_still_serving(http_client, ort_session)
    samples = metric_samples(http)
    assert metric(samples, "fedmedclip_requests_total", model=MODEL, protocol="rest", input="uint8") >= 1
    assert metric(samples, "fedmedclip_request_errors_total", model=MODEL, reason="not_an_image") >= 1
    assert metric(samples, "fedmedclip_request_latency_seconds_count", model=MODEL) >= 2
    assert metric(samples, "fedmedclip_ort_run_seconds_count", model=MODEL) >= 1
    assert metric(samples, "fedmedclip_images_total", model=MODEL) >= 1
    assert metric(samples, "request_predict_seconds_count", model_name=MODEL) >= 1  # kserve's own


# ------------------------------------------------------------------------------- start-up refusals, units


def test_device_cuda_refuses_to_start_without_cuda(onnx_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    stderr = refused_to_serve(onnx_path, "--device", "cuda")
    assert "--device cuda" in stderr and "CUDAExecutionProvider" in stderr


def test_sha256_check(onnx_path, tmp_path, capsys):
    from serving.cli import main
    from serving.errors import ServingError
    from serving.source import resolve_model, sha256_file

    digest = sha256_file(onnx_path)
    resolved = resolve_model(str(onnx_path), expected_sha256=digest.upper())
    assert resolved.sha256 == digest
    with pytest.raises(ServingError, match="sha256 is .* but --expected-sha256 is 0{64}"):
        resolve_model(str(onnx_path), expected_sha256="0" * 64)
    with pytest.raises(ServingError, match="64 hex digits"):
        resolve_model(str(onnx_path), expected_sha256="abc")
    # A folder with one .onnx (KServe's /mnt/models) resolves to the file.
    assert resolve_model(str(onnx_path.parent)).path == onnx_path
    # Through the CLI: refused with exit status 2 before anything is served, and the calling process's logging
    # is left as it was (no handler of the server's own on the "fedmedclip" logger).
    ours = logging.getLogger("fedmedclip")
    before = (list(ours.handlers), ours.propagate, ours.level)
    assert main(["serve", str(onnx_path), "--expected-sha256", "f" * 64]) == 2
    assert "refusing to serve" in capsys.readouterr().err
    assert (list(ours.handlers), ours.propagate, ours.level) == before
    assert main(["serve", str(tmp_path / "missing.onnx")]) == 2
    assert "not found" in capsys.readouterr().err


def test_port_in_use_refused(onnx_path, capsys):
    import socket

    from serving.cli import main

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(onnx_path), "--http-port", str(port), "--grpc-port", str(free_port())]) == 2
    assert f"--http-port {port} is already in use" in capsys.readouterr().err


def test_model_control_token_file_is_read_and_checked_wherever_the_options_are_made(
    onnx_path, tmp_path, capsys
):
    """The declared option means the same from the command line and in code: its file's token enables model
    control, a short or unreadable one is refused naming the flag before a model is loaded, and the token is
    never in the options' repr."""
    from fedmedclip.errors import ConfigError
    from serving.cli import main
    from serving.options import ServerOptions

    token = tmp_path / "token"
    token.write_text("t" * 40 + "\n")
    options = ServerOptions(model_control_token_file=str(token))
    assert options.control_token == "t" * 40 and "t" * 40 not in repr(options)
    assert ServerOptions().control_token is None
    token.write_text("short")
    with pytest.raises(ConfigError, match="at least 32 characters"):
        ServerOptions(model_control_token_file=str(token))
    assert main(["serve", str(onnx_path), "--model-control-token-file", str(tmp_path / "none")]) == 2
    assert "--model-control-token-file: cannot read" in capsys.readouterr().err


def test_contract_violations_refused(tmp_path):
    import onnx

    from serving.errors import ServingError
    from serving.runtime import OnnxClassifier

    path = make_contract_onnx(tmp_path / "m.onnx", image_size=32)
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "fedmedclip.format_version":
            prop.value = "9"
    onnx.save(model, str(tmp_path / "v9.onnx"))
    with pytest.raises(ServingError, match="format_version='9'"):
        OnnxClassifier(tmp_path / "v9.onnx", device="cpu")
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "nometa.onnx"))
    with pytest.raises(ServingError, match="not a fedmedclip export"):
        OnnxClassifier(tmp_path / "nometa.onnx", device="cpu")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ServingError, match="cannot load"):
        OnnxClassifier(tmp_path / "junk.onnx", device="cpu")


def test_batcher_unit():
    """The batcher alone: concurrent submissions share runs, each gets its own rows, an oversized request
    is chunked, and a failing run fails only its own requests."""
    from prometheus_client import REGISTRY

    from serving.batcher import DynamicBatcher
    from serving.options import Batching

    sizes: list[int] = []

    def run(images):
        sizes.append(len(images))
        if (images == 255).any():
            raise RuntimeError("boom")
        v = images.reshape(len(images), -1)[:, 0].astype(np.float32)
        return v[:, None], v.astype(np.int64)

    async def main():
        batcher = DynamicBatcher(run, Batching(max_batch_size=4, max_batch_delay_ms=50), "unit")
        reqs = [np.full((1 + i % 2, 2, 2, 3), i, np.uint8) for i in range(6)]
        outs = await asyncio.gather(*(batcher.submit(r) for r in reqs))
        for i, (probs, index) in enumerate(outs):
            assert probs.shape == (1 + i % 2, 1) and (index == i).all()
        big = await batcher.submit(np.arange(10, dtype=np.uint8).repeat(12).reshape(10, 2, 2, 3))
        assert list(big[1]) == list(range(10))
        ok, bad = await asyncio.gather(
            batcher.submit(np.full((1, 2, 2, 3), 3, np.uint8)),
            batcher.submit(np.full((1, 2, 2, 3), 255, np.uint8)),
            return_exceptions=True,
        )
        assert isinstance(bad, RuntimeError) and isinstance(ok, RuntimeError)  # same run: both fail
        assert (await batcher.submit(np.full((1, 2, 2, 3), 7, np.uint8)))[1][0] == 7  # and it keeps going
        batcher.shutdown()

    asyncio.run(main())
    # 6 requests (9 images) in arrival order: 1+2+1 | 2+1 | 2; then 10 images in chunks; then 2 together; then 1.
    assert sizes == [4, 3, 2, 4, 4, 2, 2, 1]
    # Its metrics count the runs that answered (all but the failed one) and their images.
    runs = REGISTRY.get_sample_value("fedmedclip_batch_size_count", {"model": "unit"})
    assert runs == len(sizes) - 1
    assert REGISTRY.get_sample_value("fedmedclip_batch_size_sum", {"model": "unit"}) == sum(sizes) - 2


def test_server_imports_without_torch_or_onnx():
    """The serving image (Dockerfile target `serve`) has only numpy, Pillow and simplejpeg of the core's
    dependencies."""
    absent = ("torch", "onnx", "onnxscript", "transformers", "matplotlib", "dp_accounting")
    code = (
        f"import sys\nfor m in {absent}: sys.modules[m] = None\n"
        "import serving.cli, serving.model, serving.server, serving.source, serving.runtime, serving.images\n"
        "import serving.rest, serving.grpc_service, mlops.tracking\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, timeout=120)


def test_cli_module_is_light():
    code = (
        "import sys, serving.cli; "
        "print(sorted(m for m in ('kserve', 'onnxruntime', 'mlflow', 'torch', 'requests', 'tritonclient') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_no_model_control_without_a_token(server, grpc_client):
    """kserve 0.21 let any client unload the model for good (REST and gRPC); this server has no model
    control unless started with --model-control-token-file: 404 and UNIMPLEMENTED, and it stays ready."""
    from tritonclient.utils import InferenceServerException

    http = server[0]
    for action in ("unload", "load"):
        resp = requests.post(f"http://{http}/v2/repository/models/{MODEL}/{action}", timeout=10)
        assert resp.status_code == 404 and set(resp.json()) == {"error"}
    with pytest.raises(InferenceServerException) as info:
        grpc_client.unload_model(MODEL)
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "model_repository" not in requests.get(f"http://{http}/v2", timeout=10).json()["extensions"]
    assert grpc_client.is_server_ready() and grpc_client.is_model_ready(MODEL)
    assert requests.get(f"http://{http}/v2/health/ready", timeout=10).status_code == 200

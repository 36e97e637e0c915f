"""Small ONNX models that follow the exported-model contract (docs/contracts.md), for the serving tests
and the benchmark. Not a CLIP: a seeded conv net with the same interface (uint8 NHWC in, normalisation
inside the graph, `probabilities` float32 [N, C] and `class_index` int64 [N] out, the metadata_props), with
the sha256 sidecar that `fedmedclip export` writes next to it, and by default the OOD outputs
(`ood_score`: squared distance of the pooled features to their mean on uniform-noise images, calibrated on
other noise images to a 5 % false-alarm rate; `embedding`: the pooled features).

Importing this module needs torch (tests and bench only; the server never imports it).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmedclip.digests import onnx_metadata, ood_metadata, write_sha256_sidecar
from fedmedclip.preprocess import CLIP_MEAN, CLIP_STD, Preprocessing

CLASS_NAMES = ("glioma", "meningioma", "notumor", "pituitary")
REPO = Path(__file__).resolve().parents[1]


def wait_ready(proc, http: str, model: str, log_path: Path, timeout: float = 60.0) -> None:
    """Until the server process `proc` answers that `model` is ready on `http` (host:port); a failed test,
    with the end of the server's log, when it exits first or takes longer than `timeout`."""
    import time

    import pytest
    import requests

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"http://{http}/v2/models/{model}/ready", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"server not ready after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)


@dataclass
class RunningServer:
    http: str  # host:port
    grpc: str  # host:port
    proc: subprocess.Popen
    log_path: Path
    metrics: str = ""  # host:port of /metrics: --metrics-port's, else http's

    def __post_init__(self) -> None:
        self.metrics = self.metrics or self.http

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@contextlib.contextmanager
def running_server(
    models: list[str], log_dir: Path, *options: str, ready_model: str = "fedmedclip", token: str | None = None
):
    """`python -m serving serve MODELS... OPTIONS` (the handler of `fedmedclip serve`) on free loopback ports,
    on CPU, its output in log_dir/server.log; stopped with SIGTERM afterwards (no drain period unless
    OPTIONS give --drain-seconds: nothing balances load in front of a test server). `token`: model control
    enabled with it (in log_dir/token)."""
    from conftest import free_port

    if token is not None:
        (log_dir / "token").write_text(token + "\n")
        options = ("--model-control-token-file", str(log_dir / "token"), *options)

    http_port, grpc_port = free_port(), free_port()
    log_path = log_dir / "server.log"
    cmd = [
        sys.executable, "-m", "serving", "serve", *models, "--device", "cpu",
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--drain-seconds", "0", *options,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    metrics = (
        f"127.0.0.1:{options[options.index('--metrics-port') + 1]}" if "--metrics-port" in options else ""
    )
    server = RunningServer(f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", proc, log_path, metrics)
    try:
        wait_ready(proc, server.http, ready_model, log_path)
        yield server
    finally:
        server.stop()


def refused_to_serve(model: Path, *options: str) -> str:
    """`python -m serving serve MODEL OPTIONS` on a free port, which must refuse to start: exit status 2 with a
    reason and no traceback, before it listens. Returns its stderr."""
    from conftest import free_port

    cmd = [sys.executable, "-m", "serving", "serve", str(model), *options, "--http-port", str(free_port())]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr


def metric_samples(http: str) -> dict[tuple[str, tuple], float]:
    """The server's /metrics at `http` (host:port): (sample name, sorted labels) -> value."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://{http}/metrics", timeout=60).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels) -> float:
    """The sum of the samples `name` whose labels include `labels`."""
    return sum(v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab))


def uint8_json(images: np.ndarray, **extra) -> dict:
    """A v2 JSON request body carrying `images` (uint8 [N, S, S, 3]) as the `images` UINT8 tensor."""
    spec = {
        "name": "images",
        "datatype": "UINT8",
        "shape": list(images.shape),
        "data": images.ravel().tolist(),
    }
    return {"inputs": [spec], **extra}


def base64_json(files: list[bytes]) -> dict:
    """A v2 JSON request body carrying image `files` as the `image_bytes` BYTES tensor: JSON cannot carry raw
    bytes, so each element is the base64 of its file."""
    import base64

    data = [base64.b64encode(f).decode() for f in files]
    return {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [len(files)], "data": data}]}


def contract_preprocessing(image_size: int) -> Preprocessing:
    """The `clip` recipe at `image_size`: short-side resize + centre crop, so the server's decode path matters."""
    return Preprocessing(
        name="clip", size=image_size, resample="bicubic", center_crop=True, mean=CLIP_MEAN, std=CLIP_STD
    )


def make_contract_onnx(
    path: str | Path,
    *,
    image_size: int = 64,
    class_names: tuple[str, ...] = CLASS_NAMES,
    width: int = 8,
    depth: int = 1,
    seed: int = 0,
    run_id: str = "test-run",
    non_finite: bool = False,
    nan_for_pixel: int | None = None,
    ood: bool = True,
) -> Path:
    """Export a seeded conv classifier to `path` (and its sha256 sidecar) and return it.

    `width`/`depth` scale the compute: the tests use the default (about 1 ms per image), the benchmark a
    heavier net so ONNX Runtime dominates like the real CLIP encoder does. `non_finite`: one weight of the
    head is NaN, as after a diverged training, so every probability is NaN. `nan_for_pixel`: the model is
    fine except for images whose every pixel is this value, which get NaN probabilities (a model that only
    breaks on some inputs, which a warm-up batch cannot see).
    """
    import onnx
    import torch
    from torch import nn

    pre = contract_preprocessing(image_size)
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = [nn.Conv2d(3, width, kernel_size=4, stride=4), nn.GELU()]
            for _ in range(depth - 1):
                layers += [nn.Conv2d(width, width, kernel_size=3, padding=1), nn.GELU()]
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(width, len(class_names))
            self.register_buffer("centre", torch.zeros(width))

        def pooled(self, images: torch.Tensor) -> torch.Tensor:
            return self.features(pre.normalise(images)).mean(dim=(2, 3))

        def forward(self, images: torch.Tensor):
            x = self.pooled(images)
            # Scaled logits so the probabilities are far from uniform and differ between images.
            probs = torch.softmax(self.head(x) * 4.0, dim=-1)
            index = torch.argmax(probs, dim=-1)
            if nan_for_pixel is not None:
                trap = (images == nan_for_pixel).flatten(1).all(dim=1)
                probs = torch.where(trap[:, None], torch.full_like(probs, float("nan")), probs)
            if not ood:
                return probs, index
            return probs, index, ((x - self.centre) ** 2).sum(dim=1), x

    net = Net().eval()
    noise = torch.from_numpy(
        np.random.default_rng(seed + 1).integers(0, 256, (3, 64, image_size, image_size, 3), dtype=np.uint8)
    )
    with torch.no_grad():
        net.centre.copy_(net.pooled(noise[0]).mean(0))
        if non_finite:
            net.head.weight[0, 0] = float("nan")
    example = torch.randint(0, 256, (2, image_size, image_size, 3), dtype=torch.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs = ["probabilities", "class_index", *(["ood_score", "drift_embedding"] if ood else [])]
    # The legacy TorchScript exporter: about 1 s, against several for dynamo, for the same contract graph.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=["images"],
            output_names=outputs,
            dynamic_axes={"images": {0: "N"}, **{name: {0: "N"} for name in outputs}},
            opset_version=17,
            dynamo=False,
        )
    model = onnx.load(str(path))
    meta = onnx_metadata(
        class_names=class_names,
        image_size=image_size,
        preprocessing=pre.describe(),
        backbone="test/tiny-conv",
        backbone_sha256="0" * 64,
        method="fixture",
        site="global",
        run_id=run_id,
    )
    if ood:
        meta.update(_calibrate(path, noise))
    del model.metadata_props[:]
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))
    write_sha256_sidecar(path)
    return path


def _calibrate(path: Path, noise) -> dict[str, str]:
    """The fixture's OOD metadata, as `fedmedclip export` computes it: the conformal threshold on held-out
    in-distribution (noise) images, their embeddings as the drift reference, the median-heuristic bandwidth."""
    import onnxruntime as ort

    from fedmedclip.ood import conformal_threshold, median_bandwidth

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores = session.run(["ood_score"], {"images": noise[1].numpy()})[0]
    reference = session.run(["drift_embedding"], {"images": noise[2].numpy()})[0].astype(np.float32)
    return ood_metadata(
        method="fixture-squared-distance",
        threshold=conformal_threshold(scores.astype(np.float64), 0.05),
        false_alarm_rate=0.05,
        calibration={"holder": "fixture", "calibration_images": len(scores)},
        reference=reference.astype("<f4").tobytes(),
        reference_shape=reference.shape,
        sigma=median_bandwidth(reference.astype(np.float64)),
    )


# ------------------------------------------------------------------ the Open Inference Protocol's own spec

SPEC_DIR = Path(__file__).resolve().parent / "specs" / "open-inference-protocol"


class OipRestSpec:
    """Response validation against the protocol's OpenAPI file (tests/specs/open-inference-protocol, unmodified)
    with openapi-schema-validator's OpenAPI 3.0 validator (nullable rules included).

    The file writes model paths as `${MODEL_NAME}` and lists only the versioned model routes; the unversioned
    ones (optional `[/versions/V]` in inference_rest.md) are checked against the same operation. A status the
    file does not list for an operation is an error: its body must be the protocol's `{"error": string}`.
    A binary-extension answer (application/octet-stream) is checked on its JSON header, where outputs sent as
    binary carry `binary_data_size` instead of `data`."""

    def __init__(self) -> None:
        import re

        import yaml
        from openapi_schema_validator import OAS30Validator
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT4

        self.spec = yaml.safe_load((SPEC_DIR / "open_inference_rest.yaml").read_text())
        registry = Registry().with_resource(
            "oip", Resource.from_contents(self.spec, default_specification=DRAFT4)
        )
        self._validator = lambda ref: OAS30Validator({"$ref": f"oip{ref}"}, registry=registry)
        self.routes = []
        for template, item in self.spec["paths"].items():
            pattern = re.escape(template.replace("${", "{")).replace(r"\{", "{").replace(r"\}", "}")
            pattern = re.sub(r"\{[A-Z_]+\}", "[^/]+", pattern)
            self.routes.append((re.compile(f"^{pattern}$"), item))
        self.error = self._validator("#/components/schemas/metadata_model_error_response")
        self.checked: list[tuple[str, str, int]] = []

    def operation(self, method: str, path: str) -> dict:
        import re

        if path == "/v2":
            path = "/v2/"
        # Unversioned model routes: the same operation as the versioned ones.
        path = re.sub(r"^(/v2/models/[^/]+)(?=/ready$|/infer$|$)", r"\1/versions/_", path)
        for pattern, item in self.routes:
            if pattern.match(path) and method.lower() in item:
                return item[method.lower()]
        raise AssertionError(f"{method} {path} is not an operation of the protocol's OpenAPI file")

    def check(self, response, method: str | None = None, path: str | None = None) -> dict | None:
        """Validate a `requests` response; returns its JSON (header) or None for a body-less 200."""
        import json
        from urllib.parse import urlsplit

        method = method or response.request.method
        path = path or urlsplit(response.request.url).path
        try:
            declared = self.operation(method, path)["responses"].get(str(response.status_code))
        except AssertionError:
            if response.status_code < 400:  # an error to a request outside the spec is still {"error"}
                raise
            declared = None
        content_type = response.headers.get("content-type", "")
        self.checked.append((method, path, response.status_code))
        if response.status_code >= 400 or declared is None:
            assert response.status_code >= 400, f"{method} {path}: {response.status_code} is not in the spec"
            assert "detail" not in response.text[:20], response.text[:200]
            assert content_type.startswith("application/json"), (path, content_type)
            body = response.json()
            self.error.validate(body)
            return body
        schema = (declared.get("content") or {}).get("application/json", {}).get("schema")
        if content_type.startswith("application/octet-stream"):
            length = int(response.headers["inference-header-content-length"])
            body = json.loads(response.content[:length])
            for output in body["outputs"]:
                assert "data" in output or "binary_data_size" in output.get("parameters", {}), output
            shown = {**body, "outputs": [{"data": [], **o} for o in body["outputs"]]}
        else:
            assert content_type.startswith("application/json"), (path, content_type)
            body = shown = response.json()
        if schema is not None:
            self._validator(schema["$ref"]).validate(shown)
        return body


def oip_grpc_messages(tmp_dir: Path):
    """The protocol's gRPC messages compiled from its own .proto (unmodified) into a private descriptor pool
    (tritonclient's and kserve's generated copies claim the same `inference.*` names in the default one):
    {message name: class}. The server's answers are parsed with these."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_tools import protoc

    out = tmp_dir / "oip.desc"
    rc = protoc.main(
        [
            "protoc",
            f"-I{SPEC_DIR}",
            f"--descriptor_set_out={out}",
            str(SPEC_DIR / "open_inference_grpc.proto"),
        ]
    )
    assert rc == 0, "protoc could not compile the protocol's .proto"
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for proto in files.file:
        pool.Add(proto)
    (proto,) = files.file
    return {
        m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{proto.package}.{m.name}"))
        for m in proto.message_type
    }

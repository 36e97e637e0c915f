"""`fedmedclip serve` and `fedmedclip predict` (entry point `serving.cli:register`, docs/contracts.md).

Nothing heavy at import: kserve, onnxruntime, mlflow and requests are imported inside the handlers so the
core CLI stays fast. `python -m serving serve|predict ...` runs the same commands without the core CLI.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import re
import sys
from pathlib import Path

from fedmedclip.errors import FedMedClipError

from .errors import ServingError

MIB = 1024 * 1024


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve exported ONNX classifiers over the v2 Open Inference Protocol (REST + gRPC)",
        description="Serve one or more exported fedmedclip ONNX models on ONNX Runtime, each under its name: "
        "REST on --http-port (/v2/models/NAME[/versions/V]/infer, /v2/health/*, /metrics), gRPC on --grpc-port.",
    )
    serve.add_argument(
        "models",
        nargs="+",
        metavar="[NAME=]MODEL",
        help="an .onnx file, a folder holding one (e.g. KServe's /mnt/models), or models:/NAME@ALIAS | "
        "models:/NAME/VERSION from the MLflow registry ($MLFLOW_TRACKING_URI, else the running local stack), verified against its onnx_sha256 "
        "tag; a file is verified against --expected-sha256 or the MODEL.onnx.sha256 sidecar `fedmedclip export` "
        "writes, and refused without either. Several models: give each a name, e.g. "
        "`global=models:/fedmedclip@champion site_0=site_0.onnx`",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on, REST and gRPC (default: %(default)s, this machine only; 0.0.0.0 for every "
        "interface, as in a container)",
    )
    serve.add_argument(
        "--name",
        default="fedmedclip",
        help="name of a single model given without NAME= (default: %(default)s)",
    )
    serve.add_argument("--http-port", type=int, default=8080, help="REST port (default: %(default)s)")
    serve.add_argument("--grpc-port", type=int, default=8081, help="gRPC port (default: %(default)s)")
    serve.add_argument("--no-grpc", action="store_true", help="serve REST only")
    serve.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="auto: CUDA if it works, else CPU; cuda: refuse to start without a working CUDA provider "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--max-batch-size", type=int, default=32, help="images per ONNX Runtime run (default: %(default)s)"
    )
    serve.add_argument(
        "--max-batch-delay-ms",
        type=float,
        default=2.0,
        help="longest a request waits for others to share its run (default: %(default)s)",
    )
    serve.add_argument(
        "--batch-concurrency",
        type=int,
        default=1,
        help="ONNX Runtime runs in flight at once (default: %(default)s)",
    )
    serve.add_argument(
        "--max-batch-images", type=int, default=64, help="images per request (default: %(default)s)"
    )
    serve.add_argument(
        "--max-image-pixels",
        type=int,
        default=40_000_000,
        help="width*height of one encoded image, checked from its header before decoding (default: %(default)s)",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=int,
        default=64 * MIB,
        help="request body (REST) / message (gRPC) size limit in bytes (default: %(default)s)",
    )
    serve.add_argument(
        "--max-request-pixels",
        type=int,
        default=64 * 2048 * 2048,
        help="total width*height of one request's encoded images, from their headers before any is decoded "
        "(default: %(default)s = 64 images of 2048x2048)",
    )
    serve.add_argument(
        "--max-decode-seconds",
        type=float,
        default=10.0,
        help="CPU seconds decoding one request's encoded images may take; a request over it is refused "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--decode-threads",
        type=int,
        default=0,
        help="threads decoding encoded images, shared fairly between requests (one request uses at most "
        "half); 0 = one per core, at most 8 (default: %(default)s)",
    )
    serve.add_argument(
        "--ort-threads", type=int, default=0, help="ONNX Runtime intra-op threads, 0 = its default"
    )
    serve.add_argument(
        "--ort-spin",
        action="store_true",
        help="let idle ONNX Runtime threads busy-wait (off: they would take CPU from decoding and request handling)",
    )
    serve.add_argument(
        "--expected-sha256",
        help="refuse to start unless the model file has this sha256 (registry models are checked against their tag)",
    )
    serve.add_argument(
        "--cache-dir", help="where a registry model is downloaded (default: a new temporary folder)"
    )
    serve.add_argument(
        "--access-log", action="store_true", help="log every request (off: it costs throughput)"
    )
    serve.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a REST request body may take to arrive; a body announced and not sent gets 408 "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--drain-seconds",
        type=float,
        default=5.0,
        help="on SIGTERM: seconds the server keeps answering while its readiness says no (so load balancers "
        "stop sending) before the ports close (default: %(default)s)",
    )
    serve.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        help="on SIGTERM, after the drain: longest wait for requests still in flight (default: %(default)s)",
    )
    serve.add_argument(
        "--json-workers",
        type=int,
        default=1,
        help="processes parsing large JSON request bodies off the server's interpreter (0: threads only; "
        "default: %(default)s)",
    )
    serve.add_argument(
        "--model-control-token-file",
        help="enable model control (POST /v2/repository/models/NAME/load|unload, gRPC RepositoryModelLoad|"
        "Unload) for requests with `Authorization: Bearer TOKEN`, TOKEN being this file's content (at least 32 "
        "characters). Without it, no model can be loaded or unloaded over the network",
    )
    serve.add_argument(
        "--ood-window",
        type=int,
        default=200,
        help="images over which fedmedclip_ood_window_rate is the share flagged out_of_distribution "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--drift-window",
        type=int,
        default=200,
        help="recent images whose embeddings the drift test compares with the exported reference "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--drift-every",
        type=int,
        default=50,
        help="run the drift test again after this many new images (default: %(default)s)",
    )
    serve.add_argument(
        "--drift-permutations",
        type=int,
        default=100,
        help="permutations of the MMD test (default: %(default)s)",
    )
    serve.add_argument(
        "--drift-p-value",
        type=float,
        default=0.05,
        help="level of the reported MMD^2 threshold (fedmedclip_drift_mmd2_threshold; default: %(default)s)",
    )
    serve.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="the server's log level (default: %(default)s)",
    )
    serve.set_defaults(func=_serve)

    predict = subparsers.add_parser(
        "predict",
        help="classify image files with a running server (v2 REST) and print the top classes",
        description="Send JPEG/PNG files to a fedmedclip server as a BYTES tensor over v2 REST and print the "
        "top classes per image.",
    )
    predict.add_argument("images", nargs="+", help="JPEG or PNG files")
    predict.add_argument("--url", required=True, help="server base URL, e.g. http://localhost:8080")
    predict.add_argument("--model", help="model name (default: the server's only model)")
    predict.add_argument(
        "--top", type=int, default=3, help="classes to print per image (default: %(default)s)"
    )
    predict.add_argument("--batch", type=int, default=16, help="images per request (default: %(default)s)")
    predict.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per request (default: %(default)s)"
    )
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict.set_defaults(func=_predict)


# ---- serve ------------------------------------------------------------------------------------------------


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def model_specs(items: list[str], default_name: str) -> list[tuple[str, str]]:
    """(name, model spec) for each `serve` argument: `NAME=SPEC`, or a bare SPEC served as `default_name`."""
    specs = []
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not MODEL_NAME.match(name) or not spec:
            name, spec = default_name, item
        specs.append((name, spec))
    if not MODEL_NAME.match(default_name):
        raise ServingError(
            f"--name {default_name!r}: a model name is 1-63 letters, digits, '_', '.' or '-', starting with a letter "
            "or digit"
        )
    names = [n for n, _ in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ServingError(
            f"two models named {duplicates}: give each model its own name, e.g. `serve global=a.onnx site_0=b.onnx`"
        )
    return specs


def _serve(args: argparse.Namespace) -> int:
    from .batcher import Batching
    from .images import Limits
    from .monitor import MonitorOptions

    specs = model_specs(args.models, args.name)
    if args.expected_sha256 and len(specs) > 1:
        raise ServingError(
            "--expected-sha256 checks a single model; with several, each needs its sidecar or tag"
        )
    for opt in ("http_port", "grpc_port") if not args.no_grpc else ("http_port",):
        port = getattr(args, opt)
        if not 0 < port < 65536:
            raise ServingError(f"--{opt.replace('_', '-')} must be a TCP port, got {port}")
        # Checked before the model is fetched and loaded: the server would only fail once it starts listening.
        problem = _cannot_listen(args.host, port)
        if problem:
            raise ServingError(f"--{opt.replace('_', '-')} {port} {problem} (--host {args.host})")
    if not args.no_grpc and args.http_port == args.grpc_port:
        raise ServingError("--http-port and --grpc-port must differ")
    try:
        limits = Limits(
            max_batch_images=args.max_batch_images,
            max_image_pixels=args.max_image_pixels,
            max_request_bytes=args.max_request_bytes,
            max_request_pixels=args.max_request_pixels,
            max_decode_seconds=args.max_decode_seconds,
        )
        batching = Batching(args.max_batch_size, args.max_batch_delay_ms, args.batch_concurrency)
        monitoring = MonitorOptions(
            args.ood_window, args.drift_window, args.drift_every, args.drift_permutations, args.drift_p_value
        )
        if args.decode_threads < 0 or args.json_workers < 0:
            raise ValueError("--decode-threads and --json-workers must be 0 or more")
        if not (args.body_timeout > 0 and args.drain_seconds >= 0 and args.grace_period >= 0):
            raise ValueError("--body-timeout must be positive, --drain-seconds and --grace-period 0 or more")
        if not (args.ood_window >= 1 and args.drift_window >= 2 and args.drift_every >= 1):
            raise ValueError("--ood-window must be at least 1, --drift-window 2, --drift-every 1")
        if not (args.drift_permutations >= 10 and 0 < args.drift_p_value < 1):
            raise ValueError("--drift-permutations must be at least 10 and --drift-p-value in (0, 1)")
    except ValueError as exc:
        raise ServingError(f"bad option: {exc}") from None
    token = _control_token(args.model_control_token_file)

    from .runtime import OnnxClassifier
    from .source import resolve_model

    _log_to_stderr(args.log_level)
    # Model files, hashes and execution provider are checked before kserve is imported (a second or two), so
    # a wrong hash or a missing GPU fails fast.
    loaded = []
    for name, spec in specs:
        cache = str(Path(args.cache_dir) / name) if args.cache_dir and len(specs) > 1 else args.cache_dir
        resolved = resolve_model(spec, expected_sha256=args.expected_sha256, cache_dir=cache)
        classifier = OnnxClassifier(
            resolved.path,
            device=args.device,
            intra_op_threads=args.ort_threads,
            spin=args.ort_spin,
            expected_sha256=resolved.sha256,
        )
        # A model that cannot run, or answers NaN, is refused here too, before kserve is imported.
        classifier.warm_up((1, batching.max_batch_size))
        loaded.append((name, resolved, classifier))

    from .model import FedMedClipModel
    from .server import ServerOptions, configure_logging, run_server

    configure_logging(args.log_level)
    models = []
    for name, resolved, classifier in loaded:
        model = FedMedClipModel(
            name,
            resolved.path,
            device=args.device,
            limits=limits,
            batching=batching,
            intra_op_threads=args.ort_threads,
            origin=resolved.origin,
            sha256=resolved.sha256,
            version=resolved.version,
            classifier=classifier,
            decode_threads=args.decode_threads,
            monitoring=monitoring,
        )
        model.load()
        models.append(model)
    run_server(
        models,
        ServerOptions(
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            enable_grpc=not args.no_grpc,
            max_request_bytes=limits.max_request_bytes,
            access_log=args.access_log,
            drain_seconds=args.drain_seconds,
            grace_period_s=args.grace_period,
            body_timeout_s=args.body_timeout,
            json_workers=args.json_workers,
            control_token=token,
        ),
    )
    return 0


def _control_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ServingError(f"--model-control-token-file: cannot read {path}: {exc}") from None
    if len(token) < 32 or any(c.isspace() for c in token):
        raise ServingError(
            f"--model-control-token-file {path}: the token must be one word of at least 32 characters "
            "(e.g. `openssl rand -hex 32`)"
        )
    return token


def _cannot_listen(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (the address is unknown or the port taken), or None."""
    import socket

    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        return f"cannot be listened on: --host is not an address ({exc})"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            sock.bind(address)
        except OSError as exc:
            return "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be listened on ({exc})"
    return None


class _StderrHandler(logging.StreamHandler):
    """Writes to the current sys.stderr, not the one at creation (tests and embedding tools swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _log_to_stderr(level: str) -> None:
    ours = logging.getLogger("fedmedclip")
    if not any(isinstance(h, _StderrHandler) for h in ours.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)s %(name)s %(levelname)s %(message)s"))
        ours.addHandler(handler)
        ours.propagate = False  # the core CLI's root handler would print every line twice
    ours.setLevel(level)


# ---- predict ----------------------------------------------------------------------------------------------


def encode_bytes_request(blobs: list[bytes], request_id: str | None = None) -> tuple[bytes, int]:
    """A v2 REST request with the binary-data extension: JSON header, then the BYTES tensor (each element
    prefixed by its little-endian uint32 length). Returns (body, JSON header length)."""
    import struct

    tensor = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    header = {
        "inputs": [
            {
                "name": "image_bytes",
                "datatype": "BYTES",
                "shape": [len(blobs)],
                "parameters": {"binary_data_size": len(tensor)},
            }
        ],
        # Small outputs: plain JSON is easiest to read back.
        "outputs": [
            {"name": n, "parameters": {"binary_data": False}} for n in ("probabilities", "class_name")
        ],
    }
    if request_id is not None:
        header["id"] = request_id
    head = json.dumps(header).encode()
    return head + tensor, len(head)


def _predict(args: argparse.Namespace) -> int:
    import requests

    if args.top < 1 or args.batch < 1:
        raise FedMedClipError("--top and --batch must be at least 1")
    base = args.url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        base = "http://" + base
    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FedMedClipError(f"image file(s) not found: {missing}")

    def call(method: str, url: str, **kw):
        try:
            return requests.request(method, url, timeout=args.timeout, **kw)
        except requests.RequestException as exc:
            raise FedMedClipError(f"cannot reach the server at {base}: {exc}") from None

    model = args.model
    if model is None:
        resp = call("GET", f"{base}/v2/models")
        models = resp.json().get("models", []) if resp.ok else []
        if len(models) != 1:
            raise FedMedClipError(f"{base} serves {models or 'no listable models'}: pass --model NAME")
        model = models[0]

    results = []
    for start in range(0, len(paths), args.batch):
        chunk = paths[start : start + args.batch]
        body, json_length = encode_bytes_request([p.read_bytes() for p in chunk])
        resp = call(
            "POST",
            f"{base}/v2/models/{model}/infer",
            data=body,
            headers={"Inference-Header-Content-Length": str(json_length)},
        )
        if resp.status_code != 200:
            try:
                detail = resp.json().get("error", resp.text)
            except ValueError:
                detail = resp.text
            raise FedMedClipError(
                f"{base} answered HTTP {resp.status_code} for {[str(p) for p in chunk]}: {detail}"
            )
        answer = resp.json()
        outputs = {o["name"]: o for o in answer["outputs"]}
        class_names = json.loads((answer.get("parameters") or {}).get("class_names", "null") or "null")
        probs = outputs["probabilities"]["data"]
        width = outputs["probabilities"]["shape"][1]
        for i, path in enumerate(chunk):
            row = probs[i * width : (i + 1) * width]
            names = (
                class_names if class_names and len(class_names) == width else [str(k) for k in range(width)]
            )
            ranked = sorted(zip(names, row, strict=True), key=lambda t: -t[1])[: args.top]
            results.append({"image": str(path), "top": [{"class": c, "probability": p} for c, p in ranked]})

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        width = max(len(t["class"]) for r in results for t in r["top"])
        for r in results:
            best = r["top"][0]
            print(f"{r['image']}: {best['class']} ({best['probability']:.1%})")
            for t in r["top"]:
                print(f"    {t['class']:<{width}}  {t['probability']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FedMedClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`fedmedclip serve` and `fedmedclip predict` (entry point `serving.cli:register`, docs/contracts.md).
`python -m serving` runs them without the core CLI; kserve, onnxruntime, mlflow and requests load in the handlers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

from fedmedclip.errors import FedMedClipError, printable, run_command, shown
from fedmedclip.flags import SERVE, add_config_arguments, is_finite_number, options_from_args

from .errors import ServingError
from .options import Batching, Limits, ModelOptions, MonitorOptions, ServerOptions

log = logging.getLogger("fedmedclip.serving")


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
        "models:/NAME/VERSION from the MLflow registry (--tracking-uri, else $MLFLOW_TRACKING_URI, else the running "
        "local stack), "
        "verified against its onnx_sha256 tag; a file is verified against --expected-sha256 or the "
        "MODEL.onnx.sha256 sidecar `fedmedclip export` writes, and refused without either. Several models: give "
        "each a name, e.g. `global=models:/fedmedclip@champion site_0=site_0.onnx`",
    )
    serve.add_argument(
        "--name",
        default="fedmedclip",
        help="name of a single model given without NAME= (default: %(default)s)",
    )
    for options in (ServerOptions, ModelOptions, Limits, Batching, MonitorOptions):
        add_config_arguments(serve, SERVE, options)
    serve.add_argument(
        "--expected-sha256",
        help="refuse to start unless the model file has this sha256 (registry models are checked against their tag)",
    )
    serve.add_argument(
        "--cache-dir",
        help="where a registry model is downloaded, in a folder named by its sha256, and kept (default: a "
        "temporary folder, removed when the server stops)",
    )
    serve.add_argument("--tracking-uri", help="the MLflow server of a models:/ reference")
    serve.set_defaults(func=_serve)

    predict = subparsers.add_parser(
        "predict",
        help="classify image files with a running server (v2 REST) and print the top classes",
        description="Send JPEG/PNG files to a fedmedclip server as a BYTES tensor over v2 REST and print the "
        "top classes per image.",
    )
    predict.add_argument("images", nargs="+", help="JPEG or PNG files")
    predict.add_argument("--url", required=True, help="server base URL, e.g. http://localhost:8080")
    predict.add_argument(
        "--model", help="model name, as `serve` names one (default: the server's only model)"
    )
    for flag, kind, default, help in (
        ("--top", int, 3, "classes to print per image"),
        ("--batch", int, 16, "images per request"),
        ("--timeout", float, 60.0, "seconds per request"),
    ):
        predict.add_argument(flag, type=kind, default=default, help=f"{help} (default: %(default)s)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict.set_defaults(func=_predict)


# ---- serve ------------------------------------------------------------------------------------------------
# Unreserved URL characters only: a name is its own path segment of /v2/models/NAME, never '/', '?', '#', '..'.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MODEL_NAME_RULE = "a model name is 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit"


def model_specs(items: list[str], default_name: str) -> list[tuple[str, str]]:
    """(name, model spec) for each `serve` argument: `NAME=SPEC`, or a bare SPEC served as `default_name`."""
    if not MODEL_NAME.match(default_name):
        raise ServingError(f"--name {default_name!r}: {MODEL_NAME_RULE}")
    specs = []
    for item in items:
        name, sep, spec = item.partition("=")
        specs.append((name, spec) if sep and MODEL_NAME.match(name) and spec else (default_name, item))
    if duplicates := sorted(n for n, count in Counter(n for n, _ in specs).items() if count > 1):
        raise ServingError(
            f"two models named {duplicates}: give each model its own name, e.g. `serve global=a.onnx site_0=b.onnx`"
        )
    return specs


def _serve(args: argparse.Namespace) -> int:
    specs = model_specs(args.models, args.name)
    if args.expected_sha256 and len(specs) > 1:
        raise ServingError(
            "--expected-sha256 checks a single model; with several, each needs its sidecar or tag"
        )
    limits, batching, monitoring = (options_from_args(args, c) for c in (Limits, Batching, MonitorOptions))
    model_options = replace(
        options_from_args(args, ModelOptions), limits=limits, batching=batching, monitoring=monitoring
    )
    server_options = options_from_args(args, ServerOptions)  # reads --model-control-token-file's token
    for flag, port in server_options.ports():
        # Checked before the model is fetched and loaded: the server would only fail once it starts listening.
        if problem := _cannot_listen(args.host, port):
            raise ServingError(f"{flag} {port} {problem} (--host {args.host})")

    from .runtime import OnnxClassifier
    from .source import resolve_model

    # The download folder is closed (a temporary one removed) before the log lines stop.
    with _logging_to_stderr(args.log_level), _download_folder(args.cache_dir, specs) as downloads:
        # Model files, hashes and execution provider are checked before kserve is imported (a second or two),
        # so a wrong hash, a missing GPU, or a model that cannot run or answers NaN fails fast.
        loaded = []
        for name, spec in specs:
            cache = str(Path(downloads) / name) if downloads and len(specs) > 1 else downloads
            resolved = resolve_model(spec, args.expected_sha256, cache, args.tracking_uri)
            loaded.append((name, resolved, OnnxClassifier.open(resolved, model_options)))

        from .model import FedMedClipModel
        from .server import serve

        models = [FedMedClipModel(name, resolved, model_options, clf) for name, resolved, clf in loaded]
        for model in models:
            model.load()
        asyncio.run(serve(models, server_options))
    return 0


@contextlib.contextmanager
def _download_folder(cache_dir: str | None, specs: list[tuple[str, str]]):
    """Where `serve` downloads its registry models: --cache-dir, kept; without it (and with a models:/ spec), a
    temporary folder this command owns for its whole run and removes when it ends: after the server stopped
    (its ports closed, its models stopped), or when it refuses to start after a download. Never sooner: model
    control loads an unloaded model again from its file there, and no request loads another one. The server's
    JSON worker processes are spawned and never hold this object: only this process removes the folder."""
    from .source import is_registry

    if cache_dir or not any(is_registry(spec) for _, spec in specs):
        yield cache_dir
        return
    # Until the server's own handlers take over, a SIGTERM (a pod stopped while its model downloads or loads)
    # ends the command through the `finally` below, as Ctrl-C does: its default killed it and left the folder.
    previous = signal.signal(signal.SIGTERM, _terminated_while_starting)
    folder = tempfile.TemporaryDirectory(prefix="fedmedclip-model-", ignore_cleanup_errors=True)
    try:
        yield folder.name
    finally:
        if os.path.isdir(folder.name) and os.listdir(folder.name):  # a refusal before any download: silent
            log.info("removing the temporary download folder %s", folder.name)
        folder.cleanup()
        if os.path.lexists(folder.name):
            log.warning("could not remove all of the temporary download folder %s", folder.name)
        signal.signal(signal.SIGTERM, previous)


def _terminated_while_starting(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second one exits at once, as the running server's does
    log.info("%s received while starting: stopping", signal.Signals(signum).name)
    raise SystemExit(128 + signum)


def _cannot_listen(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (the address is unknown or the port taken), or None."""
    import socket

    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        return f"cannot be listened on: --host is not an address ({exc})"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is free
        try:
            sock.bind(address)
        except OSError as exc:
            return "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be listened on ({exc})"
    return None


class _StderrHandler(logging.StreamHandler):
    """Writes to the current sys.stderr, not the one at creation (tests and embedding tools swap it)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


class _OneLineFormatter(logging.Formatter):
    """Each record's line with its control characters escaped: a request's URL path reaches the server
    percent-decoded, so a client could put ESC sequences, NEL or U+2028 into a refusal's line. A traceback the
    server logs with exc_info is added after this and keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


@contextlib.contextmanager
def _logging_to_stderr(level: str):
    """The server's log lines on stderr while it runs; the loggers as they were afterwards (an embedding
    process, such as a test calling main(), keeps its own logging)."""
    ours = logging.getLogger("fedmedclip")
    quiet = ("uvicorn", "uvicorn.error", "uvicorn.access", "kserve", "kserve.trace")
    propagate, own_level, levels = ours.propagate, ours.level, [logging.getLogger(n).level for n in quiet]
    handler = _StderrHandler()
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(process)s %(name)s %(levelname)s %(message)s"))
    ours.addHandler(handler)
    ours.propagate = False  # the core CLI's root handler would print every line twice
    ours.setLevel(level)
    for name in quiet:  # uvicorn's and kserve's at WARNING: no line per connection
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        ours.removeHandler(handler)
        ours.propagate = propagate
        ours.setLevel(own_level)
        for name, quiet_level in zip(quiet, levels, strict=True):
            logging.getLogger(name).setLevel(quiet_level)


# ---- predict ----------------------------------------------------------------------------------------------
def encode_bytes_request(blobs: list[bytes]) -> tuple[bytes, int]:
    """A v2 REST request with the binary-data extension: JSON header, then the BYTES tensor (each element
    prefixed by its little-endian uint32 length). Returns (body, JSON header length)."""
    import struct

    tensor = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    image_bytes = {"name": "image_bytes", "datatype": "BYTES", "shape": [len(blobs)]}
    # No "outputs": every output the model has, as JSON (small, and easiest to read back): the probabilities,
    # and with an OOD score its `ood_score` and `out_of_distribution`.
    header = {"inputs": [{**image_bytes, "parameters": {"binary_data_size": len(tensor)}}]}
    head = json.dumps(header).encode()
    return head + tensor, len(head)


def _predict(args: argparse.Namespace) -> int:
    import requests

    if args.top < 1 or args.batch < 1:
        raise FedMedClipError("--top and --batch must be at least 1")
    if not (math.isfinite(args.timeout) and args.timeout > 0):  # requests would raise mid-request
        raise FedMedClipError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    base = args.url.rstrip("/")
    scheme, sep, _ = base.partition("://")
    if not sep:
        base = "http://" + base  # HOST:PORT
    elif scheme.lower() not in ("http", "https"):  # it was sent to http://ftp://HOST, a host named "ftp"
        raise FedMedClipError(
            f"--url {args.url}: the server speaks HTTP; give http://HOST:PORT or https://..."
        )
    if args.model is not None and not MODEL_NAME.match(args.model):  # it would ask another URL of the server
        raise FedMedClipError(f"--model {args.model!r}: {MODEL_NAME_RULE}")
    paths = [Path(p) for p in args.images]
    if folders := [str(p) for p in paths if p.is_dir()]:
        raise FedMedClipError(f"{', '.join(folders)}: a folder; give image files (e.g. {folders[0]}/*.jpg)")
    if missing := [str(p) for p in paths if not p.is_file()]:
        raise FedMedClipError(f"image file(s) not found: {', '.join(missing)}")

    def call(method: str, url: str, **kw):
        try:
            return requests.request(method, f"{base}/v2/models{url}", timeout=args.timeout, **kw)
        except requests.ConnectionError as exc:
            # urllib3's own text ("HTTPConnectionPool(host=..., port=...): Max retries exceeded with url: ...
            # (Caused by NewConnectionError(...))") says the same in 200 characters: its innermost reason.
            reason = exc.args[0] if exc.args else exc
            reason = getattr(reason, "reason", reason)
            reason = str(reason).rsplit("] ", 1)[-1].rstrip("')\"")
            raise FedMedClipError(
                f"cannot reach the server at {base} ({reason}): is `fedmedclip serve` running?"
            ) from None
        except requests.RequestException as exc:
            raise FedMedClipError(f"cannot reach the server at {base}: {exc}") from None

    def field(resp, key: str, default):
        """`key` of the server's JSON object answer, else `default` (the answer may be neither)."""
        try:
            return resp.json().get(key, default)
        except (ValueError, AttributeError):
            return default

    model = args.model
    if model is None:
        resp = call("GET", "")
        models = field(resp, "models", []) if resp.ok else []
        if not isinstance(models, list) or len(models) != 1:
            raise FedMedClipError(f"{base} serves {models or 'no listable models'}: pass --model NAME")
        model = models[0]
        if not isinstance(model, str) or not MODEL_NAME.match(model):
            raise FedMedClipError(f"{base} serves a model named {model!r}: {MODEL_NAME_RULE}")

    results = []
    for start in range(0, len(paths), args.batch):
        chunk = paths[start : start + args.batch]
        shown = [str(p) for p in chunk]  # the images as messages and results name them
        body, json_length = encode_bytes_request([p.read_bytes() for p in chunk])
        headers = {"Inference-Header-Content-Length": str(json_length)}
        resp = call("POST", f"/{model}/infer", data=body, headers=headers)
        if resp.status_code != 200:
            # The server's words, as a terminal shows them: its control characters escaped, a few lines' worth.
            detail = printable(str(field(resp, "error", resp.text))[:2000])
            raise FedMedClipError(f"{base} answered HTTP {resp.status_code} for {shown}: {detail}")
        try:  # the server's answer is read as what it claims to be: a v2 inference response
            answer = resp.json()
            outputs = {o["name"]: o for o in answer["outputs"]}
            probs = outputs["probabilities"]
            width = probs["shape"][1]
            if type(width) is not int or width < 1:  # no class to rank: `top` would be empty
                raise ValueError(
                    f"probabilities' shape {probs['shape']!r} gives each image {width!r} classes"
                )
            parameters = answer.get("parameters") or {}
            names = json.loads(parameters.get("class_names", "null") or "null")
            if not (
                isinstance(names, list) and len(names) == width and all(isinstance(n, str) for n in names)
            ):
                names = [str(k) for k in range(width)]  # no list of names the classes: their indices
            # The OOD screen, where the model has one: the score, the server's decision and its threshold (a
            # plain v2 server running the ONNX file answers the score alone).
            scores, flags = (outputs.get(n, {}).get("data") for n in ("ood_score", "out_of_distribution"))
            threshold = parameters.get("ood_threshold")
            for i, path in enumerate(shown):
                row = [
                    (c, _probability(p))
                    for c, p in zip(names, probs["data"][i * width : (i + 1) * width], strict=True)
                ]
                ranked = sorted(row, key=lambda t: -t[1])[: args.top]
                result = {"image": path, "top": [{"class": c, "probability": p} for c, p in ranked]}
                if scores is not None:
                    result["ood_score"] = _finite("ood_score", scores[i])
                    if flags is not None:
                        if type(flags[i]) is not bool:
                            raise ValueError(f"out_of_distribution {flags[i]!r} is not true or false")
                        result["out_of_distribution"] = flags[i]
                    if threshold is not None:
                        # a parameter: this server writes it as text (parameters are strings, bools, ints)
                        number = float(threshold) if isinstance(threshold, str) else threshold
                        result["ood_threshold"] = _finite("ood_threshold", number)
                results.append(result)
        except (ValueError, LookupError, TypeError, AttributeError, OverflowError) as exc:
            raise FedMedClipError(
                f"{base} answered HTTP 200 for {shown} without a v2 inference response with "
                f"`probabilities` ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    # Class names are the server's words: ESC, CR and the like are written as escapes, never sent to the
    # terminal (--json escapes them as JSON does).
    shown_class = {t["class"]: printable(str(t["class"])) for r in results for t in r["top"]}
    width = max(len(c) for c in shown_class.values())
    for r in results:
        flag = ""
        if r.get("out_of_distribution"):  # the model's own screen: its class is then no answer
            above = f" > {r['ood_threshold']:.4g}" if "ood_threshold" in r else ""
            flag = f"  OUT OF DISTRIBUTION (ood_score {r['ood_score']:.4g}{above})"
        print(f"{r['image']}: {shown_class[r['top'][0]['class']]} ({r['top'][0]['probability']:.1%}){flag}")
        for t in r["top"]:
            print(f"    {shown_class[t['class']]:<{width}}  {t['probability']:.4f}")
    return 0


def _finite(name: str, value) -> float:
    """A number of a server's JSON answer: a text ("0.5"), true or 10**400 is none (float() took the first two)."""
    if not is_finite_number(value):
        raise ValueError(f"{name} {shown(value)} is not a finite number")
    return float(value)


# A softmax computed in float32 or float16 (or another server's way) may land a rounding outside [0, 1].
PROBABILITY_ROUNDING = 1e-6


def _probability(value) -> float:
    """A server's probability, within a float's rounding of [0, 1]: read as [0, 1] (no "-0.0000")."""
    number = _finite("probability", value)
    if not -PROBABILITY_ROUNDING <= number <= 1 + PROBABILITY_ROUNDING:
        raise ValueError(f"probability {value!r} is not within [0, 1]")
    return min(max(number, 0.0), 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(args)

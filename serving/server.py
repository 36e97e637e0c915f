"""The model server process: kserve's ModelServer (REST + gRPC, /metrics, health endpoints) around our model,
with two fixes for kserve 0.21's v2 REST binary path, a request-size limit, and both servers bound to the
asked host (kserve 0.21 always listens on every interface)."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass

import orjson

from ._kserve import (
    DataPlane,
    InferInput,
    InferRequest,
    InvalidInput,
    RequestedOutput,
    grpc_server,
    kserve,
    kserve_logging,
    model_server,
    rest_server,
)
from .metrics import ERRORS
from .model import FedMedClipModel

log = logging.getLogger("fedmedclip.serving")

_HEADER_LENGTH = "inference-header-content-length"
# gRPC messages carry protobuf framing around the tensors; leave room above the image-bytes limit.
_GRPC_OVERHEAD = 1 << 20


def decode_binary_request(body: bytes, headers: dict, model_name: str) -> InferRequest:
    """Parse a v2 REST request (JSON header + binary tensors) keeping the tensors as raw bytes.

    kserve 0.21's own parser (InferRequest.from_bytes) re-encodes every binary tensor into a JSON-style
    Python list: BYTES tensors holding JPEG/PNG files fail as "not UTF-8" (HTTP 500), and a UINT8 batch of 32
    224x224 images becomes 4.8 M Python ints (1.5 s). Here the tensors stay zero-copy views of the body;
    InferInput.as_numpy() reads them with np.frombuffer / the length-prefixed BYTES decoder.
    """
    raw_length = headers.get(_HEADER_LENGTH)
    try:
        json_length = len(body) if raw_length is None else int(raw_length)
    except ValueError:
        raise InvalidInput(
            f"header Inference-Header-Content-Length must be an integer, got {raw_length!r}"
        ) from None
    if not 0 < json_length <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length {json_length} does not fit a request body of {len(body)} bytes"
        )
    try:
        header = orjson.loads(body[:json_length])
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request's JSON header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidInput('the request\'s JSON header must be an object with an "inputs" list')
    # kserve reads these without checking their types: a wrong type would be an HTTP 500 there.
    if not isinstance(header.get("parameters") or {}, dict):
        raise InvalidInput('the request\'s "parameters" must be a JSON object')
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f'the request\'s "id" must be a string, got {type(request_id).__name__}')

    view = memoryview(body)
    offset = json_length
    inputs = []
    for i, spec in enumerate(header["inputs"]):
        if not isinstance(spec, dict) or not all(k in spec for k in ("name", "shape", "datatype")):
            raise InvalidInput(f"input {i} needs 'name', 'shape' and 'datatype'")
        if not isinstance(spec["name"], str):
            raise InvalidInput(f"input {i}: 'name' must be a string, got {spec['name']!r}")
        if not isinstance(spec["shape"], list) or not isinstance(spec["datatype"], str):
            raise InvalidInput(f"input {spec['name']!r}: 'shape' must be a list and 'datatype' a string")
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"input {spec['name']!r}: 'parameters' must be a JSON object")
        inp = InferInput(name=spec["name"], shape=spec["shape"], datatype=spec["datatype"], parameters=params)
        if "data" in spec:
            inp.data = spec["data"]
        elif "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(
                    f"input {spec['name']!r}: binary_data_size must be a non-negative integer, got {size!r}"
                )
            if offset + size > len(body):
                raise InvalidInput(
                    f"input {spec['name']!r}: binary_data_size {size!r} runs past the end of the request body "
                    f"({len(body) - offset} bytes left)"
                )
            # Same attribute kserve's gRPC path fills from raw_input_contents.
            inp._raw_data = view[offset : offset + size]
            offset += size
        else:
            raise InvalidInput(
                f"input {spec['name']!r} has neither 'data' nor a 'binary_data_size' parameter"
            )
        inputs.append(inp)
    if offset != len(body):
        raise InvalidInput(
            f"{len(body) - offset} bytes after the last binary input: binary_data_size is wrong"
        )
    outputs = None
    if header.get("outputs"):
        entries = header["outputs"]
        if not isinstance(entries, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in entries
        ):
            raise InvalidInput('"outputs" must be a list of objects, each with a string "name"')
        for o in entries:
            if not isinstance(o.get("parameters") or {}, dict):
                raise InvalidInput(f"output {o['name']!r}: 'parameters' must be a JSON object")
        outputs = [RequestedOutput(name=o["name"], parameters=o.get("parameters")) for o in entries]
    return InferRequest(
        model_name=model_name,
        infer_inputs=inputs,
        request_id=request_id,
        parameters=header.get("parameters"),
        request_outputs=outputs,
    )


class FedMedClipDataPlane(DataPlane):
    def decode_inference_request(self, body, headers, model_name):
        if isinstance(body, (bytes, bytearray)):
            return decode_binary_request(bytes(body), headers, model_name)
        return super().decode_inference_request(body, headers, model_name)


class RequestSizeLimit:
    """ASGI middleware: 413 for a REST body over `max_bytes`, by Content-Length before reading it, or while
    streaming a chunked body. (gRPC has its own max_receive_message_length.)"""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, send, int(length))
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(received)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge as exc:
            if not started:
                await self._refuse(scope, send, exc.received)

    async def _refuse(self, scope, send, size: int) -> None:
        path = scope.get("path", "")
        parts = path.strip("/").split("/")
        model = parts[2] if len(parts) > 2 and parts[:2] == ["v2", "models"] else "-"
        ERRORS.labels(model, "request_too_large").inc()
        body = json.dumps(
            {
                "error": f"request body of {size:,}+ bytes is over the limit of {self.max_bytes:,} "
                "(server option --max-request-bytes)"
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    def __init__(self, received: int):
        self.received = received


class _QuietKserveLogs(logging.Filter):
    """kserve logs a full traceback for every client error (InvalidInput) and, on gRPC, one INFO line per
    call. A client sending bad files could fill the log, and per-call lines cost throughput: client errors
    become one line, per-call lines go unless --access-log."""

    def __init__(self, access_log: bool):
        super().__init__()
        self.access_log = access_log

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, InvalidInput):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "client error: %s",
                (exc,),
                None,
                None,
            )
            record.levelno, record.levelname = logging.INFO, "INFO"
            return True
        return self.access_log or not record.getMessage().startswith("grpc method:")


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"  # loopback unless asked: the cluster manifests pass --host 0.0.0.0
    http_port: int = 8080
    grpc_port: int = 8081
    enable_grpc: bool = True
    max_request_bytes: int = 64 * 1024 * 1024
    access_log: bool = False
    grace_period_s: int = 10


def configure_logging(level: str = "INFO") -> None:
    """kserve's log format for its loggers and uvicorn's; ours keep their handler (see cli._log_to_stderr)."""
    kserve_logging.configure_logging()
    logging.getLogger("fedmedclip").setLevel(level)


def _bind_to(host: str) -> None:
    """Make kserve's ModelServer create REST and gRPC servers that listen on `host` only. ModelServer builds
    them itself from these module-level names and has no host argument."""

    class HostRESTServer(rest_server.RESTServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.config.host = host  # read when uvicorn binds, after this constructor

    class HostGRPCServer(grpc_server.GRPCServer):
        async def start(self, max_workers):
            # kserve's start, with the listening address ours instead of "[::]".
            servicer = grpc_server.InferenceServicer(self._data_plane, self._model_repository_extension)
            self._server = grpc_server.aio.server(
                grpc_server.futures.ThreadPoolExecutor(max_workers=max_workers),
                interceptors=(grpc_server.LoggingInterceptor(), grpc_server.ExceptionToStatusInterceptor()),
                options=[
                    ("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                    ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
                ],
            )
            grpc_server.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                servicer, self._server
            )
            address = f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}"
            if self._server.add_insecure_port(address) == 0:
                raise OSError(f"gRPC cannot listen on {address}")
            log.info("gRPC listening on %s with %d threads", address, max_workers)
            await self._server.start()
            await self._server.wait_for_termination()

    model_server.RESTServer = HostRESTServer
    model_server.GRPCServer = HostGRPCServer


def run_server(model: FedMedClipModel, options: ServerOptions) -> None:
    """Blocks serving REST on options.http_port and gRPC on options.grpc_port until SIGTERM/SIGINT."""
    if not model.ready:
        model.load()
    if not options.access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
        logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    logging.getLogger("kserve").addFilter(_QuietKserveLogs(options.access_log))
    # kserve 0.21 still passes ORJSONResponse, which FastAPI deprecates: a warning we cannot act on.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    # kserve builds its gRPC server from this module-level namespace (ModelServer has no argument for it).
    model_server.args.grpc_max_receive_message_length = options.max_request_bytes + _GRPC_OVERHEAD
    model_server.app.add_middleware(RequestSizeLimit, max_bytes=options.max_request_bytes)
    _bind_to(options.host)
    server = kserve.ModelServer(
        http_port=options.http_port,
        grpc_port=options.grpc_port,
        enable_grpc=options.enable_grpc,
        enable_latency_logging=False,
        workers=1,  # one process: the batcher must see every request
        grace_period=options.grace_period_s,
    )
    server.dataplane = FedMedClipDataPlane(model_registry=server.registered_models)
    log.info(
        "serving %r on %s: REST :%d%s",
        model.name,
        options.host,
        options.http_port,
        f", gRPC :{options.grpc_port}" if options.enable_grpc else "",
    )
    server.start([model])

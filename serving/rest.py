"""The v2 Open Inference Protocol over REST: our own routes (a Starlette ASGI app run by uvicorn) around the
served models, answering exactly the protocol's schemas (tests/specs/open-inference-protocol/).

kserve 0.21's REST server cannot be used as it is: it mounts the model-repository extension for anyone,
validates JSON bodies with pydantic on the event loop that gRPC shares, answers FastAPI's `{"detail": ...}`
(echoing the request) for schema errors, unknown routes and methods, null `model_version`/`parameters`, 501
for versioned URLs, and logs a traceback for every client error. Here:

- every answer that is not a 200 is `{"error": string}` with a message that quotes at most a few characters of
  what the client sent, and one log line;
- the body is read with a size limit (413 from Content-Length before reading, or as soon as a chunked body
  passes it) and a deadline (408 for a body announced and not sent);
- the request is parsed off the event loop within the JSON budgets (serving.protocol), then handed to the
  model as kserve's InferRequest; the answer is kserve's InferResponse.to_rest() (binary outputs with
  Content-Type application/octet-stream and Inference-Header-Content-Length);
- versioned URLs serve the model's one version; model readiness, server readiness (every model loaded, not
  shutting down) and the in-flight count (what a shutdown drains) are the shared ServerState's.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from prometheus_client import REGISTRY, exposition
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from . import metrics
from ._kserve import InferenceError
from .errors import NotReady, RequestRejected
from .protocol import JsonParser, json_part, to_infer_request
from .state import ServerState

log = logging.getLogger("fedmedclip.serving")

JSON = "application/json"
BINARY = "application/octet-stream"


def json_response(body: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type=JSON)


def error_response(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


def refused(request: Request, exc: RequestRejected, model: str) -> Response:
    """One log line and one metric per refused request; the body is the protocol's error object."""
    metrics.ERRORS.labels(model, exc.code).inc()
    log.info(
        "refused %s %s: HTTP %d %s: %s",
        request.method,
        request.url.path[:80],
        exc.status,
        exc.code,
        exc.message,
    )
    return error_response(exc.status, exc.message)


def internal_error(request: Request, exc: Exception, model: str) -> Response:
    """A bug: one traceback in the log, and the client gets no detail."""
    metrics.ERRORS.labels(model, "internal").inc()
    log.error("internal error on %s %s", request.method, request.url.path[:80], exc_info=exc)
    return error_response(500, "internal server error")


class RestApi:
    def __init__(
        self,
        state: ServerState,
        parser: JsonParser,
        max_request_bytes: int,
        body_timeout_s: float,
    ):
        self.state, self.parser = state, parser
        self.max_request_bytes, self.body_timeout_s = max_request_bytes, body_timeout_s

    def app(self) -> Starlette:
        routes = [
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/", self.server_metadata, methods=["GET"]),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2/models", self.list_models, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [
                Route(model, self.model_metadata, methods=["GET"]),
                Route(f"{model}/ready", self.model_ready, methods=["GET"]),
                Route(f"{model}/infer", self.infer, methods=["POST"]),
            ]
        if self.state.control_enabled:
            routes += [
                Route(f"/v2/repository/models/{{name}}/{a}", self.control, methods=["POST"])
                for a in ("load", "unload")
            ]
        return Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_exception, Exception: self._internal_error},
        )

    # ---- errors ------------------------------------------------------------------------------------------

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        # Starlette's own: no route (404) or a method the route does not take (405).
        if exc.status_code == 405:
            message = f"{request.method} is not allowed here"
            reason = "method_not_allowed"
        elif exc.status_code == 404:
            message = (
                "no such endpoint: this server speaks the v2 Open Inference Protocol (GET /v2, /v2/health/live, "
                "/v2/health/ready, /v2/models/NAME[/versions/V][/ready], POST /v2/models/NAME[/versions/V]/infer)"
            )
            reason = "no_route"
        else:
            message, reason = str(exc.detail)[:200], "http_error"
        response = refused(request, RequestRejected(reason, message, exc.status_code), metrics.NO_MODEL)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        return internal_error(request, exc, metrics.NO_MODEL)

    # ---- health and metadata -----------------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        if self.state.ready():
            return json_response({"ready": True})
        why = "the server is shutting down" if self.state.draining else "a model is not loaded"
        return error_response(503, f"not ready: {why}")

    async def server_metadata(self, request: Request) -> Response:
        return json_response(self.state.metadata())

    async def list_models(self, request: Request) -> Response:
        return json_response({"models": sorted(self.state.models)})

    async def model_metadata(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")
        try:
            return json_response(self.state.model_metadata(name, version))
        except RequestRejected as exc:
            return refused(request, exc, self.state.label(name))

    async def model_ready(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")
        try:
            self.state.model_ready(name, version)
        except NotReady as exc:  # a probe's answer, not a refused request
            return error_response(503, exc.message)
        except RequestRejected as exc:
            return refused(request, exc, self.state.label(name))
        return json_response({"name": name, "ready": True})

    async def metrics(self, request: Request) -> Response:
        encoder, content_type = exposition.choose_encoder(request.headers.get("accept"))
        return Response(encoder(REGISTRY), headers={"content-type": content_type})

    # ---- model control (only with --model-control-token-file) --------------------------------------------

    async def control(self, request: Request) -> Response:
        name = request.path_params["name"]
        action = request.url.path.rsplit("/", 1)[1]
        try:
            await self.state.control(action, name, request.headers.get("authorization"))
        except RequestRejected as exc:
            return refused(request, exc, self.state.label(name))
        return json_response({"name": name, action: True})

    # ---- inference ---------------------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")

        async def read_request():
            body = await self._read_body(request)
            text, offset = json_part(body, request.headers)
            return to_infer_request(await self.parser.parse(text), body, offset, name, version)

        try:
            return self._encode(await self.state.infer(name, version, read_request, dict(request.headers)))
        except RequestRejected as exc:
            return refused(request, exc, self.state.label(name))
        except InferenceError as exc:  # the model logged and counted it (a broken model output)
            return error_response(500, str(exc))
        except ClientDisconnect:
            log.info("client went away during %s %s", request.method, request.url.path[:80])
            return Response(status_code=499)
        except Exception as exc:
            return internal_error(request, exc, self.state.label(name))

    async def _read_body(self, request: Request) -> bytes:
        """The whole body, within --max-request-bytes (413) and --body-timeout (408)."""
        limit = self.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise RequestRejected("bad_request", "Content-Length must be a non-negative integer")
            if int(length) > limit:
                raise _too_large(f"{int(length):,}", limit)
        chunks, received = [], 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(request.receive(), max(remaining, 0.0))
            except TimeoutError:
                raise RequestRejected(
                    "body_timeout",
                    f"the request body did not arrive within {self.body_timeout_s:g} s "
                    f"({received:,} bytes received; server option --body-timeout)",
                    408,
                ) from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise _too_large(f"{received:,}+", limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _encode(response) -> Response:
        body, json_length = response.to_rest()
        if json_length is None:
            return json_response(_without_nulls(body))
        return Response(
            body,
            200,
            headers={"inference-header-content-length": str(json_length)},
            media_type=BINARY,
        )


def _too_large(size: str, limit: int) -> RequestRejected:
    return RequestRejected(
        "request_too_large",
        f"request body of {size} bytes is over the limit of {limit:,} (server option --max-request-bytes)",
        413,
    )


def _without_nulls(body: dict) -> dict:
    """The protocol's optional fields are absent, never null."""
    out = {k: v for k, v in body.items() if v is not None}
    out["outputs"] = [{k: v for k, v in o.items() if v is not None} for o in body["outputs"]]
    return out

"""The v2 Open Inference Protocol over REST: our own Starlette routes (run by uvicorn) around the models,
answering exactly the protocol's schemas (tests/specs/open-inference-protocol/). Unlike kserve 0.21's REST
server: no model control for anyone, no JSON validation on the event loop gRPC shares, never FastAPI's
`{"detail": ...}` echoing the request, versioned URLs served, no traceback per client error. Every answer
that is not a 200 is `{"error": string}` quoting at most a few characters of the request, with one log line;
the body is read within a size limit (413), a deadline (408) and the server's budget of request bytes in
flight (503 with Retry-After), and parsed within the JSON budgets.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import orjson
from prometheus_client import REGISTRY, exposition
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from . import metrics
from .errors import NotReady, RequestRejected, ServerBusy, quoted
from .protocol import JsonParser, is_decimal, json_part, to_infer_request
from .state import ServerState

log = logging.getLogger("fedmedclip.serving")

_NO_ROUTE = (
    "no such endpoint: this server speaks the v2 Open Inference Protocol (GET /v2, /v2/health/live, "
    "/v2/health/ready, /v2/models/NAME[/versions/V][/ready], POST /v2/models/NAME[/versions/V]/infer)"
)

_NO_BINARY_HEADER = (
    "; a JSON header followed by binary tensor data needs the Inference-Header-Content-Length header (the "
    "JSON part's length in bytes); a compressed body is not accepted"
)


def json_response(body: dict, status: int = 200) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type="application/json"
    )


def _where(request: Request) -> str:
    return f"{request.method} {request.url.path[:80]}"


class RestApi:
    def __init__(self, state: ServerState, parser: JsonParser, body_timeout_s: float, metrics_apart: bool):
        """`metrics_apart`: /metrics is served by `metrics_app` on a port of its own (--metrics-port), not here."""
        self.state, self.parser, self.body_timeout_s = state, parser, body_timeout_s
        self.metrics_apart = metrics_apart

    def app(self) -> Starlette:
        get = {
            "/v2": self.server_metadata,
            "/v2/": self.server_metadata,
            "/v2/health/live": self.live,
            "/v2/health/ready": self.ready,
            "/v2/models": self.list_models,
            **({} if self.metrics_apart else {"/metrics": self.metrics}),
        }
        post = {}
        for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            get |= {model: self.model_metadata, f"{model}/ready": self.model_ready}
            post[f"{model}/infer"] = self.infer
        if self.state.control_enabled:
            post |= {f"/v2/repository/models/{{name}}/{a}": self.control for a in ("load", "unload")}
        routes = [Route(path, endpoint, methods=["GET"]) for path, endpoint in get.items()]
        routes += [Route(path, endpoint, methods=["POST"]) for path, endpoint in post.items()]
        # RequestRejected apart: Starlette re-raises what reaches its handler of Exception (a traceback).
        handlers = {
            RequestRejected: self._failed,
            HTTPException: self._http_exception,
            Exception: functools.partial(self._failed, label=metrics.NO_MODEL),
        }
        return Starlette(routes=routes, exception_handlers=handlers)

    def metrics_app(self) -> Starlette:
        """GET /metrics and nothing else, for --metrics-port."""

        async def elsewhere(request: Request, exc: HTTPException) -> Response:
            return json_response({"error": "this port serves GET /metrics only"}, exc.status_code)

        routes = [Route("/metrics", self.metrics, methods=["GET"])]
        return Starlette(routes=routes, exception_handlers={HTTPException: elsewhere})

    # ---- failures: one log line and one metric each; the body is the protocol's error object ----------

    async def _failed(self, request: Request, exc: Exception, label: str | None = None) -> Response:
        label = label or self.state.label(request.path_params.get("name"))
        told = self.state.failed(exc, label, _where(request), "HTTP {}".format)
        response = json_response({"error": told.message}, told.status)
        if isinstance(told, ServerBusy):
            response.headers["retry-after"] = str(told.retry_after_s)
        elif told.status == 401:  # RFC 9110 15.5.2: a 401 names the scheme that would be accepted
            response.headers["www-authenticate"] = 'Bearer realm="model control"'
        return response

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        # Starlette's own: no route (404) or a method the route does not take (405).
        reason, message = {
            404: ("no_route", _NO_ROUTE),
            405: ("method_not_allowed", f"{request.method} is not allowed here"),
        }.get(exc.status_code, ("http_error", str(exc.detail)[:200]))
        rejected = RequestRejected(reason, message, exc.status_code)
        response = await self._failed(request, rejected, metrics.NO_MODEL)
        response.headers.update(exc.headers or {})
        return response

    # ---- health, metadata, and model control (only with --model-control-token-file) --------------------

    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        if self.state.ready():
            return json_response({"ready": True})
        why = "the server is shutting down" if self.state.draining else "a model is not loaded"
        return json_response({"error": f"not ready: {why}"}, 503)

    async def server_metadata(self, request: Request) -> Response:
        return json_response(self.state.metadata())

    async def list_models(self, request: Request) -> Response:
        return json_response({"models": sorted(self.state.models)})

    async def model_metadata(self, request: Request) -> Response:
        model = self.state.model(request.path_params["name"], request.path_params.get("version"))
        return json_response(model.metadata())

    async def model_ready(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            self.state.model_ready(name, request.path_params.get("version"))
        except NotReady as exc:  # a probe's answer, not a refused request
            return json_response({"error": exc.message}, 503)
        return json_response({"name": name, "ready": True})

    async def metrics(self, request: Request) -> Response:
        encoder, content_type = exposition.choose_encoder(request.headers.get("accept"))
        return Response(encoder(REGISTRY), headers={"content-type": content_type})

    async def control(self, request: Request) -> Response:
        name, action = request.path_params["name"], request.url.path.rsplit("/", 1)[1]
        await self.state.control(action, name, request.headers.get("authorization"))
        return json_response({"name": name, action: True})

    async def infer(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")

        # The body's bytes count in --max-inflight-bytes until the request is answered, however it ends.
        with self.state.inflight.reserved() as reservation:

            async def read_request():
                body = await self._read_body(request, reservation)
                text = json_part(body, request.headers)
                try:
                    header = await self.parser.parse(text)
                except RequestRejected as exc:
                    if exc.code != "bad_json" or "inference-header-content-length" in request.headers:
                        raise
                    # A binary request without its header reads as JSON with bytes after it: say what is
                    # missing.
                    raise RequestRejected(exc.code, exc.message + _NO_BINARY_HEADER) from None
                return to_infer_request(header, body, len(text), name, version)

            try:
                return _encoded(await self.state.infer(name, version, read_request, dict(request.headers)))
            except ClientDisconnect:
                log.info("client went away during %s", _where(request))
                return Response(status_code=499)
            except Exception as exc:
                return await self._failed(request, exc)

    async def _read_body(self, request: Request, reservation) -> bytes:
        """The whole body, within --max-request-bytes (413), --body-timeout (408) and, with every other
        request's, --max-inflight-bytes (503: its bytes are held as they arrive; a Content-Length reserved before
        a byte arrived let 16 heads announcing 64 MiB, 2 kB sent, keep every other client out)."""
        limit, received = self.state.inflight.limits.max_request_bytes, 0
        length = request.headers.get("content-length")
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            # A client compressing its body (gzip, br) got 'not valid JSON' for a valid request. The body is
            # read as sent: inflating a client's bytes would need a bound of its own (a gzip bomb).
            raise RequestRejected(
                "bad_request",
                f"Content-Encoding {quoted(encoding)} is not supported: send the body uncompressed",
                415,
            )
        if length is not None:
            if not is_decimal(length):
                raise RequestRejected("bad_request", "Content-Length must be a non-negative integer")
            length = int(length)
            if length > limit:
                raise _too_large(f"{length:,}", limit)

        async def read() -> bytes:
            nonlocal received
            chunks = []
            async for chunk in request.stream():  # ClientDisconnect if the client goes away
                received += len(chunk)
                if received > limit:
                    raise _too_large(f"{received:,}+", limit)
                reservation.grow_to(received)
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            body = await asyncio.wait_for(read(), self.body_timeout_s)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise RequestRejected(
                "body_timeout",
                f"the request body did not arrive within {self.body_timeout_s:g} s "
                f"({received:,} bytes received; server option --body-timeout)",
                408,
            ) from None
        if length is not None and len(body) != length:
            # uvicorn's httptools parser stops at the head of a request asking for an Upgrade it does not
            # make (`curl --http2` sends `Upgrade: h2c`), and the body ends there: not a protocol error of
            # the client's own, so the client is told what to leave out rather than that its JSON is empty.
            raise RequestRejected(
                "bad_request",
                f"the request body ended after {len(body):,} of its Content-Length {length:,} bytes; "
                "a request with 'Connection: Upgrade' is read without its body: this server speaks HTTP/1.1 "
                "only, send it without Upgrade (e.g. not with curl --http2)",
            )
        return body


def _encoded(response) -> Response:
    body, json_length = response.to_rest()
    if json_length is None:  # the protocol's optional fields are absent, never null
        body = {k: v for k, v in body.items() if v is not None}
        body["outputs"] = [{k: v for k, v in o.items() if v is not None} for o in body["outputs"]]
        return json_response(body)
    headers = {"inference-header-content-length": str(json_length)}
    return Response(body, 200, headers=headers, media_type="application/octet-stream")


def _too_large(size: str, limit: int) -> RequestRejected:
    return RequestRejected(
        "request_too_large",
        f"request body of {size} bytes is over the limit of {limit:,} (server option --max-request-bytes)",
        413,
    )

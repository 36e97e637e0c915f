"""What the REST and gRPC front ends share: the served models by name, whether the server is ready, the
requests in flight (what a shutdown waits for), model metadata, model control with its optional token, and
what a failed request tells the client (`failed`). Each front end only reads its transport's request and maps
the HTTP status of a `RequestRejected` to its own."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import threading

from fedmedclip import __version__

from . import metrics
from ._kserve import InferenceError
from .errors import NotReady, NotServed, RequestRejected, ServerBusy, ServingError, quoted
from .options import Limits

log = logging.getLogger("fedmedclip.serving")

# Longest an unload waits for the requests inside the model: one request's decoding budget and its run.
UNLOAD_WAIT_S = 60.0


class InFlightBytes:
    """The request bytes the server holds at once, REST bodies and gRPC messages of every client together,
    within --max-inflight-bytes. The per-request limits alone let enough clients, each sending a body within
    --max-request-bytes slowly within --body-timeout, fill the server's memory. Each request holds its bytes
    (`reserved`) as they arrive and gives them back when it is answered, whatever happened to it. REST
    and gRPC share one event loop; the lock keeps the count right from any thread all the same."""

    def __init__(self, limits: Limits):
        self.limits, self.held, self._lock = limits, 0, threading.Lock()

    @contextlib.contextmanager
    def reserved(self):
        """A reservation, of nothing until it grows (`_Reservation.grow_to`), given back when the block is
        left, however."""
        reservation = _Reservation(self)
        try:
            yield reservation
        finally:
            reservation.release()


class _Reservation:
    def __init__(self, budget: InFlightBytes):
        self.budget, self.bytes = budget, 0

    def grow_to(self, size: int) -> None:
        """Hold `size` bytes in all (a Content-Length, the bytes of a chunked body so far, a gRPC message),
        else ServerBusy. A request is admitted when no other holds anything: a budget as small as
        --max-request-bytes still serves the largest request, gRPC's framing around it included."""
        budget, more = self.budget, size - self.bytes
        if more <= 0:
            return
        with budget._lock:
            others = budget.held - self.bytes
            if others and budget.held + more > budget.limits.max_inflight_bytes:
                busy = budget.limits.exceeded(
                    "server_busy",
                    "max_inflight_bytes",
                    f"the server is busy: {others:,} bytes of other requests in flight and this request's "
                    f"{size:,} would be",
                    f"; retry after {ServerBusy.retry_after_s} s",
                )
                raise ServerBusy(busy.message)
            budget.held += more
            metrics.BYTES_HELD.set(budget.held)
        self.bytes = size

    def release(self) -> None:
        with self.budget._lock:
            self.budget.held -= self.bytes
            metrics.BYTES_HELD.set(self.budget.held)
        self.bytes = 0


class ServerState:
    def __init__(self, models: dict, control_token: str | None, limits: Limits):
        """`models`: name -> FedMedClipModel (already loaded). `control_token`: enables model control for
        requests that present it (`Authorization: Bearer TOKEN`); None: no model control at all. `limits`: its
        --max-inflight-bytes bounds `inflight`, the request bytes REST and gRPC hold at once."""
        self.models, self.draining, self.in_flight = dict(models), False, 0
        # Inferences inside each model now (an unload waits for them), and one control action per model at once.
        self._running = dict.fromkeys(self.models, 0)
        self._control_locks = {name: asyncio.Lock() for name in self.models}
        self.inflight = InFlightBytes(limits)
        self.control_enabled = control_token is not None
        # Digests compare in constant time whatever the length of the token presented.
        self._control_digest = hashlib.sha256((control_token or "").encode()).digest()
        # Read at each scrape: they cannot lag behind the state.
        metrics.READY.set_function(self.ready)
        metrics.IN_FLIGHT.set_function(lambda: self.in_flight)

    def ready(self) -> bool:
        """Ready to serve: not shutting down, and every model loaded (the protocol's "server ready")."""
        return not self.draining and all(m.ready for m in self.models.values())

    def label(self, name: str | None) -> str:
        """The `model` label of a request naming `name`: itself if it is served, else UNKNOWN_MODEL; NO_MODEL
        for a request naming none (None)."""
        if name is None:
            return metrics.NO_MODEL
        return name if name in self.models else metrics.UNKNOWN_MODEL

    def failed(self, exc: Exception, label: str, where: str, status_text) -> RequestRejected:
        """What the client is told of a request that failed, counted and logged once (`status_text`: the
        transport's name of an HTTP status): a refusal as it is; a broken model output (the model counted
        and logged it) with its message; a bug as a 500 without detail, its traceback in the log."""
        if isinstance(exc, RequestRejected):
            metrics.ERRORS.labels(label, exc.code).inc()
            log.info("refused %s: %s %s: %s", where, status_text(exc.status), exc.code, exc.message)
            return exc
        if isinstance(exc, InferenceError):
            return RequestRejected("non_finite_output", str(exc), 500)
        metrics.ERRORS.labels(label, "internal").inc()
        log.error("internal error in %s", where, exc_info=exc)
        return RequestRejected("internal", "internal server error", 500)

    def model(self, name: str, version: str | None = None, *, ready: bool = True):
        model = self.models.get(name)
        if model is None:
            raise NotServed(
                f"this server serves no model {quoted(name)}; it serves {sorted(self.models)} "
                "(GET /v2/models lists them)"
            )
        if version not in (None, "", model.version):
            raise NotServed(
                f"model {name!r} has no version {quoted(version)}; it serves version {model.version!r}"
            )
        if ready and not model.ready:
            raise NotReady(f"model {name!r} is not loaded")
        return model

    def model_ready(self, name: str, version: str | None = None) -> None:
        """The protocol's model readiness: loaded, and the server not shutting down (inference requests are
        still answered while it drains; only the probes say not ready, so load balancers stop sending)."""
        self.model(name, version)
        if self.draining:
            raise NotReady(f"model {name!r} is not ready: the server is shutting down")

    async def infer(self, name: str, version: str | None, read_request, headers: dict):
        """One inference: the named model answers the request that `read_request()` (a coroutine reading and
        checking the transport's message) gives. Counted in flight, what a shutdown waits for."""
        self.in_flight += 1
        try:
            self.model(name, version)  # not served, or not loaded: refused before the message is read
            request = await read_request()
            # Again once it has come: the model may have been unloaded meanwhile (model control).
            model = self.model(name, version)
            self._running[name] += 1
            try:
                response, _ = await model(request, headers=headers)
            finally:
                self._running[name] -= 1
            return response
        finally:
            self.in_flight -= 1

    def metadata(self) -> dict:
        # The binary tensor data extension (Inference-Header-Content-Length) is always on; model control
        # (POST /v2/repository/models/NAME/load|unload, gRPC RepositoryModelLoad|Unload) only with a token.
        extensions = ["binary_tensor_data", *(["model_repository"] if self.control_enabled else [])]
        return {"name": "fedmedclip", "version": __version__, "extensions": extensions}

    async def control(self, action: str, name: str, authorization: str | None) -> None:
        """Model control, `load` or `unload` of `name`, for a request presenting the token (else 401)."""
        if not self.control_enabled:
            raise RequestRejected("control_disabled", "model control is disabled on this server", 501)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise RequestRejected("unauthenticated", "model control needs 'Authorization: Bearer TOKEN'", 401)
        if not hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), self._control_digest):
            raise RequestRejected("unauthenticated", "model control refused: wrong token", 401)
        model = self.model(name, ready=False)
        async with self._control_locks[name]:  # a load and an unload of one model never interleave
            if action == "unload":
                await self._unload(name, model)
                return
            try:  # from its verified file, checked against the same sha256; off the event loop
                if not model.ready:
                    await asyncio.get_running_loop().run_in_executor(None, model.load)
            except ServingError as exc:  # the file changed or went away: the operator is told why
                raise RequestRejected("load_failed", f"model {name!r} cannot be loaded: {exc}", 500) from None
            log.warning("model %r loaded (model control)", name)

    async def _unload(self, name: str, model) -> None:
        """Stop serving `model` and free its session (`load` opens the file again): new requests are refused
        (503) at once; those already inside it finish first, at most UNLOAD_WAIT_S. Stopping it under them
        cancelled their decoding and took their batcher away: a text/plain 500 and a traceback each."""
        model.ready = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UNLOAD_WAIT_S
        while self._running[name] and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self._running[name]:
            log.warning("unloading model %r with %d request(s) still inside it", name, self._running[name])
        model.stop()
        model.classifier = None
        log.warning("model %r unloaded (model control): the server is not ready until loaded again", name)

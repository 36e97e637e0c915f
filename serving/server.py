"""The server process: REST (uvicorn, serving/rest.py) and gRPC (grpc.aio, serving/grpc_service.py) on one
event loop, around one or more named models, both bound to the asked host only; with --metrics-port,
/metrics on that port alone.

Shutdown (SIGTERM, SIGINT): readiness turns false at once on REST and gRPC while both keep answering, so
load balancers stop sending; after --drain-seconds, and once no request is in flight (at most
--grace-period seconds more), the ports close and the process exits 0, after removing the temporary folder
a registry model was downloaded into without --cache-dir (serving/cli.py, which also handles a SIGTERM that
comes before these handlers: exit 143, the folder removed). A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import time

import uvicorn

from ._uvicorn import Server, head_deadline_protocol
from .grpc_service import build_server
from .options import ServerOptions
from .protocol import Budget, JsonParser
from .rest import RestApi
from .state import ServerState

log = logging.getLogger("fedmedclip.serving")

# gRPC messages carry protobuf framing around the tensors; leave room above the image-bytes limit.
_GRPC_OVERHEAD = 1 << 20


async def serve(models: list, options: ServerOptions) -> None:
    """Serve `models` (loaded FedMedClipModels, distinct names) until SIGTERM/SIGINT."""
    # Every model has the same options (one `serve` command, serving/cli.py): their limits are the server's.
    limits = models[0].options.limits
    models = {m.name: m for m in models}
    if options.access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    state = ServerState(models, options.control_token, limits)
    # The largest JSON tensor any served model accepts: a full UINT8 batch of its image size.
    largest = max(
        m.options.limits.max_batch_images * m.classifier.contract.image_size**2 * 3 for m in models.values()
    )
    parser = JsonParser(
        Budget(max_elements=largest, max_bytes_elements=limits.max_batch_images),
        processes=options.json_workers,
    )
    await asyncio.get_running_loop().run_in_executor(None, parser.warm_up)
    api = RestApi(state, parser, options.body_timeout, options.metrics_port is not None)

    def http_server(app, port: int, access_log: bool) -> Server:
        config = uvicorn.Config(
            app,
            host=options.host,
            port=port,
            log_config=None,
            lifespan="off",
            http=head_deadline_protocol(options.body_timeout),
            # No WebSocket route: an `Upgrade: websocket` request is answered as HTTP, with the protocol's
            # errors, rather than by uvicorn's WebSocket handshake (text/plain 400, empty 403).
            ws="none",
            access_log=access_log,
            timeout_graceful_shutdown=int(options.grace_period),
        )
        return Server(config)

    http_servers = {"rest": http_server(api.app(), options.http_port, options.access_log)}
    # /metrics apart: what it counts is other clients' business, and a port of its own can be reached by
    # Prometheus only (infra/serving/networkpolicy.yaml).
    if options.metrics_port is not None:
        http_servers["metrics"] = http_server(api.metrics_app(), options.metrics_port, False)
    grpc_server = None
    if not options.no_grpc:
        host = f"[{options.host}]" if ":" in options.host else options.host
        grpc_server = build_server(
            state,
            parser.budget,
            f"{host}:{options.grpc_port}",
            limits.max_request_bytes + _GRPC_OVERHEAD,
            options.body_timeout,
        )
        await grpc_server.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_AcceptErrors())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, sig)
    tasks = {asyncio.create_task(server.serve(), name=name) for name, server in http_servers.items()}
    log.info(
        "serving %s on %s: REST :%d%s%s; model control %s",
        ", ".join(f"{n!r} (version {m.version})" for n, m in models.items()),
        options.host,
        options.http_port,
        f", gRPC :{options.grpc_port}" if grpc_server else "",
        f", /metrics :{options.metrics_port} only" if "metrics" in http_servers else "",
        "enabled (token)" if options.control_token else "disabled",
    )
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({*tasks, stopped}, return_when=asyncio.FIRST_COMPLETED)

    # Not ready first, both protocols, while still serving; then drain; then close the ports.
    state.draining = True
    started = time.monotonic()
    log.info(
        "shutting down: not ready now; serving for %g s more and until %d request(s) in flight finish",
        options.drain_seconds,
        state.in_flight,
    )
    deadline = started + options.drain_seconds + options.grace_period
    while time.monotonic() < deadline and not any(task.done() for task in tasks):
        if time.monotonic() - started >= options.drain_seconds and state.in_flight == 0:
            break
        await asyncio.sleep(0.05)
    log.info("closing the ports (%d request(s) still in flight)", state.in_flight)
    for server in http_servers.values():
        server.should_exit = True
    if grpc_server is not None:
        await grpc_server.stop(grace=max(1.0, deadline - time.monotonic()))
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks)
    for model in models.values():
        model.stop()
    parser.shutdown()
    log.info("stopped")


class _AcceptErrors:
    """The event loop's exception handler: a listening socket that cannot accept a connection for want of file
    descriptors (every one held by open connections: a client opening thousands, each closed only after
    --body-timeout without a request) is one log line, at most every ACCEPT_LOG_EVERY_S seconds; anything else
    goes to asyncio's own handler. asyncio (3.10 to 3.12) tries the accept once per connection waiting, up to
    uvicorn's backlog of 2048 each time, and logs every failure with its traceback: 59,120 tracebacks (355,000
    lines) in five seconds."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self) -> None:
        self._last, self._missed = -math.inf, 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if isinstance(context.get("exception"), (OSError, ValueError)) and "._start_serving" in repr(
            context.get("handle")
        ):
            # One of asyncio's retries after a failed accept, come after its socket closed (a shutdown): as many
            # tracebacks as the failed accepts of the last second.
            self._missed += 1
            return
        if context.get("message") != self.MESSAGE:
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last < ACCEPT_LOG_EVERY_S:
            self._missed += 1
            return
        log.error(
            "cannot accept new connections: %s (%d more times since the last such line); open connections "
            "hold the process's file descriptors, idle ones until --body-timeout",
            context.get("exception"),
            self._missed,
        )
        self._last, self._missed = now, 0


ACCEPT_LOG_EVERY_S = 10.0


def _on_signal(stop: asyncio.Event, sig: int) -> None:
    if stop.is_set():  # a second signal: do not wait any longer
        log.warning("second %s: exiting now", signal.Signals(sig).name)
        raise SystemExit(1)
    log.info("%s received", signal.Signals(sig).name)
    stop.set()

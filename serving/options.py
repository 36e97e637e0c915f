"""The settings of `fedmedclip serve`, each declared once (fedmedclip.flags.setting): the flags, their checks
and the server's objects come from here. Standard library only: the core CLI imports it to add the flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

from fedmedclip.errors import ConfigError
from fedmedclip.flags import MAX_THREADS, check_declared, declared, setting

from .errors import RequestRejected


def _declare(group: str, default, help: str, **kwargs):
    """setting() whose help, for a flag that takes a value and has a default, ends with that default."""
    suffix = "" if isinstance(default, bool) or default is None else " (default: %(default)s)"
    return setting(default, help=help + suffix, group=group, **kwargs)


# The most processes parsing JSON bodies and ONNX Runtime runs in flight: each holds a model's worth of memory
# (a process, or a run's buffers), so far fewer than threads.
MAX_JSON_WORKERS, MAX_BATCH_CONCURRENCY = 64, 64

_server, _model, _limit, _batching, _monitor = (
    partial(_declare, group)
    for group in ("serving", "serving model", "serving limits", "serving batching", "serving monitoring")
)


class _Checked:
    """Checked against their declarations when made, from the command line or in code; `within`: float fields
    -> the open interval each must lie in (a declared minimum is inclusive)."""

    within: dict[str, tuple[float, float]] = {}

    def __post_init__(self) -> None:
        check_declared(self)
        for name, (low, high) in self.within.items():
            value = getattr(self, name)
            if not low < value < high:
                bound = "positive" if (low, high) == (0, math.inf) else f"in ({low}, {high})"
                raise ConfigError(f"--{name.replace('_', '-')} must be {bound}, got {value}")


@dataclass(frozen=True)
class Limits(_Checked):
    """Per-request limits, and the server-wide budget of request bytes they add up to. Defaults fit a GPU
    server taking scans of up to ~6000x6000 pixels."""

    # Each limit's metavar is its unit: the flag's help shows it, and a refusal names the limit with it.
    max_batch_images: int = _limit(64, "images per request", minimum=1, metavar="IMAGES")
    max_image_pixels: int = _limit(
        40_000_000,
        "width*height of one encoded image, checked from its header before decoding",
        minimum=1,
        metavar="PIXELS",
    )
    max_request_bytes: int = _limit(
        64 * 1024 * 1024,
        "request body (REST) / message (gRPC, at most 2 GiB whatever this says) size limit",
        minimum=1,
        metavar="BYTES",
    )
    max_request_pixels: int = _limit(
        64 * 2048 * 2048,
        "total width*height of one request's encoded images, from their headers before any is decoded; "
        "the default is 64 images of 2048x2048",
        minimum=1,
        metavar="PIXELS",
    )
    max_decode_seconds: float = _limit(
        10.0,
        "CPU time decoding one request's encoded images may take; a request over it is refused",
        metavar="SECONDS",
    )
    max_inflight_bytes: int = _limit(
        1024**3,
        "request bytes the whole server holds at once, REST bodies and gRPC messages of every client "
        "together, at least --max-request-bytes; a request that would go over it is refused with 503 and "
        "Retry-After before its body is read (gRPC: RESOURCE_EXHAUSTED once its message has come)",
        minimum=1,
        metavar="BYTES",
    )

    within = {"max_decode_seconds": (0, math.inf)}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_inflight_bytes < self.max_request_bytes:
            # Refused, not raised to fit: an operator lowering one budget must not find the other moved.
            raise ConfigError(
                f"--max-inflight-bytes {self.max_inflight_bytes:,} is below --max-request-bytes "
                f"{self.max_request_bytes:,}: the budget of every request at once must hold one of the "
                "largest size allowed; raise --max-inflight-bytes or lower --max-request-bytes"
            )

    def exceeded(
        self, code: str, limit: str, what: str, after: str = "", status: int = 400
    ) -> RequestRejected:
        """The refusal of a request for `what`, over the limit `limit`, naming the server option that sets it."""
        d = _declaration(type(self), limit)
        unit, flag = d.meta["metavar"].lower(), d.flags[0]
        return RequestRejected(
            code,
            f"{what} over the limit of {getattr(self, limit):,} {unit} (server option {flag}){after}",
            status,
        )


@cache
def _declaration(cls, name: str):
    """The declaration of field `name` of `cls`, read once (a refusal is a path a client can drive)."""
    return next(d for d in declared(cls) if d.name == name)


@dataclass(frozen=True)
class Batching(_Checked):
    """Server-side dynamic batching (serving/batcher.py)."""

    max_batch_size: int = _batching(32, "images per ONNX Runtime run", minimum=1)
    max_batch_delay_ms: float = _batching(
        2.0, "longest a request waits for others to share its run", minimum=0
    )
    batch_concurrency: int = _batching(
        1,
        f"ONNX Runtime runs in flight at once, at most {MAX_BATCH_CONCURRENCY}; 2 can overlap host work with a "
        "GPU run",
        minimum=1,
        maximum=MAX_BATCH_CONCURRENCY,
    )


@dataclass(frozen=True)
class MonitorOptions(_Checked):
    """What the server watches in its answers (serving/monitor.py)."""

    ood_window: int = _monitor(
        200,
        "images over which fedmedclip_ood_window_rate is the share flagged out_of_distribution",
        minimum=1,
    )
    drift_window: int = _monitor(
        200, "recent images whose embeddings the drift test compares with the exported reference", minimum=2
    )
    drift_every: int = _monitor(
        50, "run the drift test again after this many new images; at most one runs at a time", minimum=1
    )
    drift_permutations: int = _monitor(100, "permutations of the MMD test", minimum=10)
    drift_p_value: float = _monitor(
        0.05, "level of the reported MMD^2 threshold (fedmedclip_drift_mmd2_threshold), in (0, 1)"
    )
    within = {"drift_p_value": (0, 1)}


@dataclass(frozen=True)
class ModelOptions(_Checked):
    """How each served model runs: ONNX Runtime's device and threads, image decoding, and the settings above."""

    device: str = _model(
        "auto",
        "auto: CUDA if it works, else CPU; cuda: refuse to start without a working CUDA provider",
        choices=("auto", "cuda", "cpu"),
    )
    ort_threads: int = _model(
        0,
        f"ONNX Runtime intra-op threads, at most {MAX_THREADS}, 0 = its default",
        minimum=0,
        maximum=MAX_THREADS,
    )
    ort_spin: bool = _model(
        False,
        "let idle ONNX Runtime threads busy-wait (off: they would take CPU from decoding and request handling)",
    )
    decode_threads: int = _model(
        0,
        "threads decoding encoded images, shared fairly between requests (one request uses at most half), at "
        f"most {MAX_THREADS}; 0 = one per core, at most 8",
        minimum=0,
        maximum=MAX_THREADS,
    )
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)
    monitoring: MonitorOptions = field(default_factory=MonitorOptions)


@dataclass(frozen=True)
class ServerOptions(_Checked):
    """The server process (serving/server.py): addresses, REST bodies, shutdown, JSON parsing, model control."""

    host: str = _server(
        "127.0.0.1",
        "address to listen on, REST and gRPC: by default this machine only; 0.0.0.0 for every interface, as "
        "in a container",
    )
    http_port: int = _server(8080, "REST port")
    grpc_port: int = _server(8081, "gRPC port")
    metrics_port: int | None = _server(
        None,
        "serve /metrics on this port, and only there (not on --http-port): its counters show what other clients' "
        "requests held (how many images, their pixel counts, whether they were out of distribution), so a "
        "network policy should let the monitoring system reach it and inference clients not",
    )
    no_grpc: bool = _server(False, "serve REST only")
    access_log: bool = _server(False, "log every request (off: it costs throughput)")
    body_timeout: float = _server(
        30.0,
        "seconds a request body (REST) or request message (gRPC) may take to arrive; one announced and not sent "
        "gets 408 (gRPC DEADLINE_EXCEEDED). Also the longest a connection is kept waiting for a request head "
        "(REST) or a call (gRPC)",
    )
    drain_seconds: float = _server(
        5.0,
        "on SIGTERM: seconds the server keeps answering while its readiness says no (so load balancers stop "
        "sending) before the ports close",
        minimum=0,
    )
    grace_period: float = _server(
        30.0, "on SIGTERM, after the drain: longest wait in seconds for requests still in flight", minimum=0
    )
    json_workers: int = _server(
        1,
        f"processes parsing large JSON request bodies off the server's interpreter, at most {MAX_JSON_WORKERS} "
        "(0: threads only)",
        minimum=0,
        maximum=MAX_JSON_WORKERS,
    )
    log_level: str = _server("INFO", "the server's log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    model_control_token_file: str | None = _server(
        None,
        "enable model control (POST /v2/repository/models/NAME/load|unload, gRPC RepositoryModelLoad|Unload) for "
        "requests with `Authorization: Bearer TOKEN`, TOKEN being this file's content (at least 32 characters). "
        "Without it, no model can be loaded or unloaded over the network",
    )
    # The file's token, read when made (or given in code): it enables model control; never in a repr.
    control_token: str | None = field(default=None, repr=False)
    within = {"body_timeout": (0, math.inf)}

    def __post_init__(self) -> None:
        super().__post_init__()
        ports = self.ports()
        for flag, port in ports:
            if not 0 < port < 65536:
                raise ConfigError(f"{flag} must be a TCP port, got {port}")
        if len({port for _, port in ports}) != len(ports):
            raise ConfigError(f"{', '.join(flag for flag, _ in ports)} must differ")
        path = self.model_control_token_file
        if path is not None and self.control_token is None:
            try:
                token = Path(path).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"--model-control-token-file: cannot read {path}: {exc}") from None
            object.__setattr__(self, "control_token", token)  # frozen: set once, as it is made
        if self.control_token is not None and (
            len(self.control_token) < 32 or any(c.isspace() for c in self.control_token)
        ):
            where = f"--model-control-token-file {path}" if path is not None else "the model-control token"
            raise ConfigError(
                f"{where}: the token must be one word of at least 32 characters (e.g. `openssl rand -hex 32`)"
            )

    def ports(self) -> list[tuple[str, int]]:
        """(flag, port) of each port the server listens on."""
        grpc = None if self.no_grpc else self.grpc_port
        ports = {"--http-port": self.http_port, "--grpc-port": grpc, "--metrics-port": self.metrics_port}
        return [(flag, port) for flag, port in ports.items() if port is not None]

"""What this server takes from uvicorn beyond its public settings, and only here (tests/test_serving_protocol.py
fails if the pinned version, constraints.txt's, changes underneath; tests/test_serving_hardening.py's slow
clients exercise both):

- `Server` without its signal handling (`capture_signals`, a method uvicorn calls around `serve`): the
  process shuts REST and gRPC down in its own order (serving/server.py).
- `head_deadline_protocol`: its HTTP protocol (`AutoHTTPProtocol`: httptools, else h11) with a deadline on the
  request head, written against the protocol's `cycle`, `loop`, `transport` and its `connection_made`,
  `data_received`, `on_response_complete` and `connection_lost`; uvicorn has no setting for it.
"""

from __future__ import annotations

import contextlib
import logging

import orjson
import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from . import metrics

PINNED_VERSION = "0.55.0"

log = logging.getLogger("fedmedclip.serving")


class Server(uvicorn.Server):
    """uvicorn without its own signal handling: this process shuts REST and gRPC down in its own order."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def head_deadline_protocol(seconds: float) -> type:
    """uvicorn's HTTP protocol (httptools, else h11: what its `http="auto"` picks) that closes a connection
    whose request head (request line and headers) has not arrived `seconds` after the connection opened or its
    previous response went out, with a 408 if part of one came. uvicorn waits for a head for good: connections
    opened and left silent, or fed a header byte at a time, were held until the process ran out of file
    descriptors, and then its probes failed too. Once a head is in, the body has --body-timeout (RestApi)."""

    class HeadDeadline(AutoHTTPProtocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_head()

        def data_received(self, data: bytes) -> None:
            self._head_bytes += len(data)
            super().data_received(data)

        def connection_lost(self, exc) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            self._stop_waiting()
            # A head that arrives makes a new request cycle: the timer then finds another one and does nothing.
            self._head_bytes, self._cycle_before = 0, self.cycle
            self._head_timer = self.loop.call_later(seconds, self._head_late)

        def _stop_waiting(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if self.cycle is not self._cycle_before or self.transport.is_closing():
                return
            if self._head_bytes:  # a request began: say why it is refused; a silent connection is just closed
                message = (
                    f"the request head did not arrive within {seconds:g} s ({self._head_bytes:,} bytes received; "
                    "server option --body-timeout)"
                )
                metrics.ERRORS.labels(metrics.NO_MODEL, "body_timeout").inc()
                log.info("refused a connection: HTTP 408 body_timeout: %s", message)
                body = orjson.dumps({"error": message})
                self.transport.write(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
                )
            self.transport.close()

    return HeadDeadline

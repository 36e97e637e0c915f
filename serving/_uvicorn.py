"""What this server takes from uvicorn beyond its public settings, and only here (tests/test_serving_protocol.py
fails if the pinned version, constraints.txt's, changes underneath; tests/test_serving_hardening.py's slow
clients exercise both):

- `Server` without its signal handling (`capture_signals`, a method uvicorn calls around `serve`): the
  process shuts REST and gRPC down in its own order (serving/server.py).
- `head_deadline_protocol`: its HTTP protocol (`AutoHTTPProtocol`: httptools, else h11) with a deadline on the
  request head and a bound on its size, written against the protocol's `cycle`, `loop`, `transport`, the
  httptools protocol's `pipeline` (requests whose head is in, waiting for the one being answered),
  `on_message_begin`, `on_headers_complete`, `on_body` and `on_message_complete` (and httptools' own
  `on_chunk_header`, which it calls on a protocol that has it), and its `connection_made`, `data_received`,
  `on_response_complete` and `connection_lost`; uvicorn has no setting for either. The same protocol refuses
  more than MAX_PIPELINED requests waiting on one connection (429) and lets go of a connection whose client
  reads no answer for the deadline (its `pause_writing`, `resume_writing`). Its `send_400_response`
  (what uvicorn answers a request that is not valid HTTP/1.1) is replaced: it answered text/plain, not the
  protocol's error object; so is `_unsupported_upgrade_warning` (its warnings, one to install a WebSocket
  library, for each request with an Upgrade header it does not make): the bytes after such a request's head
  (llhttp ends the request there) are dropped and the connection closed after its answer.
"""

from __future__ import annotations

import contextlib
import logging

import orjson
import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from . import metrics

PINNED_VERSION = "0.55.0"

# A request head (request line and headers) still incomplete past this is refused with 431: v2 clients send a
# few hundred bytes; proxies in front of servers allow 8 to 64 KiB. Counted at the end of each network read
# (at most 256 KiB), so a head that arrives whole in one read is parsed whatever its size below that.
MAX_HEAD_BYTES = 64 * 1024

# The most requests one connection may have waiting behind the one being answered (HTTP/1.1 pipelining, which v2
# clients do not use): httptools parses a whole network read at once, and a 256 KiB read of 6,393 small GETs
# whose answers were never read held 6.4 MiB per connection, outside every limit.
MAX_PIPELINED = 16

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
    descriptors, and then its probes failed too. Once a head is in, the body has --body-timeout (RestApi).
    A head, or the trailers of a chunked body, over MAX_HEAD_BYTES is refused with 431 and the connection
    closed: httptools keeps every header in memory, with no bound of its own, until the head (or the body)
    ends, so one client sending headers for `seconds` made the server hold gigabytes, outside
    --max-inflight-bytes."""

    class HeadDeadline(AutoHTTPProtocol):
        _head_timer, _in_message, _in_head, _head_size, _heads_begun = None, False, False, 0, 0
        # After a chunk's size line, before its data: the last chunk's trailers come here.
        _in_chunk_header, _bodies = False, 0
        # A request asked for an Upgrade this server does not make: llhttp ended it at its head, and what
        # follows on the connection is its unread body, not a request.
        _after_upgrade = False
        _pipelined_over, _write_timer = False, None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_head()

        def on_response_complete(self) -> None:
            latest, queued = self.cycle, bool(getattr(self, "pipeline", None))
            super().on_response_complete()
            if queued or self.cycle is not latest:
                # The next request's head came with this one's (pipelined) and is being answered now: what
                # arrives is its body, neither late nor part of a head.
                self._stop_waiting()
            else:
                self._await_head()

        def data_received(self, data: bytes) -> None:
            if self._after_upgrade:
                # Fed to the parser, a body's bytes were a request with an invalid method: its 400 raced the
                # application's answer to the request (tests/test_serving_protocol.py's Upgrade test).
                return
            self._head_bytes += len(data)
            # The bytes of a head or of trailers (httptools only: h11 bounds a head itself, at 16 KiB): a
            # chunk that goes on with a head, or begins one while no request was being read; a chunk of
            # trailers only (between the last chunk's size line and the end of the body, no data). A chunk
            # ending one request and beginning the next (pipelining), or the one where trailers begin, is not
            # counted: headers are refused past MAX_HEAD_BYTES and that one chunk at most, never below it.
            in_head, in_chunk_header, idle = self._in_head, self._in_chunk_header, not self._in_message
            self._heads_begun = self._bodies = 0
            super().data_received(data)
            begun, bodies = self._heads_begun, self._bodies
            if (self._in_head and ((in_head, begun) == (True, 0) or (idle, begun) == (True, 1))) or (
                self._in_chunk_header and in_chunk_header and (begun, bodies) == (0, 0)
            ):
                self._head_size += len(data)
                if self._head_size > MAX_HEAD_BYTES and not self.transport.is_closing():
                    self._refuse(
                        431,
                        b"Request Header Fields Too Large",
                        "head_too_large",
                        f"the request head (request line and headers), or its trailers, are over "
                        f"{MAX_HEAD_BYTES:,} bytes",
                    )

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_message, self._in_head, self._head_size = True, True, 0
            self._heads_begun += 1

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()
            if len(getattr(self, "pipeline", ())) > MAX_PIPELINED:
                # Raised in the parser's callback: httptools stops there and uvicorn calls send_400_response.
                self._pipelined_over = True
                raise RuntimeError("too many pipelined requests")

        def pause_writing(self) -> None:
            # The client reads none of its answers: its connection (and what waits on it) is let go after
            # `seconds`, as a head that does not come is; uvicorn waits for the client to read for good.
            super().pause_writing()
            self._stop_write_wait()
            self._write_timer = self.loop.call_later(seconds, self._write_late)

        def resume_writing(self) -> None:
            self._stop_write_wait()
            super().resume_writing()

        def _stop_write_wait(self) -> None:
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _write_late(self) -> None:
            self._write_timer = None
            metrics.ERRORS.labels(metrics.NO_MODEL, "client_not_reading").inc()
            log.info(
                "closed a connection: its client read no answer for %g s (server option --body-timeout)",
                seconds,
            )
            self.transport.abort()

        def on_message_complete(self) -> None:
            self._in_message = self._in_chunk_header = False
            super().on_message_complete()

        def on_chunk_header(self) -> None:  # httptools calls it when a protocol has it
            self._in_chunk_header = True

        def on_body(self, body: bytes) -> None:
            self._in_chunk_header, self._bodies = False, self._bodies + 1
            super().on_body(body)

        def connection_lost(self, exc) -> None:
            self._stop_waiting()
            self._stop_write_wait()
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

        def _unsupported_upgrade_warning(self) -> None:
            # uvicorn's two warnings per request with an Upgrade header (one telling the operator to install a
            # WebSocket library) for what is no fault: the request is answered over HTTP/1.1 all the same.
            log.debug("a request asked for an Upgrade: answered over HTTP/1.1")
            # The request's body, if any, is left unread: the connection closes after its answer.
            self._after_upgrade = True
            if self.cycle is not None:
                self.cycle.keep_alive = False

        def send_400_response(self, msg: str) -> None:
            # uvicorn's own answer to bytes its parser refuses (a request line or header that is not HTTP/1.1,
            # a bad or doubled Content-Length, Content-Length with Transfer-Encoding, ...) was text/plain;
            # uvicorn has logged `msg` already.
            if self._pipelined_over:
                message = (
                    f"more than {MAX_PIPELINED} requests sent ahead of their answers on one connection: wait for "
                    "each answer, or open more connections"
                )
                self._refuse(429, b"Too Many Requests", "too_many_pipelined", message)
                return
            message = (
                "the request is not valid HTTP/1.1: its request line, a header or its framing "
                "(Content-Length, Transfer-Encoding) could not be parsed"
            )
            self._refuse(400, b"Bad Request", "bad_http", message, logged=True)

        def _head_late(self) -> None:
            self._head_timer = None
            if self.cycle is not self._cycle_before or self.transport.is_closing():
                return
            if not self._head_bytes:  # a silent connection is just closed
                self.transport.close()
                return
            message = (
                f"the request head did not arrive within {seconds:g} s ({self._head_bytes:,} bytes received; "
                "server option --body-timeout)"
            )
            self._refuse(408, b"Request Timeout", "body_timeout", message)

        def _refuse(
            self, status: int, phrase: bytes, reason: str, message: str, logged: bool = False
        ) -> None:
            """Answer `status` with the protocol's error object and close: no request is being answered."""
            self._stop_waiting()
            metrics.ERRORS.labels(metrics.NO_MODEL, reason).inc()
            if not logged:
                log.info("refused a connection: HTTP %d %s: %s", status, reason, message)
            body = orjson.dumps({"error": message})
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, phrase, len(body), body)
            )
            self.transport.close()

    return HeadDeadline

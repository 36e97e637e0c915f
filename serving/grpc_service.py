"""The v2 Open Inference Protocol over gRPC (kserve's generated stubs and its InferRequest.from_grpc /
InferResponse.to_grpc codecs) on the shared ServerState. Unlike kserve 0.21's servicer: readiness follows the
models and the shutdown, a request naming a version must name the served one, model control answers
UNIMPLEMENTED without a token file and UNAUTHENTICATED without the token, every refusal is one log line and a
status code (never a traceback), and ModelMetadata carries the protocol's `properties` map.
"""

from __future__ import annotations

import asyncio
import logging
import math

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from . import metrics
from ._kserve import (
    InferRequest,
    control_model_name,
    grpc_parameters,
    grpc_pb2,
    grpc_pb2_grpc,
    metadata_response,
)
from .errors import RequestRejected, ServerBusy, quoted
from .protocol import (
    INTEGER_TYPES,
    Budget,
    check_input,
    check_output,
    check_parameters,
    count_parameters,
    integers,
)
from .state import ServerState

log = logging.getLogger("fedmedclip.serving")

_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def _code(status: int) -> grpc.StatusCode:
    return _STATUS.get(status, grpc.StatusCode.INVALID_ARGUMENT)


class InferenceService(grpc_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServerState, budget: Budget):
        self.state, self.budget = state, budget

    async def ServerLive(self, request, context):
        return grpc_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return grpc_pb2.ServerReadyResponse(ready=self.state.ready())

    async def ServerMetadata(self, request, context):
        return grpc_pb2.ServerMetadataResponse(**self.state.metadata())

    async def ModelReady(self, request, context):
        # An unknown model, or version, is simply not ready (as Triton answers; REST says 404).
        try:
            self.state.model_ready(request.name, request.version or None)
        except RequestRejected:
            return grpc_pb2.ModelReadyResponse(ready=False)
        return grpc_pb2.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):
        return metadata_response(self.state.model(request.name, request.version or None).metadata())

    async def ModelInfer(self, request, context):
        async def read_request():
            _check_request(request, self.budget)
            return InferRequest.from_grpc(request)

        headers = dict(context.invocation_metadata() or ())
        version = request.model_version or None
        return (await self.state.infer(request.model_name, version, read_request, headers)).to_grpc()

    async def RepositoryModelLoad(self, request, context):
        name = await self._control("load", request, context)
        return grpc_pb2.RepositoryModelLoadResponse(model_name=name, isLoaded=True)

    async def RepositoryModelUnload(self, request, context):
        name = await self._control("unload", request, context)
        return grpc_pb2.RepositoryModelUnloadResponse(model_name=name, isUnloaded=True)

    async def _control(self, action: str, request, context) -> str:
        """Model control of the model the request names (kserve's field or Triton's: `control_model_name`)."""
        name = control_model_name(request)
        await self.state.control(action, name, dict(context.invocation_metadata() or ()).get("authorization"))
        return name


def _check_request(request, budget: Budget) -> None:
    """The gRPC request within the same bounds and types as a REST request (serving.protocol checks each
    input and requested output of both), so nothing a client sends ends up long in a message or a log line."""
    if len(request.id) > budget.max_string:
        raise RequestRejected("bad_request", f"the request id is over {budget.max_string} characters")
    if len(request.inputs) > budget.max_inputs or len(request.outputs) > budget.max_outputs:
        raise RequestRejected(
            "bad_request",
            f"at most {budget.max_inputs} input and {budget.max_outputs} requested output tensors",
        )
    check_parameters(_parameters(request.parameters, "the request", budget), "the request", budget)
    raw = len(request.raw_input_contents)
    if raw and raw != len(request.inputs):
        raise RequestRejected(
            "bad_request",
            f"{len(request.inputs)} inputs but {raw} raw_input_contents: they must match one to one",
        )
    elements = 0  # typed contents of all inputs, within the JSON requests' budget
    for i, tensor in enumerate(request.inputs):
        where = f"input {quoted(tensor.name)}"
        fields = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = _parameters(tensor.parameters, where, budget)
        check_input({**fields, "parameters": parameters}, i, budget)
        c = tensor.contents
        # Counted before anything reads them: kserve copies typed contents into Python lists on the event loop,
        # as many as the message holds (64 M one-byte UINT8 values held every client for 7.5 s and 1.5 GB).
        count, needed = sum(len(values) for _, values in c.ListFields()), math.prod(fields["shape"])
        if count and count != needed:
            raise RequestRejected(
                "bad_shape",
                f"{where}: its contents hold {count:,} values but shape {fields['shape']} needs {needed:,}",
            )
        elements += count
        if elements > budget.max_elements:
            raise RequestRejected(
                "too_many_elements",
                f"the request's typed contents hold over the budget of {budget.max_elements:,} tensor elements "
                "per request; send them as raw_input_contents",
            )
        for values in (c.int_contents, c.int64_contents, c.uint_contents, c.uint64_contents):
            # Typed contents are 32 or 64 bits wide whatever the datatype: a cast would wrap what is too large.
            if values and tensor.datatype in INTEGER_TYPES:
                integers(values, tensor.datatype, where)
        if raw and tensor.HasField("contents"):
            raise RequestRejected("bad_request", f"{where}: contents and raw_input_contents are exclusive")
    for i, output in enumerate(request.outputs):
        parameters = _parameters(output.parameters, f"output {quoted(output.name)}", budget)
        check_output({"name": output.name, "parameters": parameters}, i, budget)


def _parameters(parameters, where: str, budget: Budget) -> dict | None:
    """A gRPC parameters map as REST's, counted before it is converted (in Python, on the event loop)."""
    count_parameters(parameters, where, budget)
    return grpc_parameters(parameters)


# gRPC takes a message length as a C int, and protobuf cannot parse a message over 2 GiB anyway: a larger
# --max-request-bytes still holds for REST, while gRPC refuses what it could never read.
_MAX_GRPC_MESSAGE = 2**31 - 1


def build_server(
    state: ServerState, budget: Budget, address: str, max_message_bytes: int, body_timeout_s: float
) -> aio.Server:
    limit = min(max_message_bytes, _MAX_GRPC_MESSAGE)
    options = [(f"grpc.max_{d}_message_length", limit) for d in ("send", "receive")]
    # A connection without a call for --body-timeout is closed (GOAWAY; a client reconnects for its next call):
    # silent connections were held for good, each a file descriptor of the process REST answers from too.
    options.append(("grpc.max_connection_idle_ms", max(1, round(body_timeout_s * 1000))))
    server = aio.server(options=options)
    generated = _Generated()
    grpc_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state, budget), generated)
    handlers = {
        method: _message_within(handler, f"gRPC {method}", state, body_timeout_s)
        for method, handler in generated.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(generated.service, handlers),))
    server.add_registered_method_handlers(generated.service, handlers)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"gRPC cannot listen on {address}")
    return server


class _Generated:
    """Stands for the server in the generated `add_GRPCInferenceServiceServicer_to_server`: keeps the method
    handlers it registers, which build_server registers again, each reading its message within a deadline."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the same handlers as below, behind one generic handler

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def _message_within(handler, where: str, state: ServerState, seconds: float):
    """The unary `handler` as one that reads its request message within `seconds` (--body-timeout, as a REST
    body), else DEADLINE_EXCEEDED. A unary handler waits for its message as long as the client likes: a
    message announced and not sent held its call, and what had arrived of it (up to the message limit, per
    call, any number of calls), for good. On the wire a stream-unary call with one message is a unary one.
    The message's size counts in --max-inflight-bytes until the call is answered (RESOURCE_EXHAUSTED over it):
    gRPC hands over a message only once all of it has come, so its size is known then and not before.
    Every failure, reading the message or answering it, is one log line, one metric and the gRPC code of its
    HTTP status (ServerState.failed), never a traceback."""
    rpc = handler.unary_unary

    async def read_then_answer(request_iterator, context):
        async def refuse(exc: Exception, label: str = metrics.NO_MODEL, code=None):
            told = state.failed(exc, label, where, lambda status: (code or _code(status)).name)
            await context.abort(code or _code(told.status), told.message)  # raises: the call ends here

        with state.inflight.reserved() as reservation:
            # The deadline cancels this task, not one of its own around the read (asyncio.wait_for's): gRPC's
            # cancellation of the call must reach this task, below; the deadline's says so in its message.
            timer = asyncio.get_running_loop().call_later(seconds, asyncio.current_task().cancel, _LATE)
            try:
                read = await context.read()
            except asyncio.CancelledError as exc:
                if exc.args != (_LATE,):
                    raise
                message = (
                    f"the request message did not arrive within {seconds:g} s (server option --body-timeout)"
                )
                await refuse(RequestRejected("body_timeout", message, 408))
            finally:
                timer.cancel()
            if read is aio.EOF:
                try:
                    # gRPC ends a call itself when it refuses the message (over --max-request-bytes and its
                    # framing allowance, a compression it cannot read) or the client cancels: the handler sees
                    # an end of stream, and its next operation on the call cancels it (a bare await of the loop
                    # may come before that cancellation under load). A client may also just send none.
                    await context.send_initial_metadata(())
                except asyncio.CancelledError:
                    message = "gRPC or the client ended the call before its request message was whole"
                    state.failed(
                        RequestRejected("call_ended", message), metrics.NO_MODEL, where, lambda _: "by gRPC,"
                    )
                    raise
                await refuse(RequestRejected("bad_request", "the call ended without a request message"))
            size, request = read
            if isinstance(request, _Undecodable):
                await refuse(RequestRejected("bad_request", request.message))
            # Metadata and readiness requests name the model `name`, the others `model_name`.
            label = state.label(getattr(request, "model_name", getattr(request, "name", None)))
            try:
                reservation.grow_to(size)
            except ServerBusy as busy:
                # RESOURCE_EXHAUSTED, as for a message over --max-request-bytes: not UNAVAILABLE, it is up.
                await refuse(busy, label, grpc.StatusCode.RESOURCE_EXHAUSTED)
            try:
                return await rpc(request, context)
            except Exception as exc:
                await refuse(exc, label)

    deserialize = handler.request_deserializer

    def sized(message: bytes):
        # Never raises: gRPC would answer a deserializer's exception itself, UNKNOWN naming its Python class,
        # and hand the handler an end of stream (logged as a call without a message).
        try:
            return len(message), deserialize(message)
        except DecodeError:
            problem = f"the request message of {where} ({len(message):,} bytes) is not valid protobuf"
            return len(message), _Undecodable(problem)

    return grpc.stream_unary_rpc_method_handler(
        read_then_answer, request_deserializer=sized, response_serializer=handler.response_serializer
    )


_LATE = "the request message is late"  # the message of the deadline's cancellation


class _Undecodable:
    """A request message that protobuf cannot parse, for the handler to refuse."""

    def __init__(self, message: str):
        self.message = message

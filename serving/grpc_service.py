"""The v2 Open Inference Protocol over gRPC (kserve's generated `inference.GRPCInferenceService` stubs, its
InferRequest.from_grpc / InferResponse.to_grpc codecs), on the shared ServerState.

Against kserve 0.21's servicer: ServerReady and ModelReady say whether the models are loaded and the server is
not shutting down; a request naming a version must name the served one (NOT_FOUND otherwise); model
control (RepositoryModelLoad/Unload) answers UNIMPLEMENTED unless the server was started with a token, and
then UNAUTHENTICATED without it; every refusal is one log line and a status code (INVALID_ARGUMENT,
NOT_FOUND, UNAVAILABLE, RESOURCE_EXHAUSTED), never a traceback; ModelMetadata carries the protocol's
`properties` map (field 6 of the protocol's proto, which kserve's copy lacks: written as the field's bytes).
"""

from __future__ import annotations

import logging

import grpc
from grpc import aio

from . import metrics
from ._kserve import InferenceError, InferRequest, grpc_pb2, grpc_pb2_grpc, to_http_parameters
from .errors import RequestRejected, quoted
from .protocol import INTEGER_TYPES, Budget, check_input, check_output, integers
from .state import ServerState

log = logging.getLogger("fedmedclip.serving")

_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def _length_delimited(field: int, payload: bytes) -> bytes:
    """One protobuf field of wire type 2 (bytes, string, message, map entry)."""
    size, varint = len(payload), bytearray()
    while True:
        byte = size & 0x7F
        size >>= 7
        if size:
            varint.append(byte | 0x80)
        else:
            varint.append(byte)
            break
    return bytes([field << 3 | 2]) + bytes(varint) + payload


def metadata_response(meta: dict):
    """ModelMetadataResponse with the protocol's `properties` (map<string, string> = 6) kept as a field the
    message carries through (protobuf keeps unknown fields when it re-serialises)."""
    base = grpc_pb2.ModelMetadataResponse(
        name=meta["name"],
        versions=meta["versions"],
        platform=meta["platform"],
        inputs=meta["inputs"],
        outputs=meta["outputs"],
    )
    extra = b"".join(
        _length_delimited(6, _length_delimited(1, k.encode()) + _length_delimited(2, v.encode()))
        for k, v in meta.get("properties", {}).items()
    )
    response = grpc_pb2.ModelMetadataResponse()
    response.MergeFromString(base.SerializeToString() + extra)
    return response


class InferenceService(grpc_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServerState, budget: Budget):
        self.state, self.budget = state, budget

    async def _refuse(self, context, exc: RequestRejected, name: str, method: str):
        """One log line and one metric per refused request, and the status code of its HTTP status."""
        code = _STATUS.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)
        metrics.ERRORS.labels(self.state.label(name), exc.code).inc()
        log.info("refused gRPC %s: %s %s: %s", method, code.name, exc.code, exc.message)
        await context.abort(code, exc.message)

    # ---- health and metadata -----------------------------------------------------------------------------

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
        try:
            return metadata_response(self.state.model_metadata(request.name, request.version or None))
        except RequestRejected as exc:
            await self._refuse(context, exc, request.name, "ModelMetadata")

    # ---- inference ---------------------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        async def read_request():
            _check_request(request, self.budget)
            return InferRequest.from_grpc(request)

        headers = dict(context.invocation_metadata() or ())
        try:
            response = await self.state.infer(
                request.model_name, request.model_version or None, read_request, headers
            )
            return response.to_grpc()
        except RequestRejected as exc:
            await self._refuse(context, exc, request.model_name, "ModelInfer")
        except InferenceError as exc:  # the model logged and counted it (a broken model output)
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        except Exception:  # a bug: one traceback, and the client gets no detail
            metrics.ERRORS.labels(self.state.label(request.model_name), "internal").inc()
            log.exception("internal error in gRPC ModelInfer")
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")

    # ---- model control (only with --model-control-token-file) --------------------------------------------

    async def _control(self, request, context, action: str):
        auth = dict(context.invocation_metadata() or ()).get("authorization")
        try:
            await self.state.control(action, request.model_name, auth)
        except RequestRejected as exc:
            await self._refuse(context, exc, request.model_name, f"RepositoryModel{action.capitalize()}")

    async def RepositoryModelLoad(self, request, context):
        await self._control(request, context, "load")
        return grpc_pb2.RepositoryModelLoadResponse(model_name=request.model_name, isLoaded=True)

    async def RepositoryModelUnload(self, request, context):
        await self._control(request, context, "unload")
        return grpc_pb2.RepositoryModelUnloadResponse(model_name=request.model_name, isUnloaded=True)


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
    raw = len(request.raw_input_contents)
    if raw and raw != len(request.inputs):
        raise RequestRejected(
            "bad_request",
            f"{len(request.inputs)} inputs but {raw} raw_input_contents: they must match one to one",
        )
    for i, tensor in enumerate(request.inputs):
        parameters = to_http_parameters(tensor.parameters) or None
        check_input(tensor.name, tensor.datatype, list(tensor.shape), parameters, i, budget)
        c = tensor.contents
        for values in (c.int_contents, c.int64_contents, c.uint_contents, c.uint64_contents):
            # Typed contents are 32 or 64 bits wide whatever the datatype: a cast would wrap what is too large.
            if values and tensor.datatype in INTEGER_TYPES:
                integers(values, tensor.datatype, f"input {quoted(tensor.name)}")
        if raw and tensor.HasField("contents"):
            raise RequestRejected(
                "bad_request", f"input {quoted(tensor.name)}: contents and raw_input_contents are exclusive"
            )
    for i, output in enumerate(request.outputs):
        check_output(output.name, to_http_parameters(output.parameters) or None, i, budget)


def build_server(state: ServerState, budget: Budget, address: str, max_message_bytes: int) -> aio.Server:
    server = aio.server(
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
    )
    grpc_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state, budget), server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"gRPC cannot listen on {address}")
    return server

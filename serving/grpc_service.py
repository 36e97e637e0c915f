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
from ._kserve import InferenceError, InferRequest, grpc_pb2, grpc_pb2_grpc
from .errors import RequestRejected, quoted
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
_MAX_STRING = 256
_MAX_TENSORS = 8
_MAX_RANK = 8


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
    def __init__(self, state: ServerState):
        self.state = state

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
            _check_request(request)
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
        except aio.AbortError:
            raise
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


def _check_request(request) -> None:
    """The gRPC request's strings and counts within the same bounds as a REST request (serving.protocol),
    so nothing a client sends ends up long in a message or a log line."""
    if len(request.id) > _MAX_STRING:
        raise RequestRejected("bad_request", f"the request id is over {_MAX_STRING} characters")
    if len(request.inputs) > _MAX_TENSORS or len(request.outputs) > _MAX_TENSORS:
        raise RequestRejected(
            "bad_request", f"at most {_MAX_TENSORS} input and {_MAX_TENSORS} requested output tensors"
        )
    raw = len(request.raw_input_contents)
    if raw and raw != len(request.inputs):
        raise RequestRejected(
            "bad_request",
            f"{len(request.inputs)} inputs but {raw} raw_input_contents: they must match one to one",
        )
    for i, tensor in enumerate(request.inputs):
        if not 0 < len(tensor.name) <= _MAX_STRING or len(tensor.datatype) > _MAX_STRING:
            raise RequestRejected(
                "bad_request", f"input {i}: name and datatype must have 1 to {_MAX_STRING} characters"
            )
        if len(tensor.shape) > _MAX_RANK or any(d < 0 for d in tensor.shape):
            raise RequestRejected(
                "bad_shape",
                f"input {quoted(tensor.name)}: shape must be at most {_MAX_RANK} non-negative integers",
            )
        if raw and tensor.HasField("contents"):
            raise RequestRejected(
                "bad_request", f"input {quoted(tensor.name)}: contents and raw_input_contents are exclusive"
            )
    for output in request.outputs:
        if not 0 < len(output.name) <= _MAX_STRING:
            raise RequestRejected(
                "bad_request", f"requested output names must have 1 to {_MAX_STRING} characters"
            )


def build_server(state: ServerState, address: str, max_message_bytes: int) -> aio.Server:
    server = aio.server(
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
    )
    grpc_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"gRPC cannot listen on {address}")
    return server

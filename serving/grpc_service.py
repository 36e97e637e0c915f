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
from .state import NotReady, NotServed, ServerState

log = logging.getLogger("fedmedclip.serving")

_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
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

    async def _refuse(
        self, context, code: grpc.StatusCode, message: str, reason: str, model: str, method: str
    ):
        metrics.ERRORS.labels(model, reason).inc()
        log.info("refused gRPC %s: %s %s: %s", method, code.name, reason, message)
        await context.abort(code, message)

    async def _not_served(self, context, exc: NotServed, name: str, method: str):
        await self._refuse(
            context, grpc.StatusCode.NOT_FOUND, exc.message, "unknown_model", self.state.label(name), method
        )

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
        except (NotServed, NotReady):
            return grpc_pb2.ModelReadyResponse(ready=False)
        return grpc_pb2.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):
        try:
            model = self.state.model(request.name, request.version or None, ready=False)
        except NotServed as exc:
            await self._not_served(context, exc, request.name, "ModelMetadata")
        if model.classifier is None:
            await self._refuse(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"model {model.name!r} is not loaded",
                "not_ready",
                model.name,
                "ModelMetadata",
            )
        return metadata_response(model.metadata())

    # ---- inference ---------------------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        label = self.state.label(request.model_name)
        self.state.in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            model = self.state.model(request.model_name, request.model_version or None)
            _check_request(request)
            infer_request = InferRequest.from_grpc(request)
            response, _ = await model(infer_request, headers=dict(context.invocation_metadata() or ()))
            return response.to_grpc()
        except NotServed as exc:
            await self._not_served(context, exc, request.model_name, "ModelInfer")
        except NotReady as exc:
            await self._refuse(
                context, grpc.StatusCode.UNAVAILABLE, exc.message, "not_ready", label, "ModelInfer"
            )
        except RequestRejected as exc:
            code = _STATUS.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)
            await self._refuse(context, code, exc.message, exc.code, label, "ModelInfer")
        except InferenceError as exc:  # the model logged and counted it (a broken model output)
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        except aio.AbortError:
            raise
        except Exception:  # a bug: one traceback, and the client gets no detail
            metrics.ERRORS.labels(label, "internal").inc()
            log.exception("internal error in gRPC ModelInfer")
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
        finally:
            self.state.in_flight -= 1
            metrics.IN_FLIGHT.dec()

    # ---- model control (only with --model-control-token-file) --------------------------------------------

    async def _control(self, request, context, action: str):
        method = f"RepositoryModel{action.capitalize()}"
        if not self.state.control_enabled:
            await self._refuse(
                context,
                grpc.StatusCode.UNIMPLEMENTED,
                "model control is disabled on this server",
                "control_disabled",
                metrics.NO_MODEL,
                method,
            )
        auth = dict(context.invocation_metadata() or ()).get("authorization")
        try:
            self.state.authorize(auth)
            if action == "unload":
                self.state.unload(request.model_name)
            else:
                import asyncio

                await asyncio.get_running_loop().run_in_executor(None, self.state.load, request.model_name)
        except RequestRejected as exc:
            await self._refuse(
                context, grpc.StatusCode.UNAUTHENTICATED, exc.message, exc.code, metrics.NO_MODEL, method
            )
        except NotServed as exc:
            await self._not_served(context, exc, request.model_name, method)

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

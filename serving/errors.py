"""Errors of the serving layer. Pure Python: importable without kserve or onnxruntime."""

from fedmedclip.errors import FedMedClipError


class ServingError(FedMedClipError):
    """The server cannot start as asked (model not found, hash mismatch, no CUDA, bad model file): the CLI
    prints the message, which names the problem and the fix, and exits with status 2."""


class RequestRejected(ValueError):
    """A client error in one inference request: `code` a short stable reason (the metrics label), `message`
    for the client (quoting at most a few characters of what it sent), HTTP `status` (gRPC maps it)."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status

    def __reduce__(self):  # raised in the JSON worker process: it must survive pickling with its fields
        return (type(self), (self.code, self.message, self.status))


class _FixedRejection(RequestRejected):
    """A rejection of one kind: its subclass declares `code` and `status`; made from the message alone."""

    code: str
    status: int

    def __init__(self, message: str):
        super().__init__(self.code, message, self.status)

    def __reduce__(self):  # its own arguments: the base's three would not fit this __init__
        return (type(self), (self.message,))


class NotServed(_FixedRejection):
    """The request names a model, or a version of it, that this server does not serve (HTTP 404)."""

    code, status = "unknown_model", 404


class NotReady(_FixedRejection):
    """The model exists but cannot answer now (unloaded, or the server is shutting down): HTTP 503."""

    code, status = "not_ready", 503


class ServerBusy(_FixedRejection):
    """The request's bytes would take the server over --max-inflight-bytes (every request's at once): HTTP 503
    with Retry-After (gRPC RESOURCE_EXHAUSTED). Nothing is wrong with the request: sent later, it fits."""

    code, status = "server_busy", 503
    retry_after_s = 1  # requests in flight end within --body-timeout and their inference; most much sooner


def quoted(value: object, limit: int = 40) -> str:
    """`repr` of something a client sent, cut to `limit` characters: messages name it without echoing it."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""Errors of the serving layer. Pure Python: importable without kserve or onnxruntime."""

from __future__ import annotations

from fedmedclip.errors import FedMedClipError


class ServingError(FedMedClipError):
    """The server cannot start as asked (model not found, hash mismatch, no CUDA, bad model file).

    The CLI prints the message and exits with status 2; the message names the problem and the fix."""


class RequestRejected(ValueError):
    """A client error in one inference request. `code` is a short stable reason (the metrics label);
    `message` names the problem for the client. The model turns it into kserve's InvalidInput (HTTP 400,
    gRPC INVALID_ARGUMENT)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

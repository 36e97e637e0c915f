"""Import kserve safely. `kserve.model_server` parses sys.argv when imported (argparse.parse_known_args, with
prefix matching): our own `fedmedclip serve ...` options would leak into its settings. Import it with a bare
argv so its module-level defaults stay the defaults; we pass every setting explicitly."""

from __future__ import annotations

import sys

_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    from kserve import logging as kserve_logging
    from kserve import model_server
    from kserve.errors import InferenceError, InvalidInput
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.grpc import server as grpc_server
    from kserve.protocol.infer_type import (
        InferInput,
        InferOutput,
        InferRequest,
        InferResponse,
        RequestedOutput,
    )
    from kserve.protocol.rest import server as rest_server
finally:
    sys.argv = _argv

__all__ = [
    "DataPlane",
    "InferInput",
    "InferOutput",
    "InferRequest",
    "InferResponse",
    "InferenceError",
    "InvalidInput",
    "RequestedOutput",
    "grpc_server",
    "kserve",
    "kserve_logging",
    "model_server",
    "rest_server",
]

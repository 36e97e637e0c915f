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
    from kserve.errors import InvalidInput
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.infer_type import (
        InferInput,
        InferOutput,
        InferRequest,
        InferResponse,
        RequestedOutput,
    )
finally:
    sys.argv = _argv

__all__ = [
    "DataPlane",
    "InferInput",
    "InferOutput",
    "InferRequest",
    "InferResponse",
    "InvalidInput",
    "RequestedOutput",
    "kserve",
    "kserve_logging",
    "model_server",
]

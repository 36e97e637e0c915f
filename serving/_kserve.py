"""kserve, imported safely, and what this server takes from it: the model class (kserve.Model, with its
request_*_seconds histograms), the protocol's data types with their codecs (InferRequest.from_grpc,
InferResponse.to_rest/to_grpc), the generated gRPC stubs, and its error types.

This module is where the pinned kserve's shortcomings are worked around, and only here
(tests/test_serving_protocol.py fails if the pinned version changes underneath):

- `kserve.model_server` parses sys.argv when imported (argparse.parse_known_args with prefix matching): our
  own `fedmedclip serve ...` options would leak into its settings. It is imported with a bare argv.
- Its REST and gRPC front ends (kserve.ModelServer) are not used, for what they cannot be told not to do
  (serving/rest.py and serving/grpc_service.py list it); the server composes its own from the parts above.
- InferRequest.from_bytes re-encodes every binary tensor into Python lists (BYTES holding JPEG files fail as
  "not UTF-8"): serving.protocol reads the binary extension itself and hands kserve zero-copy views.
- InferResponse.to_grpc breaks when given the REST request's binary_data flags: the model passes them for
  REST only (serving/model.py, `_response`).
"""

from __future__ import annotations

import sys

PINNED_VERSION = "0.21.0"

_argv, sys.argv = sys.argv, sys.argv[:1]
try:  # what the other modules take from here
    import kserve  # noqa: F401
    from kserve.errors import InferenceError  # noqa: F401
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as grpc_pb2  # noqa: F401
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as grpc_pb2_grpc  # noqa: F401
    from kserve.protocol.infer_type import (  # noqa: F401
        InferInput,
        InferOutput,
        InferRequest,
        InferResponse,
        RequestedOutput,
        to_http_parameters,
    )
finally:
    sys.argv = _argv

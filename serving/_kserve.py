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
- InferInput.as_numpy decodes a BYTES tensor's binary data (REST binary extension, gRPC raw_input_contents)
  element by element in Python on the event loop, every element the data holds whatever its shape says: 64 MB
  of 6-byte elements held every client for 8 s. `raw_bytes_elements` reads only as many as the shape has.
- InferResponse.to_grpc breaks when given the REST request's binary_data flags: the model passes them for
  REST only (serving/model.py, `_response`).
- Its generated gRPC messages lack fields of the protocol's .proto (tests/specs/): InferParameter's double (4)
  and uint64 (5), ModelMetadataResponse's `properties` (6); and tritonclient names the model of a model-control
  request in field 2. Protobuf keeps such fields as unknown: `grpc_parameters`, `metadata_response` and
  `control_model_name` read and write them.
"""

from __future__ import annotations

import struct
import sys

import numpy as np
from google.protobuf.unknown_fields import UnknownFieldSet

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


def grpc_parameters(parameters) -> dict | None:
    """A gRPC parameters map as REST's: kserve's converter, and the protocol's double (4) and uint64 (5)
    parameters, which kserve's message does not declare (protobuf keeps them as unknown fields): read, so a
    NaN is refused as REST refuses it."""
    out = to_http_parameters(parameters)
    for key, value in parameters.items():
        for f in UnknownFieldSet(value):
            if f.field_number == 4 and f.wire_type == 1:  # fixed64: the double's bits
                out[key] = struct.unpack("<d", struct.pack("<Q", f.data))[0]
            elif f.field_number == 5 and f.wire_type == 0:  # varint
                out[key] = f.data
    return out or None


def metadata_response(meta: dict):
    """ModelMetadataResponse with the protocol's `properties` (map<string, string> = 6), which kserve's proto
    lacks, as a field protobuf carries through unknown. Its bytes come from kserve's messages of the same wire
    shape: a map entry is two strings 1 and 2 (TensorMetadata's name and datatype), field 6 repeated bytes
    (ModelInferResponse.raw_output_contents)."""
    response = grpc_pb2.ModelMetadataResponse(
        **{k: meta[k] for k in ("name", "versions", "platform", "inputs", "outputs")}
    )
    entry = grpc_pb2.ModelMetadataResponse.TensorMetadata
    entries = [entry(name=k, datatype=v).SerializeToString() for k, v in meta.get("properties", {}).items()]
    response.MergeFromString(grpc_pb2.ModelInferResponse(raw_output_contents=entries).SerializeToString())
    return response


def control_model_name(request) -> str:
    """The model a model-control request names: kserve's message has it as field 1; Triton's, which tritonclient
    sends, as field 2 after repository_name (1), which kserve's parser keeps as unknown."""
    triton = [f.data for f in UnknownFieldSet(request) if f.field_number == 2 and f.wire_type == 2]
    return triton[0].decode("utf-8", "replace") if triton else request.model_name


def raw_bytes_elements(inp, count: int):
    """The `count` elements of BYTES input `inp` when it came as binary data (each a 4-byte little-endian
    length, then its bytes) as a numpy object array, else None (JSON or gRPC typed contents: kserve's lists,
    bounded by the request's budgets). ValueError when the data does not hold exactly `count` elements: at
    most `count` are read, so a request costs its shape's elements and never the data's."""
    raw = getattr(inp, "_raw_data", None)
    if raw is None:
        return None
    out, offset, size = [], 0, len(raw)
    for k in range(count):
        if offset + 4 > size:
            raise ValueError(f"the binary data ends within the length of element {k} of {count}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > size:
            raise ValueError(f"element {k} of {length:,} bytes runs past the end of the binary data")
        out.append(bytes(raw[offset : offset + length]))
        offset += length
    if offset != size:
        raise ValueError(f"{size - offset:,} bytes of binary data follow its {count} elements")
    return np.array(out, dtype=np.object_)

"""How long the gRPC front end's request check holds the event loop for a message of many parameters: the
check (serving/grpc_service.py, `_check_request`) on one parsed ModelInferRequest whose input carries
`--parameters` entries (each an int64, or no value with `--empty`), refused for their number.

    .venv/bin/python bench/bench_grpc_parameters.py --parameters 1000000
"""

from __future__ import annotations

import argparse
import time

from serving._kserve import grpc_pb2
from serving.errors import RequestRejected
from serving.grpc_service import _check_request
from serving.protocol import Budget


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parameters", type=int, default=1_000_000)
    ap.add_argument("--empty", action="store_true", help="parameters holding no value")
    args = ap.parse_args()
    request = grpc_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=[1])
    for k in range(args.parameters):
        parameter = tensor.parameters.get_or_create(f"k{k}")
        if not args.empty:
            parameter.int64_param = k
    wire = request.SerializeToString()
    request = grpc_pb2.ModelInferRequest.FromString(wire)  # as the server receives it
    started = time.perf_counter()
    try:
        _check_request(request, Budget(max_elements=1))
        outcome = "accepted"
    except RequestRejected as exc:
        outcome = f"{exc.code}: {exc.message}"
    spent = time.perf_counter() - started
    print(
        f"{len(wire) / 2**20:.1f} MiB, {args.parameters:,} parameters: {outcome} after {spent * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()

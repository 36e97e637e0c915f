"""A v2 REST inference request (the Open Inference Protocol's `inference_request`, tests/specs/, with the
binary tensor data extension) read as hostile input: the JSON part is budgeted before it is parsed (its size;
its tensor elements, bounded by counting `,` and `[` at C speed), parsed by orjson (no NaN, Infinity or
numbers beyond a double), and checked field by field with exact types (a dimension is an int, not `"1"`,
`true` or `1.0`; data are in range, finite, base64). Off the event loop: orjson and numpy hold the interpreter
lock for the whole parse (0.5 s for a legal 64-image UINT8 tensor in JSON), so a large JSON part goes to a
worker process, and what comes back is plain picklable data. gRPC requests get the same `check_input`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import chain

import numpy as np
import orjson

from .errors import RequestRejected, quoted

log = logging.getLogger("fedmedclip.serving")

# The protocol's tensor data types (inference_rest.md, "Tensor Data Types").
INTEGER_TYPES = {f"{u}INT{b}": np.dtype(f"{u.lower()}int{b}") for u in ("U", "") for b in (8, 16, 32, 64)}
FLOAT_TYPES = {f"FP{b}": np.dtype(f"float{b}") for b in (16, 32, 64)}
DATATYPES = frozenset({*INTEGER_TYPES, *FLOAT_TYPES, "BOOL", "BYTES", "BF16"})
_MAX_DIM = 1 << 40  # a dimension beyond this cannot describe data that fits any request


@dataclass(frozen=True)
class Budget:
    """Bounds on one request's JSON, checked before and while it is parsed."""

    max_elements: int  # tensor elements given as JSON data in one request
    max_inputs: int = 8
    max_outputs: int = 8
    max_rank: int = 8
    max_string: int = 256  # characters of a name, an id, a datatype, a parameter key
    max_parameter_string: int = 4096  # characters of a string parameter value
    max_parameters: int = 32
    # A JSON part up to this size is parsed in a thread, a larger one in a worker process.
    inline_bytes: int = 1 << 20
    # Elements of one BYTES tensor (one encoded image each: the served models' --max-batch-images); None: only
    # `max_elements`. Checked before their base64 is decoded: millions of tiny strings, refused later for
    # their count, cost the parsing worker seconds and the server half a second of its interpreter lock and
    # half a gigabyte to take its answer back.
    max_bytes_elements: int | None = None


@dataclass
class Tensor:
    """One input. `data`: a numpy array (numeric, BOOL) or a list of bytes (BYTES); None when the tensor
    follows the JSON as binary data (`binary_size` bytes)."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict | None
    binary_size: int | None = None
    data: np.ndarray | list[bytes] | None = None


@dataclass
class Header:
    id: str | None
    parameters: dict | None
    inputs: list[Tensor]
    outputs: list[tuple[str, dict | None]] | None = None


def parse_header(text: bytes, budget: Budget) -> Header:
    """Budget, parse and check the JSON part of a request (the whole body, or the header of a binary one)."""
    # Every JSON array element is preceded by `[` or `,`: this bounds the element count before parsing.
    upper = text.count(b",") + text.count(b"[")
    if upper > budget.max_elements + 4096:
        raise RequestRejected(
            "too_many_elements",
            f"the request's JSON holds up to {upper:,} values, over the budget of {budget.max_elements:,} "
            "tensor elements per request (the served models' largest legal request); send images as "
            "binary data or encoded files",
        )
    try:
        doc = _object(orjson.loads(text), "the request")
    except orjson.JSONDecodeError as exc:
        # orjson's message names the position and the kind of problem, never the text itself; but for any
        # byte that is not UTF-8 it says "surrogates not allowed", which binary data never meant.
        problem = str(exc)
        try:
            text.decode()
        except UnicodeDecodeError as bad:
            problem = f"byte {bad.start:,} (0x{text[bad.start]:02x}) is not UTF-8 text"
        raise RequestRejected("bad_json", f"the request is not valid JSON: {problem}") from None
    request_id = None if doc.get("id") is None else _string(doc["id"], '"id"', budget.max_string)
    header = Header(request_id, check_parameters(doc.get("parameters"), "the request", budget), [])
    _check_binary_flag(header.parameters, "binary_data_output", "the request")
    inputs, outputs = doc.get("inputs"), doc.get("outputs")
    if not isinstance(inputs, list) or not 0 < len(inputs) <= budget.max_inputs:
        got = len(inputs) if isinstance(inputs, list) else _kind(inputs)
        raise RequestRejected(
            "bad_request", f'"inputs" must be a list of 1 to {budget.max_inputs} tensors, got {got}'
        )
    left = budget.max_elements
    for i, spec in enumerate(inputs):
        spec = _object(spec, f"input {i}")
        t = check_input(spec, i, budget)
        where = f"input {quoted(t.name)}"
        if (t.binary_size is None) == ("data" not in spec):  # the data come one way, exactly
            has = "both 'data' and" if "data" in spec else "neither 'data' nor"
            raise RequestRejected("bad_request", f"{where} has {has} a 'binary_data_size' parameter")
        if t.binary_size is None:
            t.data = _data(spec["data"], t, where, budget, left)
            left -= len(t.data)
        header.inputs.append(t)
    if outputs is not None:
        if not isinstance(outputs, list) or len(outputs) > budget.max_outputs:
            raise RequestRejected(
                "bad_request", f'"outputs" must be a list of at most {budget.max_outputs} objects'
            )
        header.outputs = [check_output(_object(o, f"output {i}"), i, budget) for i, o in enumerate(outputs)]
    return header


def check_input(spec: dict, i: int, budget: Budget) -> Tensor:
    """Input `i` without its data: a JSON request's object, or a gRPC request's fields in one."""
    name = _string(spec.get("name"), f"input {i}: 'name'", budget.max_string)
    where = f"input {quoted(name)}"
    datatype = _string(spec.get("datatype"), f"{where}: 'datatype'", budget.max_string)
    shape = spec.get("shape")
    if datatype not in DATATYPES:
        raise RequestRejected(
            "bad_dtype",
            f"{where}: unknown datatype {quoted(datatype)}; the protocol's are {sorted(DATATYPES)}",
        )
    if not isinstance(shape, list) or len(shape) > budget.max_rank:
        raise RequestRejected(
            "bad_shape", f"{where}: 'shape' must be a list of at most {budget.max_rank} integers"
        )
    for d in shape:
        # Exactly int: JSON true, "1" and 1.0 are not dimensions.
        if type(d) is not int or not 0 <= d <= _MAX_DIM:
            raise RequestRejected(
                "bad_shape", f"{where}: 'shape' entries must be non-negative integers, got {quoted(d)}"
            )
    parameters = check_parameters(spec.get("parameters"), where, budget)
    size = (parameters or {}).get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise RequestRejected(
            "bad_parameters", f"{where}: binary_data_size must be a non-negative integer, got {quoted(size)}"
        )
    return Tensor(name, datatype, shape, parameters, size)


def check_output(spec: dict, i: int, budget: Budget) -> tuple[str, dict | None]:
    """Requested output `i`'s name and parameters: a JSON request's object, or a gRPC request's fields in one."""
    name = _string(spec.get("name"), f"output {i}: 'name'", budget.max_string)
    params = check_parameters(spec.get("parameters"), f"output {quoted(name)}", budget)
    _check_binary_flag(params, "binary_data", f"output {quoted(name)}")
    return name, params


def _check_binary_flag(params: dict | None, key: str, where: str) -> None:
    """The binary data extension's output flags are booleans: kserve reads any other value by its truth, so
    "false" or 0.5 would turn the answer binary (or 0 and "" JSON) whatever the client meant."""
    if params and key in params and type(params[key]) is not bool:
        raise RequestRejected(
            "bad_parameters", f"{where}: parameter {key!r} must be true or false, got {quoted(params[key])}"
        )


def _data(data: object, t: Tensor, where: str, budget: Budget, left: int) -> np.ndarray | list[bytes]:
    """The input's JSON data as its datatype, within the `left` elements of the request's budget."""
    if not isinstance(data, list):
        raise RequestRejected("bad_data", f"{where}: 'data' must be a JSON array, got {_kind(data)}")
    flat = _flatten(data, where, budget.max_rank)
    if len(flat) != math.prod(t.shape):
        raise RequestRejected(
            "bad_shape",
            f"{where}: 'data' holds {len(flat):,} values but shape {t.shape} needs {math.prod(t.shape):,}",
        )
    if len(flat) > left:
        raise RequestRejected(
            "too_many_elements",
            f"the request's JSON tensors hold more than the budget of {budget.max_elements:,} elements",
        )
    if t.datatype in INTEGER_TYPES:
        info = np.iinfo(INTEGER_TYPES[t.datatype])
        _only({int}, flat, where, f"integers {info.min}-{info.max}")
        return integers(flat, t.datatype, where)
    if t.datatype in FLOAT_TYPES:
        _only({int, float}, flat, where, "numbers")
        with np.errstate(over="ignore"):  # refused just below; numpy would warn on the server's stderr
            cast = np.array(flat, dtype=np.float64).astype(FLOAT_TYPES[t.datatype])
        if not np.isfinite(cast).all():  # orjson refuses NaN and inf; a float16 can still overflow
            raise RequestRejected("bad_value", f"{where}: a value is not finite as {t.datatype}")
        return cast
    if t.datatype == "BOOL":
        _only({bool}, flat, where, "true or false")
        return np.array(flat, dtype=np.bool_)
    if t.datatype != "BYTES":
        raise RequestRejected(
            "bad_dtype", f"{where}: {t.datatype} cannot be sent as JSON data; send it as binary data"
        )
    _only({str}, flat, where, "strings (the base64 of each element's bytes)")
    if budget.max_bytes_elements is not None and len(flat) > budget.max_bytes_elements:
        raise RequestRejected(
            "too_many_images",
            f"{where}: {len(flat):,} BYTES elements (one encoded image each), over the limit of "
            f"{budget.max_bytes_elements:,} images (server option --max-batch-images); split the request",
        )
    out = []
    for k, item in enumerate(flat):
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise RequestRejected(
                "bad_base64",
                f"{where}: element {k} is not base64; a BYTES element sent as a JSON string must be the "
                "base64 of its bytes (or send the tensor as binary data)",
            ) from None
    return out


def integers(values, datatype: str, where: str) -> np.ndarray:
    """Integer tensor data (a JSON array's, or a gRPC request's typed contents) as `datatype`, refused when a
    value is outside its range: a cast would wrap 300 to 44 in UINT8."""
    info = np.iinfo(INTEGER_TYPES[datatype])
    try:
        array = np.array(values, dtype=np.int64)
    except OverflowError:  # beyond int64: only UINT64's top half is there, and no served input is UINT64
        raise RequestRejected(
            "bad_value", f"{where}: a value is beyond the 64-bit signed integers this server reads"
        ) from None
    if array.size and (array.min() < info.min or array.max() > min(info.max, np.iinfo(np.int64).max)):
        bad = int(array.min() if array.min() < info.min else array.max())
        raise RequestRejected(
            "bad_value", f"{where}: 'data' must hold integers {info.min}-{info.max}, got {bad}"
        )
    return array.astype(INTEGER_TYPES[datatype])


def _flatten(data: list, where: str, max_rank: int) -> list:
    """The scalars of a flat or regularly nested JSON array, in row-major order."""
    level, depth = data, 1
    while level and type(level[0]) is list:
        if set(map(type, level)) != {list}:
            raise RequestRejected("bad_data", f"{where}: 'data' mixes nested lists and values")
        level = list(chain.from_iterable(level))
        depth += 1
        if depth > max_rank:
            raise RequestRejected("bad_data", f"{where}: 'data' is nested deeper than {max_rank} levels")
    return level


def _only(allowed: set, flat: list, where: str, what: str) -> None:
    if set(map(type, flat)) <= allowed:
        return
    example = next(v for v in flat if type(v) not in allowed)
    raise RequestRejected(
        "bad_value",
        f"{where}: 'data' must hold {what}, got {type(example).__name__} values such as {quoted(example, 20)}; "
        "nothing is rounded or converted",
    )


def _object(value: object, where: str, code: str = "bad_request") -> dict:
    if not isinstance(value, dict):
        raise RequestRejected(code, f"{where} must be a JSON object, got {_kind(value)}")
    return value


def _string(value: object, where: str, limit: int) -> str:
    if type(value) is not str:
        raise RequestRejected("bad_request", f"{where} must be a string, got {_kind(value)}")
    if not value or len(value) > limit:
        raise RequestRejected("bad_request", f"{where} must have 1 to {limit} characters, got {len(value)}")
    return value


def count_parameters(value, where: str, budget: Budget) -> None:
    """At most `max_parameters`, counted first: a gRPC map before it is converted (a million parameters took
    1.1 s of the event loop to convert: bench/bench_grpc_parameters.py)."""
    if len(value) > budget.max_parameters:
        raise RequestRejected(
            "bad_parameters", f"{where}: {len(value)} parameters, over the limit of {budget.max_parameters}"
        )


def check_parameters(value: object, where: str, budget: Budget) -> dict | None:
    """A protocol `$parameters` object: string keys, string/number/boolean values (finite numbers: orjson
    refuses NaN; a gRPC double parameter is read from what kserve's message keeps unknown)."""
    if value is None:
        return None
    count_parameters(_object(value, f"{where}: 'parameters'", "bad_parameters"), where, budget)
    for key, v in value.items():
        if len(key) > budget.max_string:
            problem = f"a parameter name is over {budget.max_string} characters"
        elif type(v) not in (str, int, float, bool):
            problem = f"parameter {quoted(key)} must be a string, number or boolean, got {_kind(v)}"
        elif type(v) is float and not math.isfinite(v):
            problem = f"parameter {quoted(key)} is {v}, not a finite number"
        elif type(v) is str and len(v) > budget.max_parameter_string:
            problem = f"parameter {quoted(key)} is over {budget.max_parameter_string} characters"
        else:
            continue
        raise RequestRejected("bad_parameters", f"{where}: {problem}")
    return value


def _kind(value: object) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def is_decimal(header_value: str) -> bool:
    """Whether a length header is a decimal integer: ASCII digits only, as str.isdigit() takes '²' (a header is
    read as Latin-1), which int() refuses."""
    return header_value.isascii() and header_value.isdigit()


def json_part(body: bytes, headers) -> bytes:
    """The JSON part of a REST request body, the binary data following it: the binary tensor data extension's
    Inference-Header-Content-Length header (absent: all JSON)."""
    raw = headers.get("inference-header-content-length")
    if raw is None:
        return body
    # Digits counted before int(), which refuses over 4,300 of them (a ValueError: a 500): more digits than the
    # body's size has are beyond it. Leading zeros pad the same number.
    digits = raw.lstrip("0") if is_decimal(raw) else ""
    if not digits or len(digits) > len(str(len(body))) or int(digits) > len(body):
        raise RequestRejected(
            "bad_request",
            f"header Inference-Header-Content-Length must be an integer in 1..{len(body)} (the body's size), "
            f"got {quoted(raw, 24)}",
        )
    return body[: int(digits)]


def to_infer_request(header: Header, body: bytes, offset: int, model_name: str, version: str | None):
    """kserve's InferRequest from a checked header and the body's binary sections (zero-copy views)."""
    from ._kserve import InferInput, InferRequest, RequestedOutput

    binary = sum(t.binary_size or 0 for t in header.inputs)
    if offset + binary != len(body):
        how = "runs past the end of" if offset + binary > len(body) else "leaves unread bytes in"
        raise RequestRejected(
            "bad_request",
            f"the inputs' binary_data_size ({binary:,} bytes in all) {how} the request body ({len(body) - offset:,} "
            "bytes after the JSON)",
        )
    inputs, raw = [], []
    for t in header.inputs:
        inp = InferInput(name=t.name, shape=t.shape, datatype=t.datatype, parameters=t.parameters)
        if t.binary_size is not None:
            # Passed as kserve's gRPC path passes raw_input_contents (`raw_inputs`): as_numpy() reads it in place.
            raw.append(memoryview(body)[offset : offset + t.binary_size])
            offset += t.binary_size
        elif isinstance(t.data, np.ndarray):
            raw.append(memoryview(np.ascontiguousarray(t.data)).cast("B"))
        else:
            raw.append(None)
            inp.data = t.data
        inputs.append(inp)
    return InferRequest(
        model_name=model_name,
        infer_inputs=inputs,
        raw_inputs=raw,
        request_id=header.id,
        parameters=header.parameters,
        request_outputs=[RequestedOutput(name=n, parameters=p) for n, p in header.outputs or ()] or None,
        model_version=version,
    )


class JsonParser:
    """Runs `parse_header` off the event loop: small JSON parts on two threads, large ones in `processes`
    worker processes (0: threads only), so that no parse holds the server's interpreter lock for long."""

    def __init__(self, budget: Budget, processes: int):
        self.budget = budget
        self._threads = ThreadPoolExecutor(2, thread_name_prefix="json")
        # spawn, not fork: the server process runs gRPC and ONNX Runtime threads that a fork would copy broken.
        spawn = multiprocessing.get_context("spawn")
        self._new_pool = functools.partial(ProcessPoolExecutor, processes, mp_context=spawn)
        self._processes = self._new_pool() if processes > 0 else None

    def warm_up(self) -> None:
        """Start the worker processes now (a second or so), not on the first large request."""
        if self._processes is not None:
            empty = b'{"inputs": [{"name": "x", "datatype": "BOOL", "shape": [0], "data": []}]}'
            self._processes.submit(parse_header, empty, self.budget).result()

    async def parse(self, text: bytes) -> Header:
        small = self._processes is None or len(text) <= self.budget.inline_bytes
        try:
            pool = self._threads if small else self._processes
            return await asyncio.get_running_loop().run_in_executor(pool, parse_header, text, self.budget)
        except BrokenProcessPool:
            # The worker died (killed for memory, say): a new pool serves the next request.
            log.error(
                "the JSON worker process died while parsing a %d-byte request; starting a new one", len(text)
            )
            self._processes = self._new_pool()
            raise RequestRejected(
                "json_worker_died", "the server could not parse this request (its parser process died)", 503
            ) from None

    def shutdown(self) -> None:
        # The process pool is waited for: its manager thread, left running, races the interpreter's exit
        # (CPython 3.11.7: an "Exception ignored ... Bad file descriptor" traceback on some stops).
        for pool in (self._threads, self._processes):
            if pool is not None:
                pool.shutdown(wait=pool is self._processes, cancel_futures=True)

"""The KServe predictor: a `kserve.Model` serving an exported fedmedclip ONNX classifier on ONNX Runtime.

v2 Open Inference Protocol, REST and gRPC. One request carries exactly one input tensor:
  - `image_bytes` BYTES [N]: encoded JPEG/PNG files, decoded and resized here with the training geometry;
  - `images` UINT8 [N, S, S, 3]: pixels already through `Preprocessing.to_uint8`.
Outputs: `probabilities` FP32 [N, C], `class_index` INT64 [N], `class_name` BYTES [N]; the response parameter
`class_names` (JSON list) lets clients label every column.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
import uuid
from pathlib import Path

import numpy as np

from . import metrics
from ._kserve import InferOutput, InferRequest, InferResponse, InvalidInput, kserve
from .batcher import Batching, DynamicBatcher
from .errors import RequestRejected
from .images import Limits, as_encoded_bytes, decode_image, install_pil_guards
from .runtime import OnnxClassifier

log = logging.getLogger("fedmedclip.serving")

INPUT_UINT8 = "images"
INPUT_BYTES = "image_bytes"
OUTPUT_NAMES = ("probabilities", "class_index", "class_name")


class FedMedClipModel(kserve.Model):
    def __init__(
        self,
        name: str,
        model_path: str | Path,
        *,
        device: str = "auto",
        limits: Limits | None = None,
        batching: Batching | None = None,
        intra_op_threads: int = 0,
        origin: str | None = None,
        sha256: str | None = None,
        classifier: OnnxClassifier | None = None,
    ):
        """`classifier`: an already created session for `model_path` (the CLI creates it before importing
        kserve so that a bad model or --device fails fast); otherwise `load` creates it."""
        super().__init__(name)
        self.model_path = Path(model_path)
        self.device = device
        self.limits = limits or Limits()
        self.batching = batching or Batching()
        self.intra_op_threads = intra_op_threads
        self.origin = origin or str(model_path)
        self.sha256 = sha256
        self.classifier = classifier
        self.batcher: DynamicBatcher | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------

    def load(self) -> bool:
        install_pil_guards(self.limits)
        if self.classifier is None:
            self.classifier = OnnxClassifier(self.model_path, self.device, self.intra_op_threads)
        self.classifier.warm_up((1, self.batching.max_batch_size))
        contract = self.classifier.contract
        self._class_names = np.array([c.encode() for c in contract.class_names], dtype=np.object_)
        self._class_names_json = json.dumps(list(contract.class_names))
        self._batch_size_metric = metrics.BATCH_SIZE.labels(self.name)
        self._run_seconds_metric = metrics.RUN_SECONDS.labels(self.name)
        self._queue_metric = metrics.QUEUE_SECONDS.labels(self.name)
        self.batcher = DynamicBatcher(
            self._run,
            max_batch_size=self.batching.max_batch_size,
            max_delay_s=self.batching.max_delay_ms / 1000.0,
            concurrency=self.batching.concurrency,
            on_dispatch=self._observe_queue,
        )
        meta = contract.metadata
        log.info(
            "model %r from %s (sha256 %s): %d classes %s, image %dx%d (%s preprocessing), method=%s site=%s "
            "run_id=%s precision=%s; providers %s; batching %s; limits %s",
            self.name,
            self.origin,
            self.sha256 or "not computed",
            contract.num_classes,
            list(contract.class_names),
            contract.image_size,
            contract.image_size,
            contract.preprocessing.name,
            meta.get("fedmedclip.method"),
            meta.get("fedmedclip.site"),
            meta.get("fedmedclip.run_id"),
            contract.precision,
            list(self.classifier.providers),
            self.batching,
            self.limits,
        )
        self.ready = True
        return self.ready

    def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            self.batcher.shutdown()

    # ---- v2 model metadata -----------------------------------------------------------------------------

    def get_input_types(self) -> list[dict]:
        s = self.classifier.contract.image_size
        return [
            {"name": INPUT_UINT8, "datatype": "UINT8", "shape": [-1, s, s, 3]},
            {"name": INPUT_BYTES, "datatype": "BYTES", "shape": [-1]},
        ]

    def get_output_types(self) -> list[dict]:
        c = self.classifier.contract.num_classes
        return [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, c]},
            {"name": "class_index", "datatype": "INT64", "shape": [-1]},
            {"name": "class_name", "datatype": "BYTES", "shape": [-1]},
        ]

    # ---- inference -------------------------------------------------------------------------------------

    async def predict(self, payload, headers=None, response_headers=None) -> InferResponse:
        started = time.perf_counter()
        protocol = "grpc" if getattr(payload, "from_grpc", False) else "rest"
        kind = "invalid"
        try:
            inp = self._select_input(payload)
            kind = "uint8" if inp.name == INPUT_UINT8 else "bytes"
            images = self._uint8_images(inp) if kind == "uint8" else await self._decode_bytes(inp)
            probs, index = await self.batcher.submit(images)
        except RequestRejected as exc:
            metrics.ERRORS.labels(self.name, exc.code).inc()
            raise InvalidInput(exc.message) from None
        except Exception:
            metrics.ERRORS.labels(self.name, "internal").inc()
            raise
        finally:
            metrics.REQUESTS.labels(self.name, protocol, kind).inc()
            metrics.LATENCY.labels(self.name, protocol).observe(time.perf_counter() - started)
        metrics.IMAGES.labels(self.name).inc(len(index))
        return self._response(payload, probs, index)

    def _select_input(self, payload):
        if not isinstance(payload, InferRequest):
            raise RequestRejected(
                "protocol",
                f"model {self.name!r} speaks the v2 Open Inference Protocol only: "
                f"POST /v2/models/{self.name}/infer (REST) or ModelInfer (gRPC)",
            )
        s = self.classifier.contract.image_size
        expected = (
            f"'{INPUT_BYTES}' (BYTES [N], encoded JPEG/PNG files) or '{INPUT_UINT8}' (UINT8 [N,{s},{s},3])"
        )
        if len(payload.inputs) != 1:
            names = [i.name for i in payload.inputs]
            raise RequestRejected(
                "input_count", f"expected exactly one input tensor, {expected}; got {len(names)}: {names}"
            )
        for out in payload.request_outputs or []:
            if out.name not in OUTPUT_NAMES:
                raise RequestRejected(
                    "unknown_output", f"unknown output {out.name!r}; this model has {list(OUTPUT_NAMES)}"
                )
        inp = payload.inputs[0]
        if inp.name not in (INPUT_UINT8, INPUT_BYTES):
            raise RequestRejected("unknown_input", f"unknown input {inp.name!r}; send {expected}")
        want = "UINT8" if inp.name == INPUT_UINT8 else "BYTES"
        if inp.datatype != want:
            raise RequestRejected(
                "bad_dtype",
                f"input {inp.name!r} must have datatype {want}, got {inp.datatype}; send {expected}",
            )
        shape = list(inp.shape)
        if not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise RequestRejected("bad_shape", f"input {inp.name!r} has an invalid shape {shape}")
        return inp

    def _check_count(self, n: int) -> None:
        if n == 0:
            raise RequestRejected("empty_batch", "the request holds no images (batch dimension is 0)")
        if n > self.limits.max_batch_images:
            raise RequestRejected(
                "too_many_images",
                f"{n} images in one request, over the limit of {self.limits.max_batch_images} "
                "(server option --max-batch-images); split the request",
            )

    def _uint8_images(self, inp) -> np.ndarray:
        s = self.classifier.contract.image_size
        shape = list(inp.shape)
        if len(shape) != 4 or shape[1:] != [s, s, 3]:
            raise RequestRejected(
                "bad_shape",
                f"input {INPUT_UINT8!r} must have shape [N,{s},{s},3] (RGB pixels after the training resize), "
                f"got {shape}; send encoded files as {INPUT_BYTES!r} to have the server resize them",
            )
        self._check_count(shape[0])
        try:
            images = inp.as_numpy()
        except (ValueError, TypeError, OverflowError) as exc:
            raise RequestRejected(
                "bad_shape", f"input {INPUT_UINT8!r}: its data does not fill shape {shape} of UINT8 ({exc})"
            ) from None
        # Binary inputs arrive as read-only views of the request body; the batcher concatenates or runs them.
        return np.ascontiguousarray(images, dtype=np.uint8)

    async def _decode_bytes(self, inp) -> np.ndarray:
        shape = list(inp.shape)
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise RequestRejected(
                "bad_shape", f"input {INPUT_BYTES!r} must have shape [N] (one encoded file each), got {shape}"
            )
        self._check_count(shape[0])
        try:
            items = inp.as_numpy().reshape(-1)
        except (ValueError, TypeError, struct.error) as exc:
            raise RequestRejected(
                "bad_shape", f"input {INPUT_BYTES!r}: its data does not match shape {shape} ({exc})"
            ) from None
        if len(items) != shape[0]:
            raise RequestRejected(
                "bad_shape", f"input {INPUT_BYTES!r}: {len(items)} elements for shape {shape}"
            )
        blobs = [as_encoded_bytes(item, i) for i, item in enumerate(items)]
        total = sum(len(b) for b in blobs)
        if total > self.limits.max_request_bytes:
            raise RequestRejected(
                "request_too_large",
                f"{total:,} bytes of images in one request, over the limit of {self.limits.max_request_bytes:,} "
                "(server option --max-request-bytes)",
            )
        pre = self.classifier.contract.preprocessing
        loop = asyncio.get_running_loop()
        # Decoding is CPU work: off the event loop, one task per image so a multi-image request uses all cores.
        decoded = await asyncio.gather(
            *(loop.run_in_executor(None, decode_image, b, i, pre, self.limits) for i, b in enumerate(blobs))
        )
        return np.stack(decoded)

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One ONNX Runtime run (batcher thread)."""
        started = time.perf_counter()
        out = self.classifier.run(images)
        self._run_seconds_metric.observe(time.perf_counter() - started)
        self._batch_size_metric.observe(len(images))
        return out

    def _observe_queue(self, waits: list[float]) -> None:
        for w in waits:
            self._queue_metric.observe(w)

    def _response(self, payload: InferRequest, probs: np.ndarray, index: np.ndarray) -> InferResponse:
        n = len(index)
        available = {
            "probabilities": InferOutput("probabilities", [n, probs.shape[1]], "FP32", data=probs),
            "class_index": InferOutput("class_index", [n], "INT64", data=index),
            "class_name": InferOutput("class_name", [n], "BYTES", data=self._class_names[index]),
        }
        requested = payload.request_outputs
        outputs = [available[o.name] for o in requested] if requested else list(available.values())
        rest = not payload.from_grpc
        return InferResponse(
            # kserve 0.21 answers HTTP 500 when a response has no id: v2 clients may omit it.
            response_id=payload.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=outputs,
            parameters={"class_names": self._class_names_json},
            # REST honours the client's binary_data choices; gRPC always returns raw contents
            # (passing the REST flags into a gRPC response breaks it in kserve 0.21).
            use_binary_outputs=payload.use_binary_outputs if rest else False,
            requested_outputs=requested if rest else None,
        )

"""The KServe predictor: a `kserve.Model` serving an exported fedmedclip ONNX classifier on ONNX Runtime.

v2 Open Inference Protocol, REST and gRPC. One request carries exactly one input tensor:
  - `image_bytes` BYTES [N]: encoded JPEG/PNG files, decoded and resized here with the training geometry;
  - `images` UINT8 [N, S, S, 3]: pixels already through `Preprocessing.to_uint8`.
Outputs: `probabilities` FP32 [N, C], `class_index` INT64 [N], `class_name` BYTES [N], and for a model
exported with its OOD score `ood_score` FP32 [N] with `out_of_distribution` BOOL [N] (score above the
exported threshold); the response parameter `class_names` (JSON list) labels every column. Every answer
carries `model_version`: the registry version the server resolved, or the file's sha256 prefix. A model
that answers NaN or inf for an image gets the request an error (HTTP 500), never a 200 with null values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
import uuid

import numpy as np

from . import metrics
from ._kserve import InferenceError, InferOutput, InferRequest, InferResponse, kserve
from .batcher import DynamicBatcher
from .errors import RequestRejected, quoted
from .images import DecodePool, as_encoded_bytes, install_pil_guards
from .monitor import DriftTest, OodWindow
from .options import ModelOptions
from .runtime import OnnxClassifier, non_finite_rows
from .source import ResolvedModel

log = logging.getLogger("fedmedclip.serving")

INPUT_UINT8 = "images"
INPUT_BYTES = "image_bytes"
# The outputs, each with its datatype; the last two only for a model exported with its OOD score.
OUTPUTS = {
    "probabilities": "FP32",
    "class_index": "INT64",
    "class_name": "BYTES",
    "ood_score": "FP32",
    "out_of_distribution": "BOOL",
}
PLATFORM = "onnx_onnxv1"  # the protocol's platform name for an ONNX model run by ONNX Runtime
METADATA_PREFIX = "onnx.metadata."  # model metadata `properties`: the ONNX file's metadata_props, as they are
SERVED_PREFIX = "served."  # ... and what the server knows of the file (sha256, origin, version, device)
_LONG_PROPERTY = 4096  # a metadata value longer than this is reported by its sha256


class FedMedClipModel(kserve.Model):
    def __init__(
        self,
        name: str,
        resolved: ResolvedModel,
        options: ModelOptions,
        classifier: OnnxClassifier | None = None,
    ):
        """`resolved`: the verified file; every answer carries its `version` as `model_version`.
        `classifier`: its session, already open (the CLI opens it before importing kserve so that a bad
        model or --device fails fast); otherwise `load` opens it."""
        super().__init__(name)
        self.resolved, self.options, self.classifier = resolved, options, classifier
        self.origin, self.sha256, self.version = resolved.origin, resolved.sha256, resolved.version
        self.limits = options.limits
        self.batcher: DynamicBatcher | None = None
        self.decoder: DecodePool | None = None
        self.ood_window: OodWindow | None = None
        self.drift: DriftTest | None = None
        self._ready_gauge = metrics.MODEL_READY.labels(name)

    # ---- lifecycle -------------------------------------------------------------------------------------

    def load(self) -> bool:
        install_pil_guards(self.limits)
        if self.classifier is None:
            self.classifier = OnnxClassifier.open(self.resolved, self.options)
        contract = self.classifier.contract
        self.output_names = tuple(OUTPUTS)[: 5 if contract.ood else 3]
        if contract.ood:
            self.ood_window = OodWindow(
                self.name, self.options.monitoring.ood_window, contract.ood.false_alarm_rate
            )
            self.drift = DriftTest(
                self.name, contract.ood.reference, contract.ood.sigma, self.options.monitoring
            )
        else:
            log.warning(
                "model %r (%s) was exported without an OOD score: its answers carry no ood_score or "
                "out_of_distribution, and no drift is measured (export it again with `fedmedclip export`)",
                self.name,
                self.origin,
            )
        self._class_names = np.array([c.encode() for c in contract.class_names], dtype=np.object_)
        self._class_names_json = json.dumps(list(contract.class_names))
        self._batch_size_metric = metrics.BATCH_SIZE.labels(self.name)
        self._run_seconds_metric = metrics.RUN_SECONDS.labels(self.name)
        self._queue_metric = metrics.QUEUE_SECONDS.labels(self.name)
        self._decoded_metric = metrics.DECODED_IMAGES.labels(self.name)
        self._decoded_pixels_metric = metrics.DECODED_PIXELS.labels(self.name)
        self._decode_seconds_metric = metrics.DECODE_SECONDS.labels(self.name)
        self.decoder = DecodePool(self.options.decode_threads)
        self.batcher = DynamicBatcher(self._run, self.options.batching, on_dispatch=self._observe_queue)
        meta = contract.metadata
        log.info(
            "model %r version %s from %s (sha256 %s): %d classes %s, image %dx%d (%s preprocessing), method=%s "
            "site=%s run_id=%s precision=%s; OOD %s; providers %s; batching %s; limits %s; %d decoding threads",
            self.name,
            self.version,
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
            (
                f"threshold {contract.ood.threshold:.4g} at a false-alarm rate of {contract.ood.false_alarm_rate:g}"
                if contract.ood
                else "none"
            ),
            list(self.classifier.providers),
            self.options.batching,
            self.limits,
            self.decoder.threads,
        )
        self.ready = True
        self._ready_gauge.set(1)
        return self.ready

    def unload(self) -> None:
        """Stop serving and free the session (the model-control extension); `load` brings it back, checked
        against the same sha256."""
        self.stop()
        self.classifier = None

    def stop(self) -> None:
        self.ready = False
        self._ready_gauge.set(0)
        for part in (self.batcher, self.decoder, self.drift):
            if part is not None:
                part.shutdown()
        self.batcher = self.decoder = self.drift = None

    # ---- v2 model metadata -----------------------------------------------------------------------------

    def metadata(self) -> dict:
        """The protocol's model metadata: name, versions, platform, inputs, outputs, and `properties`
        (strings): the ONNX metadata_props under `onnx.metadata.` and the served file's facts under `served.`."""
        properties = {
            f"{SERVED_PREFIX}version": self.version,
            f"{SERVED_PREFIX}origin": self.origin,
            f"{SERVED_PREFIX}sha256": self.sha256 or "",
        }
        if self.classifier is not None:
            properties[f"{SERVED_PREFIX}device"] = self.classifier.device
            for key, value in sorted(self.classifier.contract.metadata.items()):
                if len(value) > _LONG_PROPERTY:
                    value = f"sha256:{hashlib.sha256(value.encode()).hexdigest()} ({len(value)} characters)"
                properties[METADATA_PREFIX + key] = value
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": PLATFORM,
            "inputs": self.get_input_types(),
            "outputs": self.get_output_types(),
            "properties": properties,
        }

    def get_input_types(self) -> list[dict]:
        s = self.classifier.contract.image_size
        return [
            {"name": INPUT_UINT8, "datatype": "UINT8", "shape": [-1, s, s, 3]},
            {"name": INPUT_BYTES, "datatype": "BYTES", "shape": [-1]},
        ]

    def get_output_types(self) -> list[dict]:
        c = self.classifier.contract.num_classes
        return [
            {"name": name, "datatype": OUTPUTS[name], "shape": [-1, c] if name == "probabilities" else [-1]}
            for name in self.output_names
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
            outputs = await self.batcher.submit(images)
        # Refusals (RequestRejected) and internal errors go up: the front end logs and counts each once.
        finally:
            metrics.REQUESTS.labels(self.name, protocol, kind).inc()
            metrics.LATENCY.labels(self.name, protocol).observe(time.perf_counter() - started)
        bad = non_finite_rows(outputs)
        if len(bad):  # a server-side failure (HTTP 500), not the client's
            message = (
                f"model {self.name!r} ({self.origin}) answered NaN or inf for image(s) "
                f"{bad.tolist()[:16]} of this request; no answer is given for a broken model output"
            )
            metrics.ERRORS.labels(self.name, "non_finite_output").inc()
            log.error("%s", message)
            raise InferenceError(message)
        metrics.IMAGES.labels(self.name).inc(len(outputs[1]))
        return self._response(payload, outputs)

    def _select_input(self, payload):
        s = self.classifier.contract.image_size
        expected = (
            f"'{INPUT_BYTES}' (BYTES [N], encoded JPEG/PNG files) or '{INPUT_UINT8}' (UINT8 [N,{s},{s},3])"
        )
        if len(payload.inputs) != 1:
            names = [quoted(i.name) for i in payload.inputs[:4]]
            raise RequestRejected(
                "input_count",
                f"expected exactly one input tensor, {expected}; got {len(payload.inputs)}: {names}",
            )
        for out in payload.request_outputs or []:
            if out.name not in self.output_names:
                raise RequestRejected(
                    "unknown_output",
                    f"unknown output {quoted(out.name)}; this model has {list(self.output_names)}",
                )
        inp = payload.inputs[0]
        datatypes = {t["name"]: t["datatype"] for t in self.get_input_types()}
        if inp.name not in datatypes:
            raise RequestRejected("unknown_input", f"unknown input {quoted(inp.name)}; send {expected}")
        want = datatypes[inp.name]
        if inp.datatype != want:
            raise RequestRejected(
                "bad_dtype",
                f"input {inp.name!r} must have datatype {want}, got {quoted(inp.datatype)}; send {expected}",
            )
        # The transport checked the shape's entries (serving.protocol); each input kind checks its length.
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
        # Decoding is CPU work: off the event loop, on the shared pool, within the request's pixel and CPU budget.
        return await self.decoder.decode(
            blobs, self.classifier.contract.preprocessing, self.limits, self._observe_decode
        )

    def _observe_decode(self, pixels: int, cpu_seconds: float) -> None:
        self._decoded_metric.inc()
        self._decoded_pixels_metric.inc(pixels)
        self._decode_seconds_metric.observe(cpu_seconds)

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """One ONNX Runtime run (batcher thread)."""
        started = time.perf_counter()
        out = self.classifier.run(images)
        self._run_seconds_metric.observe(time.perf_counter() - started)
        self._batch_size_metric.observe(len(images))
        return out

    def _observe_queue(self, waits: list[float]) -> None:
        for w in waits:
            self._queue_metric.observe(w)

    def _response(self, payload: InferRequest, outputs: tuple[np.ndarray, ...]) -> InferResponse:
        probs, index = outputs[:2]
        values = {"probabilities": probs, "class_index": index, "class_name": self._class_names[index]}
        parameters = {"class_names": self._class_names_json}
        ood = self.classifier.contract.ood
        if ood is not None:
            score, embedding = outputs[2:4]
            values["ood_score"], values["out_of_distribution"] = score, score > ood.threshold
            parameters["ood_threshold"] = repr(ood.threshold)
            self.ood_window.observe(values["out_of_distribution"])
            self.drift.observe(embedding)
        requested = payload.request_outputs
        names = [o.name for o in requested] if requested else list(values)
        rest = not payload.from_grpc
        return InferResponse(
            # kserve 0.21 answers HTTP 500 when a response has no id: v2 clients may omit it.
            response_id=payload.id or str(uuid.uuid4()),
            model_name=self.name,
            model_version=self.version,
            infer_outputs=[InferOutput(n, list(values[n].shape), OUTPUTS[n], data=values[n]) for n in names],
            parameters=parameters,
            # REST honours the client's binary_data choices; gRPC always returns raw contents
            # (passing the REST flags into a gRPC response breaks it in kserve 0.21).
            use_binary_outputs=payload.use_binary_outputs if rest else False,
            requested_outputs=requested if rest else None,
        )

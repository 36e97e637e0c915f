"""The KServe predictor: a `kserve.Model` serving an exported fedmedclip ONNX classifier on ONNX Runtime, v2
Open Inference Protocol over REST and gRPC (docs/contracts.md, "The served protocol"). A request carries one
input tensor: `image_bytes` BYTES [N] (encoded JPEG/PNG files, decoded here with training's geometry) or
`images` UINT8 [N, S, S, 3] (pixels already through `Preprocessing.to_uint8`). A model that answers NaN or inf
for an image gets the request an error (HTTP 500), never a 200 with null values."""

from __future__ import annotations

import json
import logging
import math
import struct
import time
import uuid

import numpy as np

from fedmedclip.digests import META_DRIFT_REFERENCE, sha256_bytes

from . import metrics
from ._kserve import InferenceError, InferOutput, InferRequest, InferResponse, kserve, raw_bytes_elements
from .batcher import DynamicBatcher
from .errors import RequestRejected, quoted
from .images import DecodePool, install_pil_guards
from .monitor import OutputMonitor
from .options import ModelOptions
from .runtime import OnnxClassifier, non_finite_rows
from .source import ResolvedModel

log = logging.getLogger("fedmedclip.serving")

INPUT_UINT8 = "images"
INPUT_BYTES = "image_bytes"
INPUTS = {INPUT_UINT8: "UINT8", INPUT_BYTES: "BYTES"}
# The outputs and their datatypes; the last two only for a model exported with its OOD score.
OUTPUTS = {
    "probabilities": "FP32",
    "class_index": "INT64",
    "class_name": "BYTES",
    "ood_score": "FP32",
    "out_of_distribution": "BOOL",
}


class FedMedClipModel(kserve.Model):
    def __init__(self, name: str, resolved: ResolvedModel, options: ModelOptions, classifier=None):
        """`classifier`: the OnnxClassifier of `resolved`, already open (the CLI opens it before importing
        kserve so that a bad model or --device fails fast); otherwise `load` opens it."""
        super().__init__(name)
        self.resolved, self.options, self.classifier = resolved, options, classifier
        self.version, self.limits = resolved.version, options.limits
        self.batcher = self.decoder = self.monitor = None
        metrics.MODEL_READY.labels(name).set_function(lambda: self.ready)

    def load(self) -> bool:
        install_pil_guards(self.limits)
        if self.classifier is None:
            self.classifier = OnnxClassifier.open(self.resolved, self.options)
        contract, ood = self.classifier.contract, self.classifier.contract.ood
        self.output_names = tuple(OUTPUTS)[: 5 if ood else 3]
        calibration = "none"
        if ood:
            self.monitor = OutputMonitor(self.name, ood, self.options.monitoring)
            calibration = f"threshold {ood.threshold:.4g} at a false-alarm rate of {ood.false_alarm_rate:g}"
        else:
            log.warning(
                f"model {self.name!r} ({self.resolved.origin}) was exported without an OOD score: its "
                "answers carry no ood_score or out_of_distribution, and no drift is measured (export it "
                "again with `fedmedclip export`)"
            )
        self._class_names = np.array([c.encode() for c in contract.class_names], dtype=np.object_)
        self._class_names_json = json.dumps(list(contract.class_names))
        self.decoder = DecodePool(self.options.decode_threads, self.name)
        self.batcher = DynamicBatcher(self.classifier.run, self.options.batching, self.name)
        s, meta = contract.image_size, contract.metadata
        provenance = " ".join(f"{k}={meta.get('fedmedclip.' + k)}" for k in ("method", "site", "run_id"))
        log.info(
            f"model {self.name!r} version {self.version} from {self.resolved.origin} (sha256 "
            f"{self.resolved.sha256}): {contract.num_classes} classes {list(contract.class_names)}, "
            f"image {s}x{s} ({contract.preprocessing.name} preprocessing), {provenance} precision="
            f"{contract.precision}; OOD {calibration}; providers {list(self.classifier.providers)}; batching "
            f"{self.options.batching}; limits {self.limits}; {self.decoder.threads} decoding threads"
        )
        self.ready = True
        return self.ready

    def stop(self) -> None:
        self.ready = False
        for part in (self.batcher, self.decoder, self.monitor):
            if part is not None:
                part.shutdown()
        self.batcher = self.decoder = self.monitor = None

    def metadata(self) -> dict:
        """The protocol's model metadata (the server checks the model is loaded). `properties` (strings): what
        the server knows of the file under `served.`, and the ONNX metadata_props under `onnx.metadata.` (a
        value over 4,096 characters by its sha256, and the drift reference by its sha256 whatever its size: one
        embedding per held-out image of the exporting party, which no differential privacy covers and no
        client needs)."""
        contract, s = self.classifier.contract, self.classifier.contract.image_size
        served = {
            "version": self.version,
            "origin": self.resolved.public_origin,
            "sha256": self.resolved.sha256,
        }
        properties = {f"served.{key}": value for key, value in served.items()}
        properties["served.device"] = self.classifier.device
        for key, value in sorted(contract.metadata.items()):
            if len(value) > 4096 or key == META_DRIFT_REFERENCE:
                value = f"sha256:{sha256_bytes(value.encode())} ({len(value)} characters)"
            properties[f"onnx.metadata.{key}"] = value
        shapes = {INPUT_UINT8: [-1, s, s, 3], INPUT_BYTES: [-1], "probabilities": [-1, contract.num_classes]}
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnx_onnxv1",  # the protocol's name for an ONNX model run by ONNX Runtime
            "inputs": [{"name": n, "datatype": INPUTS[n], "shape": shapes[n]} for n in INPUTS],
            "outputs": [
                {"name": n, "datatype": OUTPUTS[n], "shape": shapes.get(n, [-1])} for n in self.output_names
            ],
            "properties": properties,
        }

    async def predict(self, payload, headers=None, response_headers=None) -> InferResponse:
        started = time.perf_counter()
        protocol = "grpc" if payload.from_grpc else "rest"
        kind = "invalid"
        try:
            inp = self._select_input(payload)
            kind = "uint8" if inp.name == INPUT_UINT8 else "bytes"
            # UINT8 data may be a read-only view of the request body: the batcher only concatenates or runs it
            data = self._read(inp)
            if kind == "bytes":  # bytes whichever way they came: binary, or JSON base64 (serving.protocol)
                pre = self.classifier.contract.preprocessing
                data = await self.decoder.decode(list(data.reshape(-1)), pre, self.limits)
            outputs = await self.batcher.submit(data)
        # Refusals (RequestRejected) and internal errors go up: the front end logs and counts each once.
        finally:
            metrics.REQUESTS.labels(self.name, protocol, kind).inc()
            metrics.LATENCY.labels(self.name, protocol).observe(time.perf_counter() - started)
        bad = non_finite_rows(outputs)
        if len(bad):  # a server-side failure (HTTP 500), not the client's
            message = (
                f"model {self.name!r} ({self.resolved.origin}) answered NaN or inf for image(s) "
                f"{bad.tolist()[:16]} of this request; no answer is given for a broken model output"
            )
            metrics.ERRORS.labels(self.name, "non_finite_output").inc()
            log.error("%s", message)
            raise InferenceError(message)
        metrics.IMAGES.labels(self.name).inc(len(outputs[1]))
        return self._response(payload, outputs)

    def _select_input(self, payload):
        """The request's one input tensor, its name and datatype checked (the transport checked its shape's
        entries, serving.protocol; each input kind checks its length)."""
        s = self.classifier.contract.image_size
        expected = (
            f"'{INPUT_BYTES}' (BYTES [N], encoded JPEG/PNG files) or '{INPUT_UINT8}' (UINT8 [N,{s},{s},3])"
        )
        if len(payload.inputs) != 1:
            names = ", ".join(quoted(i.name) for i in payload.inputs[:4])
            raise RequestRejected(
                "input_count",
                f"expected exactly one input tensor, {expected}; got {len(payload.inputs)}: {names}",
            )
        requested = [out.name for out in payload.request_outputs or []]
        if len(set(requested)) != len(requested):
            twice = next(n for n in requested if requested.count(n) > 1)
            raise RequestRejected("duplicate_output", f"output {quoted(twice)} is requested more than once")
        for name in requested:
            if name not in self.output_names:
                raise RequestRejected(
                    "unknown_output",
                    f"unknown output {quoted(name)}; this model has {list(self.output_names)}",
                )
        inp = payload.inputs[0]
        if inp.name not in INPUTS:
            raise RequestRejected("unknown_input", f"unknown input {quoted(inp.name)}; send {expected}")
        if inp.datatype != INPUTS[inp.name]:
            raise RequestRejected(
                "bad_dtype",
                f"input {inp.name!r} must have datatype {INPUTS[inp.name]}, got {quoted(inp.datatype)}; "
                f"send {expected}",
            )
        return inp

    def _read(self, inp) -> np.ndarray:
        """The input's data, its shape and image count checked: [N,S,S,3] pixels or [N] encoded files."""
        s, shape = self.classifier.contract.image_size, list(inp.shape)
        if inp.name == INPUT_UINT8 and (len(shape) != 4 or shape[1:] != [s, s, 3]):
            raise RequestRejected(
                "bad_shape",
                f"input {INPUT_UINT8!r} must have shape [N,{s},{s},3] (RGB pixels after the training resize), "
                f"got {shape}; send encoded files as {INPUT_BYTES!r} to have the server resize them",
            )
        if inp.name == INPUT_BYTES and not (len(shape) in (1, 2) and shape[1:] in ([], [1])):
            raise RequestRejected(
                "bad_shape", f"input {INPUT_BYTES!r} must have shape [N] (one encoded file each), got {shape}"
            )
        if shape[0] == 0:
            raise RequestRejected("empty_batch", "the request holds no images (batch dimension is 0)")
        if shape[0] > self.limits.max_batch_images:
            what = f"{shape[0]} images in one request,"
            raise self.limits.exceeded("too_many_images", "max_batch_images", what, "; split the request")
        try:
            elements = raw_bytes_elements(inp, math.prod(shape)) if inp.name == INPUT_BYTES else None
            data = inp.as_numpy() if elements is None else elements.reshape(shape)
        except (ValueError, TypeError, OverflowError, struct.error) as exc:
            raise RequestRejected(
                "bad_shape",
                f"input {inp.name!r}: its data does not fill shape {shape} of {inp.datatype} ({exc})",
            ) from None
        return data  # as_numpy reshapes to `shape`: the count of elements is checked

    def _response(self, payload: InferRequest, outputs: tuple[np.ndarray, ...]) -> InferResponse:
        probs, index = outputs[:2]
        values = {"probabilities": probs, "class_index": index, "class_name": self._class_names[index]}
        parameters = {"class_names": self._class_names_json}
        ood = self.classifier.contract.ood
        if ood is not None:
            score, embedding = outputs[2:4]
            values["ood_score"], values["out_of_distribution"] = score, score > ood.threshold
            parameters["ood_threshold"] = repr(ood.threshold)
            self.monitor.observe(values["out_of_distribution"], embedding)
        requested = payload.request_outputs
        names = [o.name for o in requested] if requested else list(values)
        rest = not payload.from_grpc
        return InferResponse(
            # The protocol's response id is a string; kserve's to_rest writes null without one (v2 clients may
            # send none).
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

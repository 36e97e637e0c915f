"""Prometheus collectors of the server, on prometheus_client's default registry: kserve's /metrics
endpoint exposes that registry, next to its own request_*_seconds histograms."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

REQUESTS = Counter(
    "fedmedclip_requests", "Inference requests received", ["model", "protocol", "input"]
)  # protocol: rest|grpc; input: bytes|uint8|invalid
ERRORS = Counter(
    "fedmedclip_request_errors", "Inference requests refused or failed, by reason", ["model", "reason"]
)
LATENCY = Histogram(
    "fedmedclip_request_latency_seconds",
    "Time inside the model for one request: validation, decoding, queueing and inference",
    ["model", "protocol"],
    buckets=_LATENCY_BUCKETS,
)
IMAGES = Counter("fedmedclip_images", "Images classified", ["model"])
BATCH_SIZE = Histogram(
    "fedmedclip_batch_size",
    "Images per ONNX Runtime run (its _count is the number of runs)",
    ["model"],
    buckets=_BATCH_BUCKETS,
)
RUN_SECONDS = Histogram(
    "fedmedclip_ort_run_seconds", "Duration of one ONNX Runtime run", ["model"], buckets=_LATENCY_BUCKETS
)
QUEUE_SECONDS = Histogram(
    "fedmedclip_queue_wait_seconds",
    "Time a request's images waited in the batcher before their run started",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
DECODED_IMAGES = Counter(
    "fedmedclip_images_decoded", "Encoded images (image_bytes) decoded and resized", ["model"]
)
DECODED_PIXELS = Counter("fedmedclip_decoded_pixels", "Pixels of the encoded images decoded", ["model"])
DECODE_SECONDS = Histogram(
    "fedmedclip_image_decode_seconds",
    "CPU time to decode and resize one encoded image",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)

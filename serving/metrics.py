"""Prometheus collectors of the server, on prometheus_client's default registry (served at /metrics, with
kserve's own request_*_seconds histograms).

Label values are bounded: `model` is always the name of a served model or one of `UNKNOWN_MODEL` (a request
naming a model this server does not serve) and `NO_MODEL` (a request to no model's route); `reason` is one
of the server's own short codes. Nothing a client writes becomes a label value, so no client can grow
/metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

UNKNOWN_MODEL = "_unknown"
NO_MODEL = "-"

REQUESTS = Counter(
    "fedmedclip_requests", "Inference requests received", ["model", "protocol", "input"]
)  # protocol: rest|grpc; input: bytes|uint8|invalid
ERRORS = Counter("fedmedclip_request_errors", "Requests refused or failed, by reason", ["model", "reason"])
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

# Server state.
READY = Gauge(
    "fedmedclip_server_ready", "1 while the server is ready (every model loaded, not shutting down)"
)
MODEL_READY = Gauge("fedmedclip_model_ready", "1 while the model is loaded and served", ["model"])
IN_FLIGHT = Gauge("fedmedclip_requests_in_flight", "Inference requests being handled (REST and gRPC)")

# Out-of-distribution images and feature drift (serving/monitor.py).
OOD_IMAGES = Counter(
    "fedmedclip_ood_images", "Images whose OOD score is above the exported threshold", ["model"]
)
OOD_WINDOW_RATE = Gauge(
    "fedmedclip_ood_window_rate",
    "Share of the last --ood-window images flagged out_of_distribution (NaN until the window is full)",
    ["model"],
)
OOD_FALSE_ALARM_RATE = Gauge(
    "fedmedclip_ood_false_alarm_rate",
    "The false-alarm rate the OOD threshold was calibrated to at export (on held-out in-distribution images)",
    ["model"],
)
DRIFT_MMD2 = Gauge(
    "fedmedclip_drift_mmd2",
    "MMD^2 between the embeddings of the last --drift-window images and the exported reference",
    ["model"],
)
DRIFT_THRESHOLD = Gauge(
    "fedmedclip_drift_mmd2_threshold",
    "The permutation test's MMD^2 threshold at --drift-p-value for the same window",
    ["model"],
)
DRIFT_P_VALUE = Gauge(
    "fedmedclip_drift_p_value",
    "Permutation p-value of the last drift test (small: recent requests differ from the reference)",
    ["model"],
)
DRIFT_TESTS = Counter("fedmedclip_drift_tests", "Drift tests run", ["model"])

"""Prometheus collectors of the server (prometheus_client's default registry, served at /metrics with
kserve's request_*_seconds histograms). Label values are bounded: `model` is a served model's name,
UNKNOWN_MODEL (a request naming a model not served) or NO_MODEL (no model's route), `reason` one of the
server's own codes: nothing a client writes becomes a label value, so no client can grow /metrics."""

from functools import partial

from prometheus_client import Counter, Gauge, Histogram

UNKNOWN_MODEL = "_unknown"
NO_MODEL = "-"

# Most collectors are per served model.
_counter = partial(Counter, labelnames=["model"])
_gauge = partial(Gauge, labelnames=["model"])
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_seconds = partial(Histogram, labelnames=["model"], buckets=_LATENCY_BUCKETS)

# protocol: rest|grpc; input: bytes|uint8|invalid
REQUESTS = Counter("fedmedclip_requests", "Inference requests received", ["model", "protocol", "input"])
ERRORS = Counter("fedmedclip_request_errors", "Requests refused or failed, by reason", ["model", "reason"])
LATENCY = _seconds(
    "fedmedclip_request_latency_seconds",
    "Time inside the model for one request: validation, decoding, queueing and inference",
    labelnames=["model", "protocol"],
)
IMAGES = _counter("fedmedclip_images", "Images classified")
BATCH_SIZE = Histogram(
    "fedmedclip_batch_size",
    "Images per ONNX Runtime run (its _count is the number of runs)",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
RUN_SECONDS = _seconds("fedmedclip_ort_run_seconds", "Duration of one ONNX Runtime run")
QUEUE_SECONDS = _seconds(
    "fedmedclip_queue_wait_seconds", "Time a request's images waited in the batcher before their run started"
)
DECODED_IMAGES = _counter("fedmedclip_images_decoded", "Encoded images (image_bytes) decoded and resized")
DECODED_PIXELS = _counter("fedmedclip_decoded_pixels", "Pixels of the encoded images decoded")
DECODE_SECONDS = _seconds(
    "fedmedclip_image_decode_seconds", "CPU time to decode and resize one encoded image"
)

# Server state.
READY = Gauge(
    "fedmedclip_server_ready", "1 while the server is ready (every model loaded, not shutting down)"
)
MODEL_READY = _gauge("fedmedclip_model_ready", "1 while the model is loaded and served")
IN_FLIGHT = Gauge("fedmedclip_requests_in_flight", "Inference requests being handled (REST and gRPC)")
BYTES_HELD = Gauge(
    "fedmedclip_request_bytes_held",
    "Request bytes held against --max-inflight-bytes (REST bodies, gRPC messages)",
)

# Out-of-distribution images and feature drift (serving/monitor.py).
OOD_IMAGES = _counter("fedmedclip_ood_images", "Images whose OOD score is above the exported threshold")
OOD_WINDOW_RATE = _gauge(
    "fedmedclip_ood_window_rate",
    "Share of the last --ood-window images flagged out_of_distribution (NaN until the window is full)",
)
OOD_FALSE_ALARM_RATE = _gauge(
    "fedmedclip_ood_false_alarm_rate",
    "The false-alarm rate the OOD threshold was calibrated to at export (on held-out in-distribution images)",
)
DRIFT_MMD2 = _gauge(
    "fedmedclip_drift_mmd2",
    "MMD^2 between the embeddings of the last --drift-window images and the exported reference",
)
DRIFT_THRESHOLD = _gauge(
    "fedmedclip_drift_mmd2_threshold",
    "The permutation test's MMD^2 threshold at --drift-p-value for the same window",
)
DRIFT_P_VALUE = _gauge(
    "fedmedclip_drift_p_value",
    "Permutation p-value of the last drift test (small: recent requests differ from the reference)",
)
DRIFT_TESTS = _counter("fedmedclip_drift_tests", "Drift tests run")

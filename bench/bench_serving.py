"""Images per second and request latency of the inference server against a bare ONNX Runtime session on the
same model, over batch size and client concurrency (not a test).

The server is the real one (`python -m serving serve`, i.e. `fedmedclip serve`) in a subprocess on loopback;
clients send UINT8 [b, S, S, 3] tensors (gRPC by default, or REST binary) from `c` threads for a fixed time. The
bare baseline runs `session.run` back to back on the same batches. The headline figure is the overhead ratio at
batch 32: bare images/s over server images/s with one client (goal: at most 1.25 on CPU). Client and server share
this machine's cores, so the server figures include the client's cost.

    python bench/bench_serving.py                       # builds a 224x224 contract conv net (tests/serving_fixtures.py)
    python bench/bench_serving.py model.onnx --device cuda --batch-sizes 1,32,64 --concurrency 1,16,64
    python bench/bench_serving.py --run-dir RUN --site global --precision fp16   # the real exporter (fedmedclip.export)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "fedmedclip"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(args, workdir: Path) -> Path:
    if args.model:
        return Path(args.model)
    if args.run_dir:
        from fedmedclip.export import export_onnx

        return export_onnx(args.run_dir, args.site, workdir / "model.onnx", precision=args.precision)
    sys.path.insert(0, str(REPO / "tests"))
    from serving_fixtures import make_contract_onnx

    # A conv net sized so that ONNX Runtime dominates, like the CLIP encoder does (~8 ms/image on 2 cores).
    return make_contract_onnx(workdir / "bench.onnx", image_size=args.image_size, width=48, depth=4)


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.array(latencies) * 1000.0, q)) if latencies else float("nan")


# ---- bare ONNX Runtime -------------------------------------------------------------------------------------


def bare_sessions(model: Path, device: str) -> dict[str, object]:
    """The server's own session options (idle threads do not spin) and ONNX Runtime's defaults (they spin);
    the headline ratio uses whichever is faster, so the server is never flattered by a weak baseline."""
    from serving.runtime import create_session

    return {
        "bare ORT": create_session(model, device),
        "bare ORT (spin)": create_session(model, device, spin=True),
    }


def bench_bare(name: str, session, images: np.ndarray, seconds: float) -> dict:
    for _ in range(2):
        session.run(None, {"images": images})
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < 3:
        t = time.perf_counter()
        session.run(None, {"images": images})
        latencies.append(time.perf_counter() - t)
    return _row(name, "-", len(images), 1, latencies, time.perf_counter() - start, server_batch=None)


def _row(mode, protocol, batch, concurrency, latencies, wall, server_batch) -> dict:
    return {
        "mode": mode,
        "protocol": protocol,
        "batch": batch,
        "concurrency": concurrency,
        "requests": len(latencies),
        "images_per_s": batch * len(latencies) / wall,
        "p50_ms": percentile_ms(latencies, 50),
        "p99_ms": percentile_ms(latencies, 99),
        "server_mean_batch": server_batch,
        "server_ort_ms_per_run": None,
    }


# ---- the server --------------------------------------------------------------------------------------------


class Server:
    def __init__(self, model: Path, args, log_path: Path):
        self.http_port, self.grpc_port = free_port(), free_port()
        cmd = [
            sys.executable, "-m", "serving", "serve", str(model), "--name", MODEL_NAME, "--device", args.device,
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--max-batch-size", str(args.server_max_batch), "--max-batch-delay-ms", str(args.max_batch_delay_ms),
            "--batch-concurrency", str(args.batch_concurrency), "--max-batch-images", str(max(args.batch_sizes)),
            "--max-request-bytes", str(256 * 1024 * 1024), "--log-level", "WARNING",
        ]  # fmt: skip
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"server exited with {self.proc.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            try:
                if requests.get(f"{self.http_url}/v2/models/{MODEL_NAME}/ready", timeout=1).ok:
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"server not ready after 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def batch_stats(self) -> tuple[float, float, float]:
        """(ONNX Runtime runs, images, seconds inside ONNX Runtime) so far, from the server's histograms."""
        from prometheus_client.parser import text_string_to_metric_families

        wanted = (
            "fedmedclip_batch_size_count",
            "fedmedclip_batch_size_sum",
            "fedmedclip_ort_run_seconds_sum",
        )
        totals = dict.fromkeys(wanted, 0.0)
        for family in text_string_to_metric_families(
            requests.get(f"{self.http_url}/metrics", timeout=5).text
        ):
            for sample in family.samples:
                if sample.labels.get("model") == MODEL_NAME and sample.name in totals:
                    totals[sample.name] += sample.value
        return tuple(totals[k] for k in wanted)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _grpc_caller(server: Server, images: np.ndarray):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    inp = grpcclient.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    outputs = [grpcclient.InferRequestedOutput("probabilities")]

    def call():
        result = client.infer(MODEL_NAME, [inp], outputs=outputs)
        assert result.as_numpy("probabilities").shape[0] == len(images)

    return call, client.close


def _http_caller(server: Server, images: np.ndarray):
    # v2 REST with the binary-data extension, built once: the client should cost as little as possible.
    raw = images.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": list(images.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    body = head + raw
    session = requests.Session()
    url = f"{server.http_url}/v2/models/{MODEL_NAME}/infer"
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}

    def call():
        resp = session.post(url, data=body, headers=headers, timeout=120)
        resp.raise_for_status()

    return call, session.close


def bench_server(server: Server, protocol: str, images: np.ndarray, concurrency: int, seconds: float) -> dict:
    make = _grpc_caller if protocol == "grpc" else _http_caller
    callers = [make(server, images) for _ in range(concurrency)]
    for call, _ in callers:  # connect and warm up
        call()
    runs0, images0, ort0 = server.batch_stats()
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        call = callers[i][0]
        barrier.wait()
        try:
            while time.perf_counter() < stop_at[0]:
                t = time.perf_counter()
                call()
                latencies[i].append(time.perf_counter() - t)
        except BaseException as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    stop_at[0] = start + seconds
    barrier.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for _, close in callers:
        close()
    if errors:
        raise SystemExit(f"{protocol} b={len(images)} c={concurrency}: {errors[0]!r}")
    runs1, images1, ort1 = server.batch_stats()
    row = _row(
        "server", protocol, len(images), concurrency, [x for lat in latencies for x in lat], wall, None
    )
    if runs1 > runs0:
        row["server_mean_batch"] = (images1 - images0) / (runs1 - runs0)
        row["server_ort_ms_per_run"] = 1000.0 * (ort1 - ort0) / (runs1 - runs0)
    return row


# ---- report ------------------------------------------------------------------------------------------------


def markdown(rows: list[dict]) -> str:
    lines = [
        "| mode | protocol | batch | clients | requests | images/s | p50 ms | p99 ms | server batch | ORT ms/run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mb = "" if r["server_mean_batch"] is None else f"{r['server_mean_batch']:.1f}"
        ort = "" if r["server_ort_ms_per_run"] is None else f"{r['server_ort_ms_per_run']:.1f}"
        lines.append(
            f"| {r['mode']} | {r['protocol']} | {r['batch']} | {r['concurrency']} | {r['requests']} | "
            f"{r['images_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {mb} | {ort} |"
        )
    return "\n".join(lines)


def headline(
    server: Server, sessions: dict, protocols: list[str], images: np.ndarray, seconds: float, rounds: int
):
    """Alternate bare and server measurements at one batch size, one client: other load on the machine then
    hits both sides alike. Returns per-round ratios (best bare images/s over server images/s) per protocol."""
    ratios: dict[str, list[float]] = {p: [] for p in protocols}
    for _ in range(rounds):
        bare = max(bench_bare(n, s, images, seconds)["images_per_s"] for n, s in sessions.items())
        for protocol in protocols:
            ratios[protocol].append(bare / bench_server(server, protocol, images, 1, seconds)["images_per_s"])
    return ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="a contract ONNX file; default: build one")
    ap.add_argument("--run-dir", help="export this training run with fedmedclip.export instead")
    ap.add_argument("--site", default="global", help="with --run-dir (default: %(default)s)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="with --run-dir")
    ap.add_argument("--image-size", type=int, default=224, help="of the built model (default: %(default)s)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--batch-sizes", default="1,8,32", help="images per request (default: %(default)s)")
    ap.add_argument("--concurrency", default="1,4,16", help="client threads (default: %(default)s)")
    ap.add_argument("--protocols", default="grpc,http", help="grpc and/or http (default: %(default)s)")
    ap.add_argument(
        "--seconds", type=float, default=4.0, help="timed seconds per cell (default: %(default)s)"
    )
    ap.add_argument(
        "--server-max-batch", type=int, default=32, help="server --max-batch-size (default: %(default)s)"
    )
    ap.add_argument(
        "--max-batch-delay-ms", type=float, default=2.0, help="server batching delay (default: %(default)s)"
    )
    ap.add_argument(
        "--batch-concurrency", type=int, default=1, help="server runs in flight (default: %(default)s)"
    )
    ap.add_argument(
        "--overhead-batch", type=int, default=32, help="batch of the headline ratio (default: %(default)s)"
    )
    ap.add_argument(
        "--ratio-rounds", type=int, default=3, help="alternating rounds for the ratio (default: %(default)s)"
    )
    ap.add_argument("--json", help="also write the rows and settings to this JSON file")
    args = ap.parse_args()
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    concurrency = [int(x) for x in args.concurrency.split(",")]
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]

    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    model = build_model(args, workdir)
    from serving.runtime import OnnxClassifier

    size = OnnxClassifier(model, device=args.device).contract.image_size
    rng = np.random.default_rng(0)
    batches = {b: rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8) for b in args.batch_sizes}

    print(f"model {model} ({size}x{size}), device {args.device}, {os.cpu_count()} CPUs", file=sys.stderr)
    sessions = bare_sessions(model, args.device)
    rows = [
        bench_bare(name, session, batches[b], args.seconds)
        for b in args.batch_sizes
        for name, session in sessions.items()
    ]
    server = Server(model, args, workdir / "server.log")
    try:
        for protocol in protocols:
            for b in args.batch_sizes:
                for c in concurrency:
                    rows.append(bench_server(server, protocol, batches[b], c, args.seconds))
                    r = rows[-1]
                    print(f"  {protocol} b={b} c={c}: {r['images_per_s']:.1f} img/s", file=sys.stderr)
        ob = args.overhead_batch
        overhead_images = batches.get(ob)
        if overhead_images is None:
            overhead_images = rng.integers(0, 256, (ob, size, size, 3), dtype=np.uint8)
        ratios = headline(server, sessions, protocols, overhead_images, args.seconds, args.ratio_rounds)
    finally:
        server.stop()

    print(markdown(rows))
    print()
    ratio = {p: float(np.median(r)) for p, r in ratios.items()}
    for protocol, rounds in ratios.items():
        verdict = "within" if ratio[protocol] <= 1.25 else "NOT within"
        print(
            f"overhead at batch {ob}, one client, {protocol}: best bare ORT / server images/s = {ratio[protocol]:.3f} "
            f"(median of {', '.join(f'{x:.3f}' for x in rounds)}; {verdict} the 1.25x goal)"
        )
    if args.json:
        import onnxruntime

        Path(args.json).write_text(
            json.dumps(
                {
                    "model": str(model),
                    "image_size": size,
                    "device": args.device,
                    "cpus": os.cpu_count(),
                    "machine": platform.platform(),
                    "onnxruntime": onnxruntime.__version__,
                    "settings": {k: v for k, v in vars(args).items() if k != "json"},
                    "rows": rows,
                    "overhead_ratio": ratio,
                    "overhead_ratio_rounds": ratios,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

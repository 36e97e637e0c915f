"""How long another client waits while others send large JSON requests (issue 17: at most 1 s of delay for
another client under four concurrent attackers).

The real server (`python -m serving serve`) on a contract model at 224x224, so a legal JSON request of 64
UINT8 images is 9.6 M numbers (34 MB). Four attacker threads send, back to back, one kind of body:
  legal      64 images as a JSON UINT8 tensor (answered 200)
  malformed  a 9 MB JSON document without "inputs" (400)
  nan        the legal body with a NaN in it (400)
  elements   a body of more numbers than the element budget (400, refused before parsing)
while a victim sends one small binary request (one image, REST, then one gRPC) every 100 ms. The delay is
the victim's latency under attack minus its median alone.

    nice -n 10 .venv/bin/python bench/bench_json_fairness.py --seconds 20 --attack legal,malformed,nan,elements
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

MODEL = "fedmedclip"
S = 224


def attack_bodies() -> dict[str, bytes]:
    images = np.random.default_rng(0).integers(0, 256, (64, S, S, 3), dtype=np.uint8)
    spec = {
        "name": "images",
        "datatype": "UINT8",
        "shape": list(images.shape),
        "data": images.ravel().tolist(),
    }
    legal = orjson.dumps({"inputs": [spec]})
    return {
        "legal": legal,
        "malformed": b'{"not_inputs": [' + b"1234567," * (9_000_000 // 8) + b"0]}",
        "nan": legal[:-4] + b",NaN]}]}",
        "elements": b'{"inputs": [{"data": [' + b"0," * 11_000_000 + b"0]}]}",
    }


def victim(http: str, grpc: str, stop: threading.Event, latencies: list[float], errors: list[str]) -> None:
    import tritonclient.grpc as grpcclient

    image = np.random.default_rng(1).integers(0, 256, (1, S, S, 3), dtype=np.uint8)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [1, S, S, 3],
                    "parameters": {"binary_data_size": image.size},
                }
            ]
        }
    ).encode()
    client = grpcclient.InferenceServerClient(grpc)
    inp = grpcclient.InferInput("images", [1, S, S, 3], "UINT8")
    inp.set_data_from_numpy(image)
    turn = 0
    while not stop.is_set():
        started = time.perf_counter()
        try:
            if turn % 2 == 0:
                resp = requests.post(
                    f"http://{http}/v2/models/{MODEL}/infer",
                    data=head + image.tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(head))},
                    timeout=120,
                )
                if resp.status_code != 200:
                    errors.append(f"REST {resp.status_code}")
            else:
                client.infer(MODEL, [inp])
        except Exception as exc:  # noqa: BLE001 - recorded and reported
            errors.append(f"{type(exc).__name__}: {exc}")
        latencies.append(time.perf_counter() - started)
        turn += 1
        stop.wait(0.1)
    client.close()


def attacker(http: str, body: bytes, stop: threading.Event, codes: list[int]) -> None:
    session = requests.Session()
    while not stop.is_set():
        try:
            resp = session.post(
                f"http://{http}/v2/models/{MODEL}/infer",
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=300,
            )
            codes.append(resp.status_code)
        except requests.RequestException:
            codes.append(-1)


def measure(http: str, grpc: str, seconds: float, body: bytes | None, attackers: int) -> dict:
    stop, latencies, errors, codes = threading.Event(), [], [], []
    threads = [threading.Thread(target=victim, args=(http, grpc, stop, latencies, errors))]
    if body is not None:
        threads += [
            threading.Thread(target=attacker, args=(http, body, stop, codes)) for _ in range(attackers)
        ]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(600)
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "p50_s": statistics.median(lat),
        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "max_s": lat[-1],
        "victim_errors": errors[:5],
        "attack_codes": {str(c): codes.count(c) for c in sorted(set(codes))},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--attackers", type=int, default=4)
    parser.add_argument("--attack", default="legal,malformed,nan,elements")
    parser.add_argument("--json-workers", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from serving_fixtures import make_contract_onnx, running_server

    bodies = attack_bodies()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_contract_onnx(Path(tmp) / "m.onnx", image_size=S)
        options = ["--max-batch-images", "64", "--json-workers", str(args.json_workers)]
        with running_server([str(model)], Path(tmp), *options) as server:
            results["alone"] = measure(server.http, server.grpc, args.seconds / 2, None, 0)
            base = results["alone"]["p50_s"]
            print(f"victim alone: p50 {base * 1e3:.0f} ms, max {results['alone']['max_s'] * 1e3:.0f} ms")
            for kind in args.attack.split(","):
                r = measure(server.http, server.grpc, args.seconds, bodies[kind], args.attackers)
                r["extra_delay_max_s"] = r["max_s"] - base
                r["extra_delay_p99_s"] = r["p99_s"] - base
                results[kind] = r
                print(
                    f"{args.attackers} x {kind:9s} ({len(bodies[kind]) / 1e6:.0f} MB): victim p50 {r['p50_s'] * 1e3:.0f} ms, "
                    f"p99 {r['p99_s'] * 1e3:.0f} ms, max {r['max_s'] * 1e3:.0f} ms (extra delay at most "
                    f"{r['extra_delay_max_s']:.2f} s); attackers got {r['attack_codes']}; victim errors {r['victim_errors']}"
                )
            log = server.log()
            results["tracebacks_in_log"] = log.count("Traceback")
    print(f"tracebacks in the server log: {results['tracebacks_in_log']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

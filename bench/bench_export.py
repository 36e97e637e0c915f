"""Benchmark the exported ONNX classifier on bare ONNX Runtime (not a test).

Exports a model (from a run directory, or, with no run directory, a FedMedCLIP site model built from a
seeded random FAM + MLP on a built-in random backbone, so no training is needed), then measures images/s
per batch size and the p50/p99 latency of single-image runs (optionally from concurrent threads), on
the CUDA execution provider when available, else CPU. Also reports ORT-vs-torch fp32 parity.

CPU smoke run (2 cores):
  .venv/bin/python bench/bench_export.py --backbone random-vit-b32 --precision fp32 --batch-sizes 1,8 \\
      --iters 3 --latency-runs 20
GPU (onnxruntime-gpu installed), the issue's target (ViT-B/16, batch 64, fp16 and fp32):
  python bench/bench_export.py --backbone random-vit-b16 --precision fp32,fp16 --batch-sizes 1,16,64 \\
      --iters 50 --latency-runs 500 --concurrency 1,8 --provider cuda --json bench-gpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmedclip.backbone import load_backbone, make_preprocessing  # noqa: E402
from fedmedclip.export import export_classifier  # noqa: E402
from fedmedclip.inference import ImageClassifier, ImageEncoder, load_classifier  # noqa: E402
from fedmedclip.modules import FeatureAdaptationModule, PrivateMLP  # noqa: E402

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def random_classifier(backbone: str, num_classes: int, seed: int = 0) -> tuple[ImageClassifier, dict]:
    """A FedMedCLIP site model (FAM + private MLP + ensemble) with seeded random heads: the same graph
    and cost as a trained one, no run directory needed."""
    bb = load_backbone(backbone)
    names = CLASSES[:num_classes] + [f"class_{i}" for i in range(len(CLASSES), num_classes)]
    text = bb.encode_text([f"a picture of a {c}" for c in names])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fam = FeatureAdaptationModule(bb.feature_dim)
        mlp = PrivateMLP(bb.feature_dim, num_classes)
    prep = make_preprocessing("squash", bb)
    clf = ImageClassifier(ImageEncoder(bb.model), prep, fam, text, mlp, "code")
    meta = {
        "method": "fedmedclip",
        "site": "bench",
        "class_names": names,
        "backbone": bb.identity(),
        "preprocessing": prep.describe(),
    }
    return clf, meta


def make_session(path: Path, provider: str, threads: int = 0):
    import onnxruntime as ort

    available = ort.get_available_providers()
    want_cuda = provider == "cuda" or (provider == "auto" and "CUDAExecutionProvider" in available)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:  # on a shared CPU, fewer threads (and no spin-waiting) give steadier numbers
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=providers)
    got = session.get_providers()
    # ONNX Runtime silently falls back to CPU when CUDA cannot start: refuse to report that as GPU numbers.
    if want_cuda and "CUDAExecutionProvider" not in got:
        raise SystemExit(
            f"CUDA execution provider requested but the session got {got} (available: {available})"
        )
    return session, got[0]


def throughput(session, size: int, batch: int, iters: int, warmup: int) -> dict:
    x = np.random.default_rng(batch).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(warmup):
        session.run(None, {"images": x})
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        session.run(None, {"images": x})
        times.append(time.perf_counter() - t0)
    per_batch = statistics.median(times)
    return {"batch": batch, "images_per_s": batch / per_batch, "ms_per_batch_p50": 1e3 * per_batch}


def single_image_latency(session, size: int, runs: int, concurrency: int, warmup: int) -> dict:
    """`concurrency` threads each issue single-image runs back to back on the shared session."""
    x = np.random.default_rng(7).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    for _ in range(warmup):
        session.run(None, {"images": x})
    lat: list[float] = []
    lock = threading.Lock()
    per_thread = max(1, runs // concurrency)

    def worker():
        mine = []
        for _ in range(per_thread):
            t0 = time.perf_counter()
            session.run(None, {"images": x})
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1e3
    return {
        "concurrency": concurrency,
        "runs": len(lat),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "images_per_s": len(lat) / wall,
    }


def parity(session, clf: ImageClassifier, size: int) -> float:
    """Max |p_onnx - p_torch fp32| on 4 random images (clf must still be the fp32 model)."""
    x = np.random.default_rng(3).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    with torch.no_grad():
        want = clf(torch.from_numpy(x))[0].numpy()
    return float(np.abs(session.run(None, {"images": x})[0] - want).max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", help="export this run's model instead of a random one")
    ap.add_argument("--site", default="global", help="with --run-dir: global | site name | index")
    ap.add_argument("--backbone", default="random-vit-b16", help="without --run-dir (default: %(default)s)")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--precision", default="fp32,fp16", help="comma list of fp32, fp16")
    ap.add_argument("--batch-sizes", default="1,8,64")
    ap.add_argument("--iters", type=int, default=10, help="timed runs per batch size (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--latency-runs", type=int, default=100, help="single-image runs for p50/p99 (0: skip)")
    ap.add_argument("--concurrency", default="1", help="comma list of threads for single-image latency")
    ap.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    ap.add_argument("--onnx-dir", help="keep the exported files here (default: a temporary folder)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import onnxruntime as ort

    results = {
        "onnxruntime": ort.__version__,
        "torch_threads": torch.get_num_threads(),
        "available_providers": ort.get_available_providers(),
        "models": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.onnx_dir or tmp)
        if args.run_dir:
            build = lambda: load_classifier(args.run_dir, args.site)  # noqa: E731
        else:
            build = lambda: random_classifier(args.backbone, args.classes)  # noqa: E731
        for precision in args.precision.split(","):
            clf, meta = build()
            # export_classifier halves the fp16 encoder in place: parity needs an untouched fp32 twin.
            ref = build()[0] if precision == "fp16" else clf
            size = clf.preprocessing.size
            t0 = time.perf_counter()
            path = export_classifier(clf, meta, folder / f"bench-{precision}.onnx", precision, run_id="bench")
            export_s = time.perf_counter() - t0
            session, provider = make_session(path, args.provider, args.threads)
            row = {
                "model": args.run_dir or args.backbone,
                "site": meta["site"],
                "precision": precision,
                "provider": provider,
                "export_s": export_s,
                "onnx_mib": path.stat().st_size / 2**20,
                "parity_vs_torch_fp32": parity(session, ref, size),
                "throughput": [
                    throughput(session, size, int(b), args.iters, args.warmup)
                    for b in args.batch_sizes.split(",")
                ],
                "single_image": [
                    single_image_latency(session, size, args.latency_runs, int(c), args.warmup)
                    for c in args.concurrency.split(",")
                ]
                if args.latency_runs
                else [],
            }
            results["models"].append(row)
            print(
                f"\n{row['model']} {precision} on {provider}: export {export_s:.1f} s, {row['onnx_mib']:.0f} MiB, "
                f"max |dp| vs torch fp32 {row['parity_vs_torch_fp32']:.1e}"
            )
            for t in row["throughput"]:
                print(
                    f"  batch {t['batch']:>4}: {t['images_per_s']:8.1f} img/s  ({t['ms_per_batch_p50']:.1f} ms/batch)"
                )
            for s in row["single_image"]:
                print(
                    f"  single image x{s['concurrency']} threads: p50 {s['p50_ms']:.1f} ms  p99 {s['p99_ms']:.1f} ms  "
                    f"{s['images_per_s']:.1f} img/s ({s['runs']} runs)"
                )
            del session, clf, ref
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Feature extraction, images per second: the project's extraction (each image-encoder engine) against a plain loop.

- plain loop: PIL decode, resize (the same recipe), normalise, `model.get_image_features`, batch 64, one after
  another in one thread: what a script without this project would do.
- project (engine E): `build_feature_store` into a fresh directory, as a site's extraction runs it: the image
  list's content hash, strict decoding (Pillow plus libjpeg-turbo's scan check) in threads overlapped with the
  encoder, the encoder on engine E (fedmedclip.encoders), the class prompts, the store written. For
  `onnxruntime` the graph is exported once before the timed runs (that one-off cost is printed apart), and
  each run opens a session and checks it on the probe image, as a holder's extraction process does.

Repetitions alternate plain loop and engines; medians are reported, with each engine's features compared to the
plain loop's (max |a - b| / max |b|). A stage profile (one batch, serial) says where the time goes.

    nice -n 10 .venv/bin/python bench/bench_extract.py --backbone random-vit-b32 \\
        --data ../shared/datasets/brain-tumor-mri --images 192 --threads 2 --repeats 3
    .venv/bin/python bench/bench_extract.py --images 64 --repeats 1      # synthetic data when ../shared is absent
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fedmedclip import encoders
from fedmedclip.backbone import load_backbone, make_preprocessing
from fedmedclip.data import load_image, open_source
from fedmedclip.encoders import ENGINES, graph_key, open_image_encoder, relative_difference
from fedmedclip.features import build_feature_store
from fedmedclip.synthetic import generate

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "brain-tumor-mri"


def plain_loop(records, model, prep, batch_size: int, device: str = "cpu") -> torch.Tensor:
    """What a script without this project would do: no validation, no overlap, PyTorch eager."""
    feats = []
    for i in range(0, len(records), batch_size):
        arrays = [prep.to_uint8(Image.open(r.path).convert("RGB")) for r in records[i : i + batch_size]]
        pixels = prep.normalise(torch.from_numpy(np.stack(arrays)).to(device))
        with torch.no_grad():
            feats.append(model.get_image_features(pixel_values=pixels).pooler_output.cpu())
    return torch.cat(feats)


def profile(records, backbone, prep, engines, encoder_cache, device) -> dict:
    """Milliseconds per image of each stage on one batch, run serially."""
    out = {}
    t = time.perf_counter()
    images = [load_image(r.path) for r in records]
    out["decode (strict)"] = time.perf_counter() - t
    t = time.perf_counter()
    arrays = np.stack([prep.to_uint8(im) for im in images])
    out["resize"] = time.perf_counter() - t
    for engine in engines:
        encoder = open_image_encoder(backbone, prep, engine, encoder_cache, device)
        encoder.encode(arrays[:2])  # warm-up
        t = time.perf_counter()
        encoder.encode(arrays)
        out[f"encoder ({engine}, incl. normalise)"] = time.perf_counter() - t
    return {k: 1000 * v / len(records) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="random-vit-b32")
    ap.add_argument(
        "--data", default=None, help=f"image folder or CSV (default: {DEFAULT_DATA} or synthetic)"
    )
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--preprocessing", default="squash", choices=("squash", "clip"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--engines", default="torch,onnxruntime", help=f"comma-separated, of {', '.join(ENGINES[1:])}"
    )
    ap.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where both sides encode (cuda: the plain loop's model and the project's torch engine on the GPU)",
    )
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engines = [e for e in args.engines.split(",") if e]

    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    data = args.data or (str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else None)
    if data is None:  # synthetic 512 px PNGs (the MRI JPEGs are 512 px too)
        per_class = -(-args.images // 4)
        data = str(
            generate(tmp / "synthetic", sites=1, per_class_per_site=per_class, test_per_class=1, size=512)
        )
    image_set = open_source(data)
    pool = image_set.split("train")
    if len(pool) < args.images:
        sys.exit(f"need {args.images} training images, {data} has {len(pool)}")
    chosen = [pool[i] for i in sorted(np.random.default_rng(0).choice(len(pool), args.images, replace=False))]

    backbone = load_backbone(args.backbone)
    prep = make_preprocessing(args.preprocessing, backbone)
    encoder_cache = tmp / "encoders"
    export_seconds = {}
    for engine in engines:  # the one-off export, outside the timed runs
        t = time.perf_counter()
        open_image_encoder(backbone, prep, engine, encoder_cache, args.device)
        export_seconds[engine] = time.perf_counter() - t
    stages = profile(chosen[: args.batch_size], backbone, prep, engines, encoder_cache, args.device)
    model = backbone.model if args.device == "cpu" else copy.deepcopy(backbone.model).to(args.device)

    rates: dict[str, list[float]] = {"plain loop": [], **{e: [] for e in engines}}
    differences = {}
    reference = None
    for rep in range(args.repeats):
        t = time.perf_counter()
        reference = plain_loop(chosen, model, prep, args.batch_size, args.device)
        rates["plain loop"].append(len(chosen) / (time.perf_counter() - t))
        for engine in engines:
            encoders._OPENED.clear()  # each run opens its engine, as one holder's extraction process does
            t = time.perf_counter()
            store = build_feature_store(
                chosen,
                image_set.class_names,
                backbone,
                prep,
                directory=tmp / f"store-{engine}-{rep}",
                progress=False,
                batch_size=args.batch_size,
                engine=engine,
                encoder_cache=encoder_cache,
                device=args.device,
            )
            rates[engine].append(len(chosen) / (time.perf_counter() - t))
            assert store.provenance["encoder"]["engine"] == engine
            differences[engine] = relative_difference(store.features, reference)
        print(f"repetition {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()))

    plain = statistics.median(rates["plain loop"])
    print(f"\nstage profile, one batch of {args.batch_size} run serially (ms/image):")
    for stage, ms in stages.items():
        print(f"  {stage}: {ms:.1f}")
    print(
        f"\n{args.backbone}, {len(chosen)} images from {Path(data).name}, {args.preprocessing}, "
        f"{args.threads} threads, batch {args.batch_size}, median of {args.repeats}:\n"
    )
    print("| extraction | images/s (median) | runs | vs plain loop | features vs plain loop |")
    print("|---|---|---|---|---|")
    print(
        f"| plain loop (PIL, resize, `get_image_features`) | {plain:.1f} | "
        f"{', '.join(f'{r:.1f}' for r in rates['plain loop'])} | 1.00x | - |"
    )
    for engine in engines:
        med = statistics.median(rates[engine])
        print(
            f"| project, `--encoder-engine {engine}` | {med:.1f} | {', '.join(f'{r:.1f}' for r in rates[engine])} | "
            f"**{med / plain:.2f}x** | {differences[engine]:.1e} |"
        )
    for engine in engines:
        if engine == "onnxruntime":
            print(
                f"\none-off export of the ONNX graph (then cached as encoders/{graph_key(backbone, prep)}.onnx): "
                f"{export_seconds[engine]:.1f} s"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "backbone": args.backbone,
                    "images": len(chosen),
                    "data": data,
                    "preprocessing": args.preprocessing,
                    "threads": args.threads,
                    "batch_size": args.batch_size,
                    "images_per_second": rates,
                    "median": {k: statistics.median(v) for k, v in rates.items()},
                    "relative_difference_to_plain_loop": differences,
                    "stage_ms_per_image": stages,
                    "open_seconds_first": export_seconds,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

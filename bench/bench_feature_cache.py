"""Seconds per round: training on cached features vs encoding the images in every step.

The reference implementations push every batch through the frozen CLIP image encoder at every
step. Because the encoder is frozen and nothing augments, we encode once. This measures both ways
with the same method code (FedMedCLIP's site trainer), sites, steps, batch size and backbone:
- cached:   trainer.train_round over cached features (`steps` batches per site);
- uncached: per step, decode the batch's image files, preprocess, encode with the backbone,
            then the same one-batch train_round.

    python bench/bench_feature_cache.py --backbone random-vit-b32 --sites 3 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedmedclip.backbone import load_backbone, make_preprocessing
from fedmedclip.data import load_preprocessed, open_source
from fedmedclip.methods import METHODS, MethodContext, SiteData
from fedmedclip.synthetic import generate


def encode(records, backbone, prep) -> torch.Tensor:
    arrays = np.stack([load_preprocessed(r.path, prep) for r in records])
    return backbone.encode_images(prep.normalise(torch.from_numpy(arrays)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="random-vit-b32")
    ap.add_argument("--data", default=None, help="image folder or CSV; default: synthetic 224x224 PNGs")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="local steps per site per round")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="rounds timed (after one warm-up round)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    torch.manual_seed(0)

    if args.data:
        image_set = open_source(args.data)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
        image_set = open_source(
            generate(tmp, sites=args.sites, per_class_per_site=40, test_per_class=1, size=224)
        )
    pool = image_set.split("train")
    rng = np.random.default_rng(0)
    need = args.sites * args.steps * args.batch_size
    if len(pool) < need:
        sys.exit(f"need {need} training images, the data has {len(pool)}")
    chosen = [pool[i] for i in rng.choice(len(pool), need, replace=False)]
    per_site = [
        chosen[k * args.steps * args.batch_size : (k + 1) * args.steps * args.batch_size]
        for k in range(args.sites)
    ]

    backbone = load_backbone(args.backbone)
    prep = make_preprocessing("squash", backbone)
    text = backbone.encode_text([f"a picture of a {c}" for c in image_set.class_names])
    method = METHODS["fedmedclip"](
        MethodContext(backbone.feature_dim, len(image_set.class_names), text, batch_size=args.batch_size)
    )

    def site(records, x):
        y = torch.from_numpy(image_set.labels(records))
        empty = x[:0]
        return SiteData("s", x, y, empty, y[:0], empty, y[:0])

    # Encoding once (the cache build), timed for reference.
    t0 = time.perf_counter()
    cached = [encode(recs, backbone, prep) for recs in per_site]
    encode_once = time.perf_counter() - t0
    trainers = [
        method.new_site(site(recs, x), k) for k, (recs, x) in enumerate(zip(per_site, cached, strict=True))
    ]

    def cached_round(r):
        for t in trainers:
            t.train_round(r)

    def uncached_round(r):
        for t, recs in zip(trainers, per_site, strict=True):
            full = t.data
            for s in range(args.steps):
                batch = recs[s * args.batch_size : (s + 1) * args.batch_size]
                t.data = site(batch, encode(batch, backbone, prep))  # what the reference does every step
                t.train_round(r)
            t.data = full

    def timed(fn) -> float:
        fn(1)  # warm-up
        t = time.perf_counter()
        for r in range(args.rounds):
            fn(r + 2)
        return (time.perf_counter() - t) / args.rounds

    sec_cached = timed(cached_round)
    sec_uncached = timed(uncached_round)
    out = {
        "backbone": args.backbone,
        "sites": args.sites,
        "steps_per_site_per_round": args.steps,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "seconds_per_round_cached": sec_cached,
        "seconds_per_round_encoding_every_step": sec_uncached,
        "speedup": sec_uncached / sec_cached,
        "one_time_encoding_seconds": encode_once,
        "images_encoded_once": need,
    }
    print("| backbone | sites x steps x batch | cached s/round | encode-every-step s/round | speed-up |")
    print("|---|---|---|---|---|")
    print(
        f"| {args.backbone} | {args.sites} x {args.steps} x {args.batch_size} | {sec_cached:.4f} | "
        f"{sec_uncached:.2f} | **{sec_uncached / sec_cached:.0f}x** |"
    )
    print(f"one-time encoding of the {need} images: {encode_once:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

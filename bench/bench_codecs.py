"""Bytes per site per round and the sites' mean balanced accuracy, per uplink codec.

FedMedCLIP on the brain-tumour MRI set (cached `random-vit-b32` features), 3 sites, 10 rounds, iid and
dirichlet(0.5), seeds 0-2, every run through the federation runtime itself (`fedmedclip.engine.simulate`:
the server and site workers over an in-memory mailbox, the uplink coded with `--codec-up`, a reference and
each site's error-feedback memory; downlink `fp16-zlib`). Bytes are the byte ledger of results.json
(payload lengths); BACC is results.json's sites' mean balanced accuracy at the selected round.

Every image is encoded once into one feature store (cached under --cache-dir); each partition's holders take
their rows from it, so the grid does not re-encode the data per partition and seed.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_codecs.py \
        --data ../shared/datasets/brain-tumor-mri --backbone random-vit-b32 \
        --uplink fp16-zlib,delta-ef-q4-zlib --partitions iid,dirichlet:0.5 --seeds 3 --rounds 10 \
        --json runs/bench-codecs.json

`--sizes-only` instead measures candidate quantisers (bits, block, step rule, zlib strategy) on real FAM
updates: payload bytes and the relative error one encode leaves in the error-feedback memory."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from json_results import write_json

from fedmedclip.backbone import load_backbone, make_preprocessing
from fedmedclip.codec import BlockQuant, Codec, Delta, ErrorFeedback, Zlib, decode, encode_state, get_codec
from fedmedclip.config import TrainConfig
from fedmedclip.data import DUPLICATE_POLICIES
from fedmedclip.engine import method_for, simulate, site_setups
from fedmedclip.features import FeatureStore, build_feature_store
from fedmedclip.methods import resolved_preprocessing
from fedmedclip.paths import DEFAULT_CACHE_DIR
from fedmedclip.preparation import SERVER, Prepared, holder_image_ids, load_image_set, partition_for


def whole_store(cfg: TrainConfig):
    """Every image of the data set, encoded once (the cache makes later calls instant); with the backbone
    and preprocessing that made it."""
    image_set = load_image_set(cfg)
    backbone = load_backbone(cfg.backbone)
    prep = make_preprocessing(resolved_preprocessing(cfg), backbone)
    store = build_feature_store(
        image_set.records,
        image_set.class_names,
        backbone,
        prep,
        cache_dir=cfg.cache_dir,
        prompt_template=cfg.prompt_template,
        workers=4,
        desc="encoding all images",
    )
    return store, backbone, prep


def prepared_from(cfg: TrainConfig, store: FeatureStore, backbone, prep) -> Prepared:
    """What fedmedclip.preparation.prepare returns, with every holder's rows cut from the one store."""
    image_set = load_image_set(cfg)
    partition = partition_for(cfg, image_set)
    stores = {}
    for holder in [*partition.site_names, SERVER]:
        ids = holder_image_ids(partition, holder)
        rows = torch.from_numpy(store.rows(ids))
        # The whole store's provenance: a site's report carries one (hashes only), and this is where its
        # rows come from.
        stores[holder] = FeatureStore(
            store.features[rows],
            store.labels[rows],
            ids,
            store.class_names,
            store.text_features,
            store.provenance,
        )
    return Prepared(cfg, image_set, partition, backbone, prep, stores, 0.0)


def run(cfg: TrainConfig, prepared: Prepared) -> dict:
    """One federated run through the runtime; the figures this bench reports, from its results.json."""
    with tempfile.TemporaryDirectory(prefix="bench-codecs-") as tmp:
        res = simulate(replace(cfg, out=tmp), prepared, Path(tmp), progress=False)
    hist = res["history"]
    ups = [b for h in hist for b in h["bytes_up"] if b is not None]
    return {
        "best_round": res["metrics"]["best_round"],
        "site_bacc_mean": res["metrics"]["site_mean"]["bacc"],
        "site_acc_mean": res["metrics"]["site_mean"]["acc"],
        "last_site_bacc_mean": res["metrics"]["last_round"]["site_mean"]["bacc"],
        # The sites' mean BACC averaged over every round: the selected round moves with tiny validation
        # splits (about 90 images a site on this data), this does not.
        "rounds_site_bacc_mean": float(np.mean([np.mean([s["bacc"] for s in h["sites"]]) for h in hist])),
        "bytes_up_per_site_per_round": res["comm"]["bytes_up_per_site_per_round"],
        "bytes_up_max": max(ups),
        "bytes_down_per_site_per_round": res["comm"]["bytes_down_per_site_per_round"],
    }


def sizes_only(cfg: TrainConfig, prepared: Prepared) -> None:
    """Payload bytes of candidate quantisers on real round-1 and round-5 FAM updates of every site."""
    candidates = {}
    for bits in (3, 4):
        for block in (64, 256, 512):
            for rms_step in (0.0, 0.5, 0.75, 1.0):
                for strategy in ("default", "huffman"):
                    name = f"q{bits}-b{block}-r{rms_step}-{strategy}"
                    candidates[name] = Codec(
                        name,
                        BlockQuant(bits, block, rms_step),
                        transforms=(Delta(), ErrorFeedback()),
                        coders=(Zlib(9, strategy),),
                    )
    candidates["delta-ef-q4-zlib (registered)"] = get_codec("delta-ef-q4-zlib")
    method = method_for(cfg, prepared)
    trainers = [method.new_site(s.data, s.index) for s in site_setups(cfg, prepared, method)]
    global_state = method.shared_state(method.new_global())
    received = decode(encode_state(global_state, "fp16-zlib")).state
    sizes = {n: [] for n in candidates}
    errors = {n: [] for n in candidates}
    for r in range(1, 6):
        ups = []
        for t in trainers:
            t.load_shared(received)
            t.train_round(r)
            ups.append(t.shared_update())
        if r in (1, 5):
            for n, c in candidates.items():
                for u in ups:
                    enc = c.encode(u, reference=received)
                    sizes[n].append(len(enc.payload))
                    delta = torch.cat([(u[k] - received[k]).reshape(-1) for k in u])
                    err = torch.cat([v.reshape(-1) for v in enc.memory.values()])
                    errors[n].append(float(err.norm() / delta.norm()))
        global_state = method.aggregate(global_state, ups, [1 / len(ups)] * len(ups))
        received = decode(encode_state(global_state, "fp16-zlib")).state
    print(f"{'candidate':32s} {'max bytes':>10s} {'mean bytes':>10s} {'rel. error':>10s}")
    for n in candidates:
        print(f"{n:32s} {max(sizes[n]):10d} {np.mean(sizes[n]):10.0f} {np.mean(errors[n]):10.3f}")


def print_table(results: list[dict], partitions: list[str], codecs: list[str]) -> None:
    """Mean ± std over seeds, and the mean paired difference to fp16-zlib (same partition and seed)."""
    print(
        "\n| uplink | partition | seeds | bytes/site/round (max) | sites' BACC, selected round | Δ vs fp16-zlib "
        "| sites' BACC, mean over rounds | Δ vs fp16-zlib |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for part in partitions:
        ref = {r["seed"]: r for r in results if r["partition"] == part and r["uplink"] == "fp16-zlib"}
        for codec in codecs:
            rows = [r for r in results if r["partition"] == part and r["uplink"] == codec]
            if not rows:
                continue
            cells = []
            for key in ("site_bacc_mean", "rounds_site_bacc_mean"):
                v = 100 * np.array([r[key] for r in rows])
                paired = [100 * (r[key] - ref[r["seed"]][key]) for r in rows if r["seed"] in ref]
                diff = (
                    f"{np.mean(paired):+.2f} ± {np.std(paired) / np.sqrt(len(paired)):.2f}" if paired else "-"
                )
                cells += [f"{v.mean():.2f} ± {v.std():.2f}", diff]
            kb = np.mean([r["bytes_up_per_site_per_round"] for r in rows]) / 1e3
            kb_max = max(r["bytes_up_max"] for r in rows) / 1e3
            print(
                f"| `{codec}` | {part} | {len(rows)} | {kb:.1f} kB ({kb_max:.1f}) | "
                + " | ".join(cells)
                + " |"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/datasets/brain-tumor-mri")
    ap.add_argument("--backbone", default="random-vit-b32")
    ap.add_argument("--uplink", default="fp16-zlib,delta-ef-q4-zlib", help="comma-separated codec names")
    ap.add_argument("--partitions", default="iid,dirichlet:0.5")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (with --first-seed: from there)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument(
        "--table-from", default=None, help="only print the table of earlier --json files (comma-separated)"
    )
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument(
        "--duplicates",
        default=TrainConfig.duplicates,
        choices=DUPLICATE_POLICIES,
        help="the data set's exact duplicates (as `train --duplicates`; default: %(default)s)",
    )
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    ap.add_argument("--json", default=None, help="write every run's figures here")
    ap.add_argument("--sizes-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.table_from:
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        rows = [r for f in args.table_from.split(",") for r in json.loads(Path(f).read_text())]
        rows = [r for r in rows if r["seed"] in seeds]
        print_table(rows, args.partitions.split(","), args.uplink.split(","))
        return 0
    base = TrainConfig(
        data=args.data,
        backbone=args.backbone,
        sites=args.sites,
        rounds=args.rounds,
        cache_dir=args.cache_dir,
        duplicates=args.duplicates,
    ).validate()
    store, backbone, prep = whole_store(base)
    results = []
    for part in args.partitions.split(","):
        scheme, _, alpha = part.partition(":")
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            cfg = replace(base, partition=scheme, alpha=float(alpha) if alpha else None, seed=seed).validate()
            prepared = prepared_from(cfg, store, backbone, prep)
            if args.sizes_only:
                sizes_only(cfg, prepared)
                return 0
            for codec in args.uplink.split(","):
                t0 = time.perf_counter()
                res = run(replace(cfg, codec_up=codec).validate(), prepared)
                row = {"uplink": codec, "partition": part, "seed": seed, **res}
                results.append(row)
                print(
                    f"{codec:18s} {part:14s} seed {seed}: sites' BACC {100 * res['site_bacc_mean']:.2f} "
                    f"(round {res['best_round']}; last {100 * res['last_site_bacc_mean']:.2f}), "
                    f"{res['bytes_up_per_site_per_round'] / 1e3:.1f} kB up/site/round "
                    f"(max {res['bytes_up_max'] / 1e3:.1f}), {time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
                write_json(args.json, results)
    print_table(results, args.partitions.split(","), args.uplink.split(","))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Utility against privacy: the sites' and the global balanced accuracy at epsilon = inf, 8, 4, 1 per site
(delta 1e-5, record-level DP-SGD at each site, `--dp-target-epsilon`), FedMedCLIP and FACMIC, several seeds.

Every run goes through the federation runtime itself (`fedmedclip.engine.simulate`: the server and the site
workers over an in-memory mailbox), exactly as `fedmedclip train --dp-target-epsilon E` runs it. Every image
is encoded once per preprocessing (bench_codecs.whole_store); each seed's partition takes its rows from that.
Figures are results.json's: the sites' mean balanced accuracy and the global test's at the selected round,
the worst site's, and the largest epsilon any site spent.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_privacy.py \
        --data ../shared/datasets/brain-tumor-mri --backbone tiny --methods fedmedclip,facmic \
        --epsilons inf,8,4,1 --seeds 3 --rounds 10 --json runs/bench-privacy.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from bench_codecs import prepared_from, whole_store
from json_results import write_json

from fedmedclip.config import TrainConfig
from fedmedclip.engine import simulate
from fedmedclip.paths import DEFAULT_CACHE_DIR


def run_one(cfg: TrainConfig, prepared) -> dict:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-privacy-") as tmp:
        res = simulate(replace(cfg, out=tmp), prepared, Path(tmp), progress=False)
    m = res["metrics"]
    sites = [s["bacc"] for s in m["sites"] if s.get("bacc") is not None]
    return {
        "sites_bacc": float(np.mean(sites)),
        "worst_site_bacc": float(min(sites)),
        "global_bacc": float(m["global"]["bacc"]),
        "epsilon_max": (res.get("privacy") or {}).get("epsilon"),
        "noise_multipliers": sorted(
            s["noise_multiplier"]
            for s in ((res["privacy"].get("record_level") or {}).get("sites") or {}).values()
        ),
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/datasets/brain-tumor-mri")
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--methods", default="fedmedclip,facmic")
    ap.add_argument("--epsilons", default="inf,8,4,1")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--partition", default="iid")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--clip", type=float, default=1.0, help="DP-SGD's per-example clip C")
    ap.add_argument(
        "--method-opt", action="append", default=[], help="METHOD:KEY=VALUE, e.g. facmic:local_steps=50"
    )
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    epsilons = [math.inf if e.strip() == "inf" else float(e) for e in args.epsilons.split(",")]
    method_opts: dict[str, dict] = {}
    for item in args.method_opt:
        method, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        method_opts.setdefault(method, {})[key] = json.loads(value)
    rows = []
    for method in args.methods.split(","):
        base = TrainConfig(
            data=args.data,
            method=method,
            backbone=args.backbone,
            sites=args.sites,
            rounds=args.rounds,
            partition=args.partition,
            batch_size=args.batch_size,
            cache_dir=args.cache_dir,
            method_options=method_opts.get(method, {}),
        ).validate()
        store, backbone, prep = whole_store(base)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            prepared = prepared_from(replace(base, seed=seed).validate(), store, backbone, prep)
            for eps in epsilons:
                privacy = (
                    {} if math.isinf(eps) else {"target_epsilon": eps, "delta": args.delta, "clip": args.clip}
                )
                cfg = replace(base, seed=seed, privacy=privacy).validate()
                prepared.cfg = cfg
                row = {"method": method, "epsilon": eps, "seed": seed, **run_one(cfg, prepared)}
                rows.append(row)
                print(
                    f"{method:10s} eps={eps:<4} seed={seed}  sites bacc {row['sites_bacc']:.4f}  worst "
                    f"{row['worst_site_bacc']:.4f}  global {row['global_bacc']:.4f}  spent "
                    f"{row['epsilon_max'] if row['epsilon_max'] is not None else 'inf'}  ({row['seconds']:.0f} s)",
                    flush=True,
                )
                write_json(args.json, {"args": vars(args), "runs": rows})
    print()
    print("| method | epsilon per site | sites' BACC | worst site BACC | global BACC | Δ sites vs inf |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        ref = [r["sites_bacc"] for r in rows if r["method"] == method and math.isinf(r["epsilon"])]
        for eps in epsilons:
            sel = [r for r in rows if r["method"] == method and r["epsilon"] == eps]
            if not sel:
                continue

            def ms(key, sel=sel):
                v = 100 * np.array([r[key] for r in sel])
                return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0:.2f}"

            delta = f"{100 * (np.mean([r['sites_bacc'] for r in sel]) - np.mean(ref)):+.2f}" if ref else "n/a"
            print(
                f"| {method} | {'∞' if math.isinf(eps) else f'{eps:g}'} | {ms('sites_bacc')} | "
                f"{ms('worst_site_bacc')} | {ms('global_bacc')} | {delta} |"
            )


if __name__ == "__main__":
    main()

"""What the robust aggregators cost an honest federation, and what they buy against one hostile site.

FedMedCLIP on the brain-tumour MRI set (cached features of the chosen backbone), 3 sites, iid and
dirichlet(0.5), every run through the federation runtime itself (`fedmedclip.engine.simulate`, the server's
`--aggregator` rule, its absolute update bound and its relative norm rule all in force). Two scenarios:

- `honest`: every site trains as it should;
- `flip`: site_2 sends its update's difference to the global module reversed and 5 times as large (within
  the absolute bound and under the relative rule's 10x, so only the aggregation rule stands against it).

Reported: the global test's balanced accuracy and the sites' mean balanced accuracy at the selected round
(results.json), mean ± std over seeds, per aggregator, partition and scenario.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_aggregators.py --data ../shared/datasets/brain-tumor-mri \\
        --aggregators mean,median,trimmed-mean,krum --partitions iid,dirichlet:0.5 --seeds 3 --rounds 10 \\
        --json runs/bench-aggregators.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_codecs import prepared_from, whole_store  # noqa: E402  (one feature store for the grid)

from fedmedclip.config import TrainConfig  # noqa: E402
from fedmedclip.engine import simulate  # noqa: E402
from fedmedclip.federation.site import SiteWorker  # noqa: E402
from fedmedclip.paths import DEFAULT_CACHE_DIR  # noqa: E402

FLIP = -5.0


class _Flipped:
    """site_2's trainer, whose shared update is sent reversed and scaled about the module it received."""

    def __init__(self, trainer):
        self.trainer, self.received = trainer, None

    def __getattr__(self, name):
        return getattr(self.trainer, name)

    def load_shared(self, state):
        self.received = {k: v.clone() for k, v in state.items()}
        self.trainer.load_shared(state)

    def shared_update(self):
        honest = self.trainer.shared_update()
        return {k: self.received[k] + FLIP * (v - self.received[k]) for k, v in honest.items()}


def run(cfg: TrainConfig, prepared, scenario: str) -> dict:
    original = SiteWorker.__init__

    def hostile_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if scenario == "flip" and self.name == "site_2":
            self.trainer = _Flipped(self.trainer)

    SiteWorker.__init__ = hostile_init
    try:
        with tempfile.TemporaryDirectory(prefix="bench-aggregators-") as tmp:
            res = simulate(replace(cfg, out=tmp), prepared, Path(tmp), progress=False)
    finally:
        SiteWorker.__init__ = original
    rejected = sum("site_2" in h["rejected"] for h in res["history"])
    return {
        "global_bacc": res["metrics"]["global"]["bacc"],
        "site_bacc_mean": res["metrics"]["site_mean"]["bacc"],
        "site_2_rejected_rounds": rejected,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/datasets/brain-tumor-mri")
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--aggregators", default="mean,median,trimmed-mean,krum")
    ap.add_argument("--scenarios", default="honest,flip")
    ap.add_argument("--partitions", default="iid,dirichlet:0.5")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base = TrainConfig(data=args.data, backbone=args.backbone, rounds=args.rounds, cache_dir=args.cache_dir)
    store, backbone, prep = whole_store(base.validate())
    rows = []
    for part in args.partitions.split(","):
        scheme, _, alpha = part.partition(":")
        for seed in range(args.seeds):
            cfg = replace(base, partition=scheme, alpha=float(alpha) if alpha else None, seed=seed).validate()
            prepared = prepared_from(cfg, store, backbone, prep)
            for aggregator in args.aggregators.split(","):
                for scenario in args.scenarios.split(","):
                    got = run(replace(cfg, aggregator=aggregator).validate(), prepared, scenario)
                    rows.append(
                        {
                            "partition": part,
                            "seed": seed,
                            "aggregator": aggregator,
                            "scenario": scenario,
                            **got,
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print("\n| aggregator | scenario | partition | global BACC | sites' BACC | rounds site_2 refused |")
    print("|---|---|---|---|---|---|")
    for scenario in args.scenarios.split(","):
        for aggregator in args.aggregators.split(","):
            for part in args.partitions.split(","):
                sel = [
                    r
                    for r in rows
                    if (r["aggregator"], r["scenario"], r["partition"]) == (aggregator, scenario, part)
                ]
                g = np.array([r["global_bacc"] for r in sel]) * 100
                s = np.array([r["site_bacc_mean"] for r in sel]) * 100
                refused = np.mean([r["site_2_rejected_rounds"] for r in sel])
                print(
                    f"| `{aggregator}` | {scenario} | {part} | {g.mean():.1f} ± {g.std():.1f} | "
                    f"{s.mean():.1f} ± {s.std():.1f} | {refused:.1f} of {args.rounds} |"
                )


if __name__ == "__main__":
    main()

"""Orchestration overhead of the Kubeflow pipeline on the federation runtime: the same run through the compiled
YAML on kfp.local (`fedmedclip pipeline run --local`: prepare, each party's extraction, the server and site
workers at the same time, report) and through the in-process engine (`fedmedclip train`), at several round
counts; and the compiled YAML's size for several site and round counts.

    .venv/bin/python bench/bench_pipeline.py [--sites 3 --rounds 3,20,50 --json out.json]

Goals (issue 11): the pipeline's extra time is a per-run constant, not per round (at 50 rounds at most 2x the
engine), and one YAML size for every (sites, rounds). Both runs of a row start from empty caches (each encodes
its images); export and registration are skipped so both do the same work. The metrics are checked identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES_SITES = (3, 10, 50)
SIZES_ROUNDS = (3, 50, 100)


def yaml_sizes(work: Path) -> list[dict]:
    """Compile the pipeline for every (sites, rounds): they are run-time parameters, so each compile is the
    same graph; the table shows it (size and digest per cell)."""
    from pipelines.pipeline import compile_pipeline

    rows = []
    for sites in SIZES_SITES:
        for rounds in SIZES_ROUNDS:
            path = compile_pipeline(work / f"p-{sites}x{rounds}.yaml")
            data = path.read_bytes()
            rows.append(
                {
                    "sites": sites,
                    "rounds": rounds,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()[:12],
                }
            )
    return rows


def one_row(work: Path, sites: int, rounds: int, synthetic: dict) -> dict:
    from fedmedclip.config import TrainConfig
    from fedmedclip.engine import train
    from pipelines.local import run_local
    from pipelines.pipeline import DEFAULT_YAML

    row_dir = work / f"r{rounds}"
    pipe_cache, engine_cache = row_dir / "cache-pipeline", row_dir / "cache-engine"
    t0 = time.perf_counter()
    run = run_local(
        DEFAULT_YAML,
        row_dir / "root",
        log_path=row_dir / "pipeline.log",
        settings={
            "sites": sites,
            "rounds": rounds,
            "cache_dir": str(pipe_cache),
            "synthetic": synthetic,
            "join_timeout": 900.0,
        },
        mailbox=str(row_dir / "mailbox"),
        export_site="",
    )
    pipeline_s = time.perf_counter() - t0

    cfg = TrainConfig(
        sites=sites,
        rounds=rounds,
        synthetic=synthetic,
        cache_dir=str(engine_cache),
        out=str(row_dir / "engine"),
    )
    t0 = time.perf_counter()
    ref = train(cfg, progress=False, run_id=run.results["run_id"])
    engine_s = time.perf_counter() - t0
    same = run.results["metrics"] == ref["metrics"]
    engine_rounds = sum(h["seconds"] for h in ref["history"])
    shutil.rmtree(pipe_cache, ignore_errors=True)
    shutil.rmtree(engine_cache, ignore_errors=True)
    return {
        "sites": sites,
        "rounds": rounds,
        "engine_s": engine_s,
        "engine_features_s": ref["timing"]["feature_seconds"],
        "engine_rounds_s": engine_rounds,
        "pipeline_s": pipeline_s,
        "extra_s": pipeline_s - engine_s,
        "ratio": pipeline_s / engine_s,
        "metrics_identical": same,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", default="3,20,50", help="comma-separated round counts")
    ap.add_argument(
        "--synthetic", default="{}", help="JSON arguments of the synthetic generator (default: its own)"
    )
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--no-yaml", action="store_true", help="skip the compile-size table")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    out = {"sizes": [] if args.no_yaml else yaml_sizes(work), "runs": []}
    if out["sizes"]:
        print("| sites x rounds | compiled YAML | sha256 |\n|---|---|---|")
        for r in out["sizes"]:
            print(f"| {r['sites']} x {r['rounds']} | {r['bytes'] / 1e3:.1f} kB | {r['sha256']} |")
    print(
        "\n| rounds | engine (features + rounds) | pipeline (kfp.local) | extra | ratio | metrics |\n"
        "|---|---|---|---|---|---|"
    )
    for rounds in (int(r) for r in args.rounds.split(",")):
        r = one_row(work, args.sites, rounds, json.loads(args.synthetic))
        out["runs"].append(r)
        print(
            f"| {rounds} | {r['engine_s']:.1f} s ({r['engine_features_s']:.1f} + {r['engine_rounds_s']:.1f}) | "
            f"{r['pipeline_s']:.1f} s | {r['extra_s']:+.1f} s | {r['ratio']:.2f}x | "
            f"{'identical' if r['metrics_identical'] else 'DIFFERENT'} |",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["metrics_identical"] for r in out["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())

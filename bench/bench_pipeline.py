"""Orchestration overhead: the same run through the locally executed Kubeflow pipeline (kfp.local, one
process per task) and through the in-process engine (`fedmedclip train`), plus the pipeline's per-round
time breakdown (per task, from the completion times of its executor outputs).

    .venv/bin/python bench/bench_pipeline.py [--sites 3 --rounds 3 --json out.json] [--s3]

With --s3 it also starts a local stack (moto S3 on a free port), publishes the data per site
(`fedmedclip data publish`) and runs the pipeline a second time on `s3://BUCKET`: the cost of the
per-site download, measured on the extraction tasks.

Both runs start from empty caches (each encodes its images). The export and registration are skipped so
both sides do the same work. kfp.local runs tasks one at a time, so the wall time is the sum of the tasks;
on a cluster the sites' tasks run in parallel."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def task_times(pipeline_yaml: Path, pipeline_root: Path, started: float) -> list[dict]:
    """[{task, display, round, end, seconds}] in completion order; seconds since the previous completion."""
    ir = next(yaml.safe_load_all(pipeline_yaml.read_text()))
    tasks = ir["root"]["dag"]["tasks"]
    run_dir = max(pipeline_root.glob("fedmedclip-*"), key=lambda p: p.stat().st_mtime)
    rows = []
    for d in run_dir.iterdir():
        out = d / "executor_output.json"
        if d.name in tasks and out.exists():
            t = tasks[d.name]
            rnd = (
                t["inputs"]
                .get("parameters", {})
                .get("round_index", {})
                .get("runtimeValue", {})
                .get("constant")
            )
            rows.append(
                {
                    "task": d.name,
                    "display": t["taskInfo"]["name"],
                    "round": int(rnd) if rnd is not None else None,
                    "end": out.stat().st_mtime,
                }
            )
    rows.sort(key=lambda r: r["end"])
    prev = started
    for r in rows:
        r["seconds"], prev = r["end"] - prev, r["end"]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--synthetic", default='{"per_class_per_site": 40, "test_per_class": 20, "size": 64}')
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--s3", action="store_true", help="also run on data published to a local S3 (moto)")
    args = ap.parse_args()

    from fedmedclip.config import TrainConfig
    from fedmedclip.engine import train
    from pipelines.local import run_local
    from pipelines.pipeline import compile_pipeline

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    synth = json.loads(args.synthetic)

    cfg = TrainConfig(
        sites=args.sites,
        rounds=args.rounds,
        out=str(work / "engine"),
        cache_dir=str(work / "c1"),
        synthetic=synth,
    )
    t0 = time.perf_counter()
    ref = train(cfg, progress=False)
    engine_s = time.perf_counter() - t0

    y = compile_pipeline(work / "p.yaml", args.sites, args.rounds, gpu=False)
    started = time.time()
    t0 = time.perf_counter()
    run = run_local(
        y,
        work / "root",
        cache_dir=str(work / "c2"),
        synthetic=args.synthetic,
        export_site="",
        tracking_uri="",
        log_path=work / "pipeline.log",
    )
    pipe_s = time.perf_counter() - t0
    assert run.results["metrics"] == ref["metrics"], "pipeline and engine metrics differ"

    rows = task_times(y, work / "root", started)
    per_round = defaultdict(lambda: {"site_train": 0.0, "aggregate": 0.0, "tasks": 0})
    phases = defaultdict(float)
    for r in rows:
        if r["round"] is not None and r["task"].startswith(("site-train", "aggregate")):
            kind = "aggregate" if r["task"].startswith("aggregate") else "site_train"
            per_round[r["round"]][kind] += r["seconds"]
            per_round[r["round"]]["tasks"] += 1
        else:
            phases[r["task"].rsplit("-component", 1)[0]] += r["seconds"]
    engine_rounds = [h["seconds"] for h in ref["history"]]
    report = {
        "sites": args.sites,
        "rounds": args.rounds,
        "tasks": len(rows),
        "engine_seconds": engine_s,
        "pipeline_seconds": pipe_s,
        "overhead_ratio": pipe_s / engine_s,
        "engine_feature_seconds": ref["timing"]["feature_seconds"],
        "engine_round_seconds": engine_rounds,
        "pipeline_rounds": {r: dict(v) for r, v in sorted(per_round.items())},
        "pipeline_other_phases": dict(phases),
        "mean_task_seconds": sum(r["seconds"] for r in rows) / max(len(rows), 1),
    }
    print(f"{args.sites} sites x {args.rounds} rounds, metrics identical: yes")
    print(f"in-process engine : {engine_s:7.1f} s  (features {ref['timing']['feature_seconds']:.1f} s)")
    print(
        f"kfp.local pipeline: {pipe_s:7.1f} s  ({len(rows)} tasks, {report['mean_task_seconds']:.1f} s/task)"
    )
    print(f"overhead ratio    : {report['overhead_ratio']:.1f}x")
    print("per round: engine s | pipeline site-train s (sum over sites) + aggregate s")
    for r, v in sorted(per_round.items()):
        print(f"  round {r}: {engine_rounds[r - 1]:6.2f} | {v['site_train']:6.1f} + {v['aggregate']:5.1f}")
    print("other pipeline phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    if args.s3:
        report["s3"] = bench_s3(args, work, y, ref, phases)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def bench_s3(args, work: Path, y: Path, ref: dict, path_phases: dict) -> dict:
    """The same pipeline on data published per site to a local S3 (a fresh task cache, so every holder
    downloads its prefix)."""
    import socket

    from components.site_data import publish
    from components.stack import start_stack, stop_stack, use_stack_s3
    from fedmedclip.config import TrainConfig
    from pipelines.local import run_local

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    info = start_stack(work / "stack", s3_port=ports[0], mlflow_port=ports[1])
    try:
        use_stack_s3(info)
        cfg = TrainConfig(sites=args.sites, synthetic=json.loads(args.synthetic), cache_dir=str(work / "c1"))
        t0 = time.perf_counter()
        summary = publish(cfg, "bench-data", progress=False)
        publish_s = time.perf_counter() - t0
        started = time.time()
        t0 = time.perf_counter()
        run = run_local(
            y,
            work / "root-s3",
            data="s3://bench-data",
            cache_dir=str(work / "c3"),
            export_site="",
            tracking_uri="",
            log_path=work / "pipeline-s3.log",
        )
        pipe_s = time.perf_counter() - t0
    finally:
        stop_stack(work / "stack")
    assert run.results["metrics"] == ref["metrics"], "pipeline on s3:// data and engine metrics differ"
    phases = defaultdict(float)
    for r in task_times(y, work / "root-s3", started):
        if r["round"] is None:
            phases[r["task"].rsplit("-component", 1)[0]] += r["seconds"]
    extract = lambda ph: sum(v for k, v in ph.items() if k.startswith("extract"))  # noqa: E731
    out = {
        "images": summary["images"],
        "publish_seconds": publish_s,
        "pipeline_seconds": pipe_s,
        "extract_seconds": extract(phases),
        "extract_seconds_path_data": extract(path_phases),
    }
    print(
        f"s3:// data       : publish {summary['images']} images {publish_s:.1f} s; pipeline {pipe_s:.1f} s, "
        f"metrics identical: yes; extraction tasks {out['extract_seconds']:.1f} s "
        f"(path data: {out['extract_seconds_path_data']:.1f} s)"
    )
    return out


if __name__ == "__main__":
    sys.exit(main())

"""Per-round protocol overhead of the federation runtime (server + site processes exchanging through a mailbox)
against the in-process simulator (`fedmedclip train`) on the same run: FedMedCLIP on cached tiny-backbone
features of the synthetic data, with a real local S3 server (moto) or a local directory as the mailbox.

    .venv/bin/python bench/bench_runtime.py --sites 3,10 --rounds 20
    .venv/bin/python bench/bench_runtime.py --sites 3 --rounds 50 --mailbox dir

For each site count: the engine's mean seconds per round (all sites train in turn in one process, one torch
thread), the mailbox run's mean seconds per round as the server measures it (from publishing round r-1's global
module to publishing round r's), their difference (the protocol overhead per round), and both runs' wall time
for all rounds. Every party runs with one torch thread (`--threads 1`), as the engine does, so the metrics are
identical (checked) and only the orchestration differs. Features are encoded once beforehand (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(workdir: Path) -> tuple[subprocess.Popen, dict]:
    import boto3

    port = _free_port()
    exe = Path(sys.executable).parent / "moto_server"
    log = (workdir / "moto.log").open("w")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
    }
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id="bench",
        aws_secret_access_key="bench-secret",
        region_name="us-east-1",
    )
    for _ in range(300):
        try:
            client.create_bucket(Bucket="bench-mailbox")
            break
        except Exception:
            time.sleep(0.1)
    return proc, env


def engine_run(sites: int, rounds: int, cache: Path, out: Path, run_id: str) -> tuple[dict, float]:
    from fedmedclip.config import TrainConfig
    from fedmedclip.engine import train

    cfg = TrainConfig(sites=sites, rounds=rounds, cache_dir=str(cache), out=str(out))
    t0 = time.perf_counter()
    results = train(cfg, progress=False, run_id=run_id)
    return results, time.perf_counter() - t0


def mailbox_run(
    sites: int, rounds: int, cache: Path, work: Path, mailbox: str, env: dict, run_id: str
) -> tuple[dict, float, float]:
    common = ["--cache-dir", str(cache), "--threads", "1"]
    env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fedmedclip.cli", "-q"]
    t0 = time.perf_counter()
    server = subprocess.Popen(
        [
            *cmd,
            "server",
            "run",
            "--mailbox",
            mailbox,
            "--run-id",
            run_id,
            "--out",
            str(work / "server"),
            "--sites",
            str(sites),
            "--rounds",
            str(rounds),
            *common,
        ],
        stdout=(work / "server.log").open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    workers = [
        subprocess.Popen(
            [
                *cmd,
                "site",
                "run",
                "--mailbox",
                mailbox,
                "--run-id",
                run_id,
                "--site",
                f"site_{k}",
                "--state",
                str(work / f"site_{k}"),
                *common,
            ],
            stdout=(work / f"site_{k}.log").open("w"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        for k in range(sites)
    ]
    if server.wait() != 0 or any(w.wait() != 0 for w in workers):
        raise SystemExit(f"a party failed; logs in {work}")
    wall = time.perf_counter() - t0
    results = json.loads((work / "server" / "results.json").read_text())
    # From the first round's start to the end: the rounds only, without process start-up and encoding.
    rounds_wall = sum(r["seconds"] for r in results["history"])
    return results, wall, rounds_wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", default="3,10", help="comma list of site counts (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument(
        "--mailbox", choices=("s3", "dir"), default="s3", help="a local moto S3 server or a directory"
    )
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    moto, env = start_moto(work) if args.mailbox == "s3" else (None, {})
    rows = []
    try:
        for n in [int(x) for x in args.sites.split(",")]:
            cache = work / f"cache-{n}"
            engine_run(n, 1, cache, work / f"warm-{n}", "warm")  # encode the features once
            run_id = f"bench-{n}"
            eng, eng_wall = engine_run(n, args.rounds, cache, work / f"engine-{n}", run_id)
            mailbox = "s3://bench-mailbox" if moto else str(work / f"mailbox-{n}")
            run_dir = work / f"mailbox-run-{n}"
            run_dir.mkdir()
            mb, mb_wall, mb_rounds = mailbox_run(n, args.rounds, cache, run_dir, mailbox, env, run_id)
            assert mb["metrics"] == eng["metrics"], "the mailbox run's metrics differ from the engine's"
            e = [r["seconds"] for r in eng["history"]]
            m = [r["seconds"] for r in mb["history"]]
            # Round 1 of the mailbox run also waits for the sites to start: report rounds 2..R per round.
            e_mean, m_mean = sum(e[1:]) / len(e[1:]), sum(m[1:]) / len(m[1:])
            rows.append(
                {
                    "sites": n,
                    "rounds": args.rounds,
                    "engine_s_per_round": e_mean,
                    "mailbox_s_per_round": m_mean,
                    "overhead_s_per_round": m_mean - e_mean,
                    "engine_rounds_s": sum(e),
                    "engine_rounds_2_to_R_s": sum(e[1:]),
                    "mailbox_rounds_s": mb_rounds,
                    "mailbox_rounds_2_to_R_s": sum(m[1:]),
                    "engine_wall_s": eng_wall,
                    "mailbox_wall_s": mb_wall,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if moto is not None:
            moto.terminate()
    print(f"\nmailbox: {args.mailbox}, FedMedCLIP, tiny backbone, synthetic data, one torch thread per party")
    print(
        "| sites | rounds | engine s/round | mailbox s/round | overhead s/round | rounds 2..R: engine / mailbox | wall: engine / mailbox |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['sites']} | {r['rounds']} | {r['engine_s_per_round']:.3f} | {r['mailbox_s_per_round']:.3f} | "
            f"{r['overhead_s_per_round']:+.3f} | {r['engine_rounds_2_to_R_s']:.1f} s / "
            f"{r['mailbox_rounds_2_to_R_s']:.1f} s | {r['engine_wall_s']:.1f} s / {r['mailbox_wall_s']:.1f} s |"
        )


if __name__ == "__main__":
    main()

"""The MLflow UI as an engineer meets it, in a real browser: a local stack, a small `fedmedclip train --track` run,
then headless Chromium screenshots of the experiment page, the run's overview and its metric charts.

    nice -n 10 .venv/bin/python bench/bench_mlflow_ui.py --out docs        # writes docs/mlflow-ui-*.png

Needs Debian's `chromium` (apt-get install -y chromium). What to look at in the pictures: the experiment opens
on its runs (not MLflow's GenAI overview), the run has a description, a user and a source, its parameters are
every resolved setting, and its metrics come in groups (`global`, one per site, `comm`, `time`, `summary`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


def screenshot(chromium: str, url: str, path: Path, size: str, wait_ms: int) -> None:
    """One page, rendered for `wait_ms` of virtual time (the UI is a single-page app that fetches its data)."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size}",
                f"--virtual-time-budget={wait_ms}",
                f"--screenshot={path}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
    print(f"{path} ({path.stat().st_size / 1e3:.0f} kB): {url}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs", help="folder for the screenshots (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--wait-ms", type=int, default=20000, help="virtual time each page gets to render")
    args = ap.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("needs Debian's chromium: apt-get install -y chromium")
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import free_ports

    from devstack.stack import start_stack, stop_stack

    work = Path(tempfile.mkdtemp(prefix="fedmedclip-ui-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s3_port, mlflow_port = free_ports(2)
    info = start_stack(work / "stack", s3_port, mlflow_port)
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": info.tracking_uri, "PYTHONPATH": str(REPO)}
        t0 = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedmedclip.cli",
                "-q",
                "train",
                "--data",
                "synthetic",
                "--synthetic",
                json.dumps({"per_class_per_site": 12, "test_per_class": 6, "size": 32}),
                "--sites",
                "3",
                "--rounds",
                str(args.rounds),
                "--out",
                str(work / "bt-demo-run"),
                "--cache-dir",
                str(work / "cache"),
                "--track",
                "--experiment",
                "fedmedclip",
            ],  # fmt: skip
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        run_id = done.stdout.strip().splitlines()[-1]
        print(f"trained and tracked in {time.perf_counter() - t0:.1f} s: MLflow run {run_id}")
        from mlflow import MlflowClient

        run = MlflowClient(info.tracking_uri).get_run(run_id)
        exp = run.info.experiment_id
        from mlops.tracking import experiment_ui_url

        run_page = experiment_ui_url(info.tracking_uri, exp, run_id)
        pages = {
            "experiment": experiment_ui_url(info.tracking_uri, exp),  # what `demo` and `track` print
            "run": run_page,
            "metrics": run_page.replace("?", "/model-metrics?"),
        }
        for name, url in pages.items():
            screenshot(chromium, url, out / f"mlflow-ui-{name}.png", "1400,1000", args.wait_ms)
        groups = sorted({k.split("/")[0] for k in run.data.metrics})
        print(f"metric groups: {', '.join(groups)}; {len(run.data.params)} parameters")
    finally:
        stop_stack(work / "stack")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

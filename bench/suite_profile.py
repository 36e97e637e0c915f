"""Where the test suite's time goes: a pytest plugin that records, for every test, its wall time and the CPU
seconds of the pytest process and of the processes it reaped meanwhile (`getrusage` self and children; setup and
teardown included, so a module fixture counts in the first test that needs it), and each process's garbage
collection time (`gc.callbacks`); then a report of the largest files and tests.

    PYTHONPATH=bench PYTHONDONTWRITEBYTECODE= .venv/bin/pytest -q -n 2 --dist loadfile -p suite_profile
    .venv/bin/python bench/suite_profile.py                  # the report of the last profiled run

Server processes that outlive a test (the session's local stack: moto, MLflow) are reaped at the session's end,
so their CPU is in no test's figure. Records go to $SUITE_PROFILE_DIR (default /tmp/fedmedclip-suite-profile),
emptied when a profiled session starts.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import pytest

OUT = Path(os.environ.get("SUITE_PROFILE_DIR", "/tmp/fedmedclip-suite-profile"))
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
_gc = {"since": 0.0, "seconds": 0.0, "full": 0}


def _cpu() -> tuple[float, float]:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _gc["since"] = time.perf_counter()
    else:
        _gc["seconds"] += time.perf_counter() - _gc["since"]
        _gc["full"] += info["generation"] == 2


def _write(name: str, record: dict) -> None:
    with (OUT / f"{name}-{_WORKER}.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------- the plugin's hooks
def pytest_configure(config) -> None:
    if not hasattr(config, "workerinput"):  # the controller (or a run without workers) starts afresh
        shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    gc.callbacks.append(_on_gc)
    config._suite_profile_started = time.time()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    wall, (me, children) = time.time(), _cpu()
    yield
    me2, children2 = _cpu()
    _write(
        "tests",
        {
            "id": item.nodeid,
            "start": wall,
            "wall": time.time() - wall,
            "self": me2 - me,
            "children": children2 - children,
        },
    )


def pytest_unconfigure(config) -> None:
    me, children = _cpu()
    _write(
        "processes",
        {
            "process": _WORKER,
            "wall": time.time() - config._suite_profile_started,
            "cpu": me,
            "children_cpu": children,
            "gc_seconds": _gc["seconds"],
            "full_collections": _gc["full"],
        },
    )


# ------------------------------------------------------------------------------------------------ the report
def report(top: int = 20) -> None:
    tests = [
        json.loads(line) for f in sorted(OUT.glob("tests-*.jsonl")) for line in f.read_text().splitlines()
    ]
    if not tests:
        sys.exit(f"no profile in {OUT}: run pytest with -p suite_profile first (see this file's docstring)")
    print("| process | wall s | CPU s (itself) | CPU s (reaped children) | GC s | full collections |")
    print("|---|---|---|---|---|---|")
    for f in sorted(OUT.glob("processes-*.jsonl")):
        for p in map(json.loads, f.read_text().splitlines()):
            print(
                f"| {p['process']} | {p['wall']:.1f} | {p['cpu']:.1f} | {p['children_cpu']:.1f} | "
                f"{p['gc_seconds']:.1f} | {p['full_collections']} |"
            )
    files = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for t in tests:
        row = files[t["id"].split("::")[0]]
        row[0], row[1], row[2], row[3] = (
            row[0] + t["wall"],
            row[1] + t["self"],
            row[2] + t["children"],
            row[3] + 1,
        )
    print(
        f"\nlargest files ({len(tests)} tests)\n\n| file | tests | wall s | CPU s (pytest) | CPU s (children) |"
    )
    print("|---|---|---|---|---|")
    for name, (wall, me, children, n) in sorted(files.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {name} | {n} | {wall:.1f} | {me:.1f} | {children:.1f} |")
    print("\nlargest tests\n\n| test | wall s | CPU s (pytest) | CPU s (children) |\n|---|---|---|---|")
    for t in sorted(tests, key=lambda t: -t["wall"])[:top]:
        print(f"| {t['id']} | {t['wall']:.1f} | {t['self']:.1f} | {t['children']:.1f} |")


if __name__ == "__main__":
    report(int(sys.argv[1]) if len(sys.argv) > 1 else 20)

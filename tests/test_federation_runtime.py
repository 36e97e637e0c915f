"""The federation runtime with real processes: `fedmedclip server run` and `fedmedclip site run` exchanging
through a local-directory mailbox and through a real S3 server (moto), killed with SIGKILL and restarted,
against `fedmedclip train` (the in-process simulator) for the same seed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

from fedmedclip.config import TrainConfig
from fedmedclip.engine import train

ROUNDS = 6
SITES = ("site_0", "site_1", "site_2")
FACMIC_OPTS = ["--method-opt", "local_steps=10"]


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


class Party:
    """One `fedmedclip` process (server or site), its log in a file."""

    def __init__(self, args: list[str], log: Path, env: dict):
        self.args, self.log, self.env = args, log, env
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        fh = self.log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedmedclip.cli", "-q", *self.args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        fh.close()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(
                f"{self.args[:3]} did not finish; log:\n{self.log.read_text()[-3000:]}"
            ) from None

    def output(self) -> str:
        return self.log.read_text()


def wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def common_args(cache: Path, method: str = "fedmedclip", rounds: int = ROUNDS) -> list[str]:
    return ["--method", method, "--rounds", str(rounds), "--cache-dir", str(cache), "--seed", "0"] + (
        FACMIC_OPTS if method == "facmic" else []
    )


def reference(method: str, cache: Path, out: Path, rounds: int = ROUNDS, run_id: str = "r") -> dict:
    """The in-process simulator's run; the run id is in every payload's header, so it is the mailbox run's."""
    opts = {"local_steps": 10} if method == "facmic" else {}
    cfg = TrainConfig(method=method, rounds=rounds, cache_dir=str(cache), out=str(out), method_options=opts)
    return train(cfg, progress=False, run_id=run_id)


def _strip(results: dict) -> dict:
    """What must be identical between two runs of the same seed: everything but wall times and run ids."""
    r = json.loads(json.dumps(results))
    for key in ("timing", "run_id"):
        r.pop(key, None)
    for rec in r["history"]:
        rec.pop("seconds")
    return r


def assert_same_run(expected: Path, got: Path, site_states: dict[str, Path]) -> None:
    a = json.loads((expected / "results.json").read_text())
    b = json.loads((got / "results.json").read_text())
    assert _strip(a) == _strip(b)
    rounds = sorted(p.name for p in (expected / "rounds").iterdir())
    assert rounds == sorted(p.name for p in (got / "rounds").iterdir()) and len(rounds) == a["rounds"]
    for name in rounds:
        assert (expected / "rounds" / name).read_bytes() == (got / "rounds" / name).read_bytes(), name
    for name in ("global.safetensors", "text_features.safetensors", "model.json"):
        assert (expected / "model" / name).read_bytes() == (got / "model" / name).read_bytes(), name
    for site, state in site_states.items():
        mine = state / "model" / f"site_{site}.safetensors"
        assert mine.read_bytes() == (expected / "model" / f"site_{site}.safetensors").read_bytes(), site
        assert not (got / "model" / f"site_{site}.safetensors").exists()  # private heads stay at the site


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Synthetic data and its feature stores, encoded once for this module (the parties reuse them)."""
    cache = tmp_path_factory.mktemp("cache")
    reference("fedmedclip", cache, tmp_path_factory.mktemp("warm") / "run", rounds=1)
    return cache


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 server (moto) on a free loopback port, with a bucket for the mailbox."""
    import boto3

    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
    }
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id="test",
        aws_secret_access_key="test-secret",
        region_name="us-east-1",
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket="fed-mailbox")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        yield env, client
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        log.close()


def s3_exists(client, key: str) -> bool:
    try:
        client.head_object(Bucket="fed-mailbox", Key=key)
        return True
    except Exception:
        return False


@pytest.mark.slow
def test_killed_parties_over_s3_end_identical_to_the_simulator(cache, s3, tmp_path):
    """SIGKILL a site mid-run and the server mid-run, restart both with the same arguments: the run completes
    with the metrics, payloads and model files of an uninterrupted in-process run of the same seed."""
    env, client = s3
    env = _env(env)
    expected = tmp_path / "train"
    mailbox, run = "s3://fed-mailbox", "killed"
    reference("fedmedclip", cache, expected, run_id=run)
    args = common_args(cache)
    server = Party(
        ["server", "run", "--mailbox", mailbox, "--run-id", run, "--out", str(tmp_path / "server"), *args],
        tmp_path / "server.log",
        env,
    )
    states = {s: tmp_path / "state" / s for s in SITES}
    sites = {
        s: Party(
            [
                "site",
                "run",
                "--mailbox",
                mailbox,
                "--run-id",
                run,
                "--site",
                s,
                "--cache-dir",
                str(cache),
                "--state",
                str(states[s]),
            ],
            tmp_path / f"{s}.log",
            env,
        )
        for s in SITES
    }
    wait_for(
        lambda: s3_exists(client, f"runs/{run}/rounds/0002/updates/site_1.bin"), "site_1's round-2 update"
    )
    sites["site_1"].kill()
    sites["site_1"].start()
    wait_for(lambda: s3_exists(client, f"runs/{run}/rounds/0004/global.bin"), "the global module of round 4")
    server.kill()
    server.start()
    assert server.wait() == 0, server.output()
    for p in sites.values():
        assert p.wait() == 0, p.output()
    assert "resuming" in server.output() and "resuming" in sites["site_1"].output()
    assert_same_run(expected, tmp_path / "server", states)


@pytest.mark.slow
def test_local_directory_mailbox_equals_the_simulator_for_facmic(cache, tmp_path):
    expected = tmp_path / "train"
    reference("facmic", cache, expected)
    mailbox = str(tmp_path / "mailbox")
    args = common_args(cache, "facmic")
    env = _env()
    server = Party(
        ["server", "run", "--mailbox", mailbox, "--run-id", "r", "--out", str(tmp_path / "server"), *args],
        tmp_path / "server.log",
        env,
    )
    states = {s: tmp_path / "state" / s for s in SITES}
    sites = [
        Party(
            [
                "site",
                "run",
                "--mailbox",
                mailbox,
                "--run-id",
                "r",
                "--site",
                s,
                "--cache-dir",
                str(cache),
                "--state",
                str(states[s]),
            ],
            tmp_path / f"{s}.log",
            env,
        )
        for s in SITES
    ]
    assert server.wait() == 0, server.output()
    assert all(p.wait() == 0 for p in sites)
    # Progress a person can follow: one line per round on the server, each site logs its rounds.
    assert server.output().count("/6 · 3/3 sites · global acc") == ROUNDS
    assert "round 6: trained" in sites[0].output()
    # FACMIC's site model is the global module: nothing private to write.
    assert_same_run(expected, tmp_path / "server", {})


@pytest.mark.slow
def test_a_site_that_never_starts_is_absent_once_the_round_times_out(cache, tmp_path):
    mailbox, env = str(tmp_path / "mailbox"), _env()
    server = Party(
        [
            "server",
            "run",
            "--mailbox",
            mailbox,
            "--run-id",
            "r",
            "--out",
            str(tmp_path / "server"),
            *common_args(cache, rounds=3),
            "--quorum",
            "2",
            "--round-timeout",
            "2",
            "--join-timeout",
            "15",
            "--stall-every",
            "1",
        ],
        tmp_path / "server.log",
        env,
    )
    sites = [
        Party(
            [
                "site",
                "run",
                "--mailbox",
                mailbox,
                "--run-id",
                "r",
                "--site",
                s,
                "--cache-dir",
                str(cache),
                "--state",
                str(tmp_path / s),
            ],
            tmp_path / f"{s}.log",
            env,
        )
        for s in ("site_0", "site_1")
    ]
    assert server.wait() == 0, server.output()
    assert all(p.wait() == 0 for p in sites)
    results = json.loads((tmp_path / "server" / "results.json").read_text())
    assert [h["sites_present"] for h in results["history"]] == [["site_0", "site_1"]] * 3
    assert all(h["sites"][2]["acc"] is None and h["bytes_up"][2] is None for h in results["history"])
    assert "waiting" in server.output() and "site_2 (never seen)" in server.output()


@pytest.mark.slow
def test_a_round_without_quorum_ends_the_run_and_keeps_what_was_written(cache, tmp_path):
    mailbox, env = tmp_path / "mailbox", _env()
    out = tmp_path / "server"
    server = Party(
        [
            "server",
            "run",
            "--mailbox",
            str(mailbox),
            "--run-id",
            "r",
            "--out",
            str(out),
            *common_args(cache, rounds=4),
            "--round-timeout",
            "3",
        ],
        tmp_path / "server.log",
        env,
    )
    sites = {
        s: Party(
            [
                "site",
                "run",
                "--mailbox",
                str(mailbox),
                "--run-id",
                "r",
                "--site",
                s,
                "--cache-dir",
                str(cache),
                "--state",
                str(tmp_path / s),
            ],
            tmp_path / f"{s}.log",
            env,
        )
        for s in SITES
    }
    wait_for(lambda: (mailbox / "runs/r/rounds/0001/global.bin").exists(), "round 1")
    sites["site_2"].kill()  # and never comes back
    assert server.wait() == 2
    text = server.output()
    assert "error: round" in text and "quorum 3" in text and "site_2" in text
    status = json.loads((mailbox / "runs/r/status/server.json").read_text())
    assert status["state"] == "failed" and "site_2" in status["message"]
    # Nothing already written is lost: the configuration, the partition, every finished round.
    assert (out / "config.json").exists() and (out / "partition.json").exists()
    assert (out / "rounds" / "global_round_001.bin").read_bytes() == (
        mailbox / "runs/r/rounds/0001/global.bin"
    ).read_bytes()
    assert not (out / "results.json").exists()
    for s in ("site_0", "site_1"):  # the sites learn that the server ended the run
        assert sites[s].wait() == 2 and "the server ended run r" in sites[s].output()

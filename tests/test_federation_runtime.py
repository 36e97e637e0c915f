"""The federation runtime with real processes: `fedmedclip server run` and `fedmedclip site run` exchanging
through a local-directory mailbox and through a real S3 server (moto), killed with SIGKILL and restarted,
against `fedmedclip train` (the in-process simulator) for the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SYNTH, wait_for, without_timing

from fedmedclip.config import TrainConfig
from fedmedclip.engine import train

pytestmark = pytest.mark.heavy  # parties killed and restarted (tests/conftest.py hands such files out first)
ROUNDS = 6
BUCKET = "fedmedclip-data"  # the local stack's data bucket: the roles' policies cover its mailbox keys
SITES = ("site_0", "site_1", "site_2")
FACMIC_OPTS = ["--method-opt", "local_steps=10"]
# Every wait in this file is for an event (a file, an object, a process exit); this ceiling only ends a run
# that is broken, and is far above what any of them takes on a loaded 2-core machine.
CEILING = 900


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

    def wait(self, timeout: float = CEILING) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(
                f"{self.args[:3]} did not finish; log:\n{self.log.read_text()[-3000:]}"
            ) from None

    def output(self) -> str:
        return self.log.read_text()


def common_args(cache: Path, method: str = "fedmedclip", rounds: int = ROUNDS) -> list[str]:
    common = ["--method", method, "--rounds", str(rounds), "--cache-dir", str(cache), "--seed", "0"]
    return [*common, "--synthetic", json.dumps(SYNTH)] + (FACMIC_OPTS if method == "facmic" else [])


def reference(method: str, cache: Path, out: Path, rounds: int = ROUNDS, run_id: str = "r") -> dict:
    """The in-process simulator's run; the run id is in every payload's header, so it is the mailbox run's."""
    opts = {"local_steps": 10} if method == "facmic" else {}
    cfg = TrainConfig(
        method=method, rounds=rounds, synthetic=SYNTH, cache_dir=str(cache), out=str(out), method_options=opts
    )
    return train(cfg, progress=False, run_id=run_id)


def assert_same_run(expected: Path, got: Path, site_states: dict[str, Path]) -> None:
    a = json.loads((expected / "results.json").read_text())
    b = json.loads((got / "results.json").read_text())
    # A party killed while writing its checkpoint resumes from its other slot, one save older (the digest check
    # finds the torn file), and redoes that work: the run ends the same, and results.json's `recovery` says
    # so. The uninterrupted run has none.
    assert a.pop("recovery", []) == []
    for entry in b.pop("recovery", []):
        assert any(why in entry["reason"] for why in ("truncated or damaged", "torn", "removed")), entry
    assert without_timing(a) == without_timing(b)
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


@pytest.fixture
def cache(synthetic_cache) -> Path:
    """The session's synthetic data and feature stores: the parties reuse them, as a site reuses its own."""
    return synthetic_cache


def s3_exists(client, key: str) -> bool:
    try:
        client.head_object(Bucket=BUCKET, Key=key)
        return True
    except Exception:
        return False


@pytest.mark.slow
def test_killed_parties_over_s3_end_identical_to_the_simulator(cache, mlops_stack, as_stack_role, tmp_path):
    """On the local stack's IAM-enforcing S3, each party with its own role's key only: the publisher puts
    each holder's images in its own prefix, the server reads only its own, each site reads only its own and
    keeps its private state there. SIGKILL the server and a site mid-run, restart both with the same
    arguments, and the run completes with the metrics, payloads and model files of an uninterrupted in-process
    run of the same seed on the local source."""
    from fedmedclip.cli import main

    client = mlops_stack.s3_client()
    expected = tmp_path / "train"
    mailbox, run = f"s3://{BUCKET}", "killed"
    reference("fedmedclip", cache, expected, run_id=run)
    # The publisher is this process with the publisher's key only (the parties below get their own).
    as_stack_role("publisher")
    publish = [
        "-q",
        "data",
        "publish",
        "--to",
        mailbox,
        "--cache-dir",
        str(cache),
        "--synthetic",
        json.dumps(SYNTH),
    ]
    assert main(publish) == 0
    args = [*common_args(cache), "--data", mailbox]
    server = Party(
        [
            "server",
            "run",
            "--mailbox",
            mailbox,
            "--run-id",
            run,
            "--out",
            str(tmp_path / "server"),
            "--no-track",
            *args,
        ],
        tmp_path / "server.log",
        _env(mlops_stack.role_env("server")),
    )
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
                "--data",
                mailbox,
                "--state",
                f"s3://{BUCKET}/sites/{k}/private/{run}",
            ],
            tmp_path / f"{s}.log",
            _env(mlops_stack.role_env(s)),
        )
        for k, s in enumerate(SITES)
    }
    # The server once it has published round 1, then site_1 once it has sent round 2 (the sites go on while
    # the server is down): both restart at the same time.
    wait_for(lambda: s3_exists(client, f"runs/{run}/rounds/0001/global.bin"), "the global module of round 1")
    server.kill()
    server.start()
    wait_for(
        lambda: s3_exists(client, f"runs/{run}/rounds/0002/updates/site_1.bin"), "site_1's round-2 update"
    )
    sites["site_1"].kill()
    sites["site_1"].start()
    assert server.wait() == 0, server.output()
    for p in sites.values():
        assert p.wait() == 0, p.output()
    assert "resuming" in server.output() and "resuming" in sites["site_1"].output()
    # The sites' private models went to their own prefixes, nowhere else.
    states = {}
    for k, s in enumerate(SITES):
        states[s] = tmp_path / "site-models" / s
        (states[s] / "model").mkdir(parents=True)
        key = f"sites/{k}/private/{run}/model/site_{s}.safetensors"
        (states[s] / "model" / f"site_{s}.safetensors").write_bytes(
            client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        )
    assert_same_run(expected, tmp_path / "server", states)


@pytest.mark.slow
def test_local_directory_mailbox_equals_the_simulator_for_facmic(cache, tmp_path, caplog):
    """The same commands as in a deployment (`server run`, `site run`), here as threads of this process over a
    local-directory mailbox (the processes' case is the S3 test above): FACMIC's run is the simulator's."""
    from concurrent.futures import ThreadPoolExecutor

    from fedmedclip.cli import main

    expected = tmp_path / "train"
    reference("facmic", cache, expected)
    mailbox = str(tmp_path / "mailbox")
    server = ["-q", "server", "run", "--mailbox", mailbox, "--run-id", "r", "--out", str(tmp_path / "server")]
    site = ["-q", "site", "run", "--mailbox", mailbox, "--run-id", "r", "--cache-dir", str(cache)]
    caplog.set_level("INFO", logger="fedmedclip")
    with ThreadPoolExecutor(4) as pool:
        parties = [pool.submit(main, [*server, *common_args(cache, "facmic")])] + [
            pool.submit(main, [*site, "--site", s, "--state", str(tmp_path / "state" / s)]) for s in SITES
        ]
        assert [p.result(timeout=CEILING) for p in parties] == [0, 0, 0, 0]
    # Progress a person can follow: one line per round on the server, each site logs its rounds.
    lines = [r.getMessage() for r in caplog.records]
    assert sum("/6 · 3/3 sites · global acc" in m for m in lines) == ROUNDS
    assert any(m.startswith("site_0: round 6: trained") for m in lines)
    # FACMIC's site model is the global module: nothing private to write.
    assert_same_run(expected, tmp_path / "server", {})


@pytest.mark.slow
def test_absent_sites_quorum_and_a_round_without_quorum(cache, tmp_path, capsys, caplog):
    """Four expected sites, quorum 3. site_3 never starts: round 1 proceeds without it once the three others
    have answered and its timeout has passed, and results record who was there. site_2, a process of its own,
    is killed for good with SIGKILL after its round-1 update: a later round has no quorum, the run ends with a
    clear error naming the missing sites, and nothing already written is lost. Joining waits for the sites
    (the join timeout is generous); only the absent sites cost round timeouts, so a slow machine changes
    nothing but the duration. The server and the two sites that stay run as threads of this process (the
    processes' case is the S3 test above)."""
    from concurrent.futures import ThreadPoolExecutor

    from fedmedclip.cli import main

    mailbox, out = tmp_path / "mailbox", tmp_path / "server"
    server_args = [
        *("-q", "server", "run", "--mailbox", str(mailbox), "--run-id", "r", "--out", str(out)),
        *common_args(cache, rounds=8),
        *("--sites", "4", "--quorum", "3", "--round-timeout", "1", "--join-timeout", str(CEILING)),
        *("--stall-every", "1"),
    ]

    def site_args(site: str) -> list[str]:
        return [
            *("site", "run", "--mailbox", str(mailbox), "--run-id", "r", "--site", site),
            *("--cache-dir", str(cache), "--state", str(tmp_path / site)),
        ]

    caplog.set_level("INFO", logger="fedmedclip")
    site_2 = Party(site_args("site_2"), tmp_path / "site_2.log", _env())
    try:
        with ThreadPoolExecutor(3) as pool:
            server = pool.submit(main, server_args)
            sites = {s: pool.submit(main, ["-q", *site_args(s)]) for s in ("site_0", "site_1")}
            wait_for(
                lambda: (mailbox / "runs/r/rounds/0001/updates/site_2.bin").exists(),
                "site_2's round-1 update",
            )
            site_2.kill()  # and it never comes back
            assert server.result(timeout=CEILING) == 2
            # the sites learn that the server ended the run
            assert [sites[s].result(timeout=CEILING) for s in sites] == [2, 2]
    finally:
        if site_2.proc.poll() is None:
            site_2.kill()
    err = capsys.readouterr().err
    text = err + "\n".join(r.getMessage() for r in caplog.records)
    assert "site_3 (never seen)" in text
    assert "error: round" in err and "(quorum 3)" in err and "site_2" in err and "site_3" in err
    assert err.count("error: the server ended run r") == 2, err
    status = json.loads((mailbox / "runs/r/status/server.json").read_text())
    assert status["state"] == "failed" and "site_2" in status["message"]
    # What was written stays: the configuration, the partition, every finished round (recorded in the
    # server's checkpoint with the sites present), and no results.json pretending the run finished.
    assert (out / "config.json").exists() and (out / "partition.json").exists()
    done = sorted(p.name for p in (out / "rounds").iterdir())
    assert len(done) >= 1
    for name in done:
        r = int(name.split("_")[-1].split(".")[0])
        assert (out / "rounds" / name).read_bytes() == (
            mailbox / f"runs/r/rounds/{r:04d}/global.bin"
        ).read_bytes()
    assert not (out / "results.json").exists()
    from fedmedclip.federation.checkpoint import CheckpointStore
    from fedmedclip.federation.storage import LocalDirStore

    _, body, _ = CheckpointStore(LocalDirStore(mailbox / "runs/r/server/ckpt"), "server").load()
    assert body["history"][0]["sites_present"] == ["site_0", "site_1", "site_2"]


def test_a_mailbox_or_state_that_is_a_file_is_refused_at_once(tmp_path, capsys):
    """A local --mailbox (or a site's --state) naming a file: the party says so at once, exit status 2, where a
    site waited its whole --join-timeout (an hour by default) for a manifest that could never appear there."""
    from fedmedclip.cli import main

    file = tmp_path / "afile.txt"
    file.write_text("x")
    site = ["site", "run", "--run-id", "r", "--site", "site_0", "--join-timeout", "600"]
    for argv in (
        [*site, "--mailbox", str(file)],
        ["server", "run", "--run-id", "r", "--out", str(tmp_path / "out"), "--mailbox", str(file)],
    ):
        assert main(["-q", *argv]) == 2
        assert f"{file} is a file, not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


@pytest.mark.parametrize("flag", ["--quorum", "--stall-every"])
def test_a_zero_quorum_or_stall_interval_is_refused(tmp_path, capsys, flag):
    """`server run --quorum 0` ran with every site as its quorum (what leaving it unset means) while a quorum
    above the sites was refused; `--stall-every 0` printed a 'waiting' line at every poll."""
    from fedmedclip.cli import main

    argv = [
        "server",
        "run",
        "--run-id",
        "r",
        "--out",
        str(tmp_path / "out"),
        "--mailbox",
        str(tmp_path / "mb"),
    ]
    assert main(["-q", *argv, flag, "0"]) == 2
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

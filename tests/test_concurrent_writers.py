"""Two processes writing one folder at once: a second `server run` of a run directory, two `data publish --site`
into one local folder, and `stack down` during a grant of the stack's state. Each is made to happen every time
(a process is started while the first holds the folder, or while this test holds its lock, and /proc/locks shows
who waits); nothing here sleeps or times anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SYNTH, error_lines, wait_for

FEDMEDCLIP = str(Path(sys.executable).parent / "fedmedclip")
CEILING = 600  # only there so that a broken run ends

pytestmark = pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="needs Linux's /proc/locks")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """The real CLI as a process of its own, its stdout and stderr in `log` (read while it runs)."""
    with log.open("w") as fh:
        return subprocess.Popen([FEDMEDCLIP, *args], stdout=fh, stderr=subprocess.STDOUT, env=_env())


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(CEILING)


def _waiting_for_lock(folder: Path, pids: set[int]) -> set[int]:
    """Those of `pids` waiting for a flock of `folder` (/proc/locks marks a waiter `->`)."""
    inode = f":{os.stat(folder).st_ino}"
    waiting = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 6 and fields[1] == "->" and fields[-3].endswith(inode) and int(fields[5]) in pids:
            waiting.add(int(fields[5]))
    return waiting


def test_a_second_server_run_of_a_run_directory_being_written_is_refused(synthetic_cache, tmp_path):
    """`server run --out RUN` started while another process writes RUN (a server thought dead, or a `train`)
    resumed the run beside it and, taking the other's temporary files for a crash's leftovers, deleted them.
    Now it is refused in one line (exit 2) naming the directory, as `train` is, and touches nothing. This test
    holds the run directory as a running server does."""
    from fedmedclip.paths import lock_folder

    out = tmp_path / "run"
    out.mkdir()
    in_flight = out / ".results.json.0123abcd.part"  # a write of the first server's, not finished yet
    in_flight.write_bytes(b"half")
    args = [
        *("server", "run", "--mailbox", str(tmp_path / "mailbox"), "--run-id", "r", "--out", str(out)),
        *("--cache-dir", str(synthetic_cache), "--synthetic", json.dumps(SYNTH), "--rounds", "2"),
        *("--join-timeout", str(CEILING), "--no-track", "-q"),
    ]
    log = tmp_path / "second.log"
    with lock_folder(out):
        second = _start(args, log)
        try:
            # Refused, or (before) past the point of refusal: it started the run and waited for its sites.
            wait_for(
                lambda: second.poll() is not None or (out / "config.json").exists(),
                "the second server to end or to start the run",
            )
        finally:
            _stop(second)
    text = log.read_text()
    assert second.returncode == 2, text
    assert error_lines(text) == [
        f"error: another process is writing the run directory {str(out)!r} (a `train`, `compare` or "
        "`server run` of it still running): wait for it to end, or pass another --out"
    ], text
    assert in_flight.read_bytes() == b"half" and sorted(p.name for p in out.iterdir()) == [in_flight.name]


def test_two_publishes_into_one_local_folder_take_turns(synthetic_cache, tmp_path):
    """Two `data publish --site site_0 --to FOLDER` at once, of two partitions: both found no catalog and
    wrote, the last catalog winning over a mix of both partitions' images while the other reported success.
    Now they take turns (each saying that it waits): the first publishes, the second then finds its catalog
    and is refused in one line as any publish over another partition's data is. This test holds the folder's
    lock until both wait for it, so that they meet every time."""
    from fedmedclip.paths import lock_folder

    home = tmp_path / "home"
    home.mkdir()
    common = ["-q", "data", "publish", "--site", "site_0", "--to", str(home)]
    common += ["--cache-dir", str(synthetic_cache), "--synthetic", json.dumps(SYNTH)]
    logs = {seed: tmp_path / f"seed{seed}.log" for seed in (0, 1)}
    with lock_folder(home):
        procs = {seed: _start([*common, "--seed", str(seed)], logs[seed]) for seed in (0, 1)}
        try:
            pids = {p.pid for p in procs.values()}
            wait_for(
                lambda: (
                    _waiting_for_lock(home, pids) == pids or any(p.poll() is not None for p in procs.values())
                ),
                "both publishes to wait for the folder (or one to end)",
            )
            ended = {seed: p.poll() for seed, p in procs.items() if p.poll() is not None}
            assert not ended, {seed: logs[seed].read_text() for seed in ended}
        except BaseException:
            _stop(*procs.values())
            raise
    try:
        codes = {seed: p.wait(CEILING) for seed, p in procs.items()}
    finally:
        _stop(*procs.values())
    texts = {seed: logs[seed].read_text() for seed in logs}
    assert sorted(codes.values()) == [0, 2], texts
    winner, loser = sorted(codes, key=codes.get)
    for text in texts.values():
        assert "another `data publish` is writing this folder; waiting for it to end" in text, text
    assert len(error_lines(texts[loser])) == 1, texts[loser]
    assert "already holds the data of site_0 for another partition" in texts[loser]
    assert "refusing to overwrite it: publish to another folder" in texts[loser]
    # The folder holds the winner's publish alone: its catalog, its summary, its images and no others.
    catalog = json.loads((home / "sites/0/catalog.json").read_text())
    summary = json.loads((home / "summaries/sites/0.json").read_text())
    assert summary["partition_digest"] == catalog["partition_digest"]
    images = home / "sites/0/images"
    on_disk = {p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file()}
    assert on_disk == {image_id for image_id, _, _ in catalog["records"]}
    assert f"published site_0's {len(catalog['records'])} images" in texts[winner]
    assert not list(home.rglob(".*.part"))


def test_stack_down_during_a_grant_waits_for_it(tmp_path):
    """`stack down` took no state lock: run while a grant (`stack add-bucket`, `data publish`'s) held it, it
    removed the state file, which the grant then wrote back, a stopped stack recorded again. Now it waits for
    the grant, saying so, then removes what the grant wrote. This test holds the state lock as a grant does,
    and writes the state back while `stack down` waits."""
    from devstack import stack
    from fedmedclip.paths import lock_folder

    data_dir = tmp_path / "stack"
    data_dir.mkdir()
    info = stack.StackInfo(
        str(data_dir), "127.0.0.1", s3_port=1, mlflow_port=2, data_roots=["fedmedclip-data"]
    )
    stack._write_state(info)
    log = tmp_path / "down.log"
    with lock_folder(data_dir):  # a grant: it has read the state and is granting the new root
        down = _start(["stack", "down", "--data-dir", str(data_dir)], log)
        try:
            wait_for(
                lambda: down.poll() is not None or _waiting_for_lock(data_dir, {down.pid}),
                "`stack down` to wait for the state lock (or to end)",
            )
            assert down.poll() is None, log.read_text()  # before: it had removed the state and ended
            info.data_roots.append("another-bucket")
            stack._write_state(info)  # the grant writes the state back, then lets go
        except BaseException:
            _stop(down)
            raise
    try:
        assert down.wait(CEILING) == 0, log.read_text()
    finally:
        _stop(down)
    text = log.read_text()
    assert stack.read_state(data_dir) is None, text  # stopped, and not recorded again by the grant
    assert "another stack command (`stack up`, a grant) is changing it; waiting for it" in text, text

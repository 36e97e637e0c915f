"""`fedmedclip track` and `register` against the local stack (moto S3 + MLflow, nothing mocked): a damaged model
file is refused before anything is logged or registered, and two `track` of one run directory at once make one
MLflow run."""

from __future__ import annotations

import http.client
import http.server
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import error_lines, wait_for
from run_fixtures import make_run_dir

from fedmedclip.cli import main
from mlops.rundir import log_run_dir

pytestmark = pytest.mark.heavy  # MLflow and S3 throughout (tests/conftest.py hands such files out first)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_track_refuses_a_run_directory_whose_model_file_is_damaged(mlops_stack, tmp_path, capsys):
    """A truncated model/global.safetensors was logged as the run's model anyway (and registered, promotion
    refusing it later only for having no ONNX). `track` now refuses it in one line naming the file and what is
    wrong with it, before anything is created on the server."""
    from mlflow import MlflowClient

    uri, exp = mlops_stack.tracking_uri, f"test-damaged-model-{uuid.uuid4().hex[:8]}"
    run_dir = make_run_dir(tmp_path / "run")
    _truncate(run_dir / "model" / "global.safetensors")
    capsys.readouterr()
    assert main(["track", str(run_dir), "--experiment", exp, "--tracking-uri", uri]) == 2
    captured = capsys.readouterr()
    (err,) = error_lines(captured.err)
    assert "global.safetensors is not a readable safetensors file" in err
    assert str(run_dir / "model") in err and captured.out == ""
    assert MlflowClient(uri).get_experiment_by_name(exp) is None  # nothing logged, not even the experiment


def test_register_refuses_a_run_whose_logged_model_file_is_damaged(mlops_stack, tmp_path, capsys):
    """A run whose logged model/global.safetensors is damaged (logged before `track` checked it, or damaged in
    the artifact store) was registered as a version of its model folder. `register` now refuses it in one line
    naming the file, and registers nothing."""
    from mlflow import MlflowClient

    uri, name = mlops_stack.tracking_uri, f"fedmedclip-damaged-{uuid.uuid4().hex[:8]}"
    run_dir = make_run_dir(tmp_path / "run")
    run_id = log_run_dir(run_dir, "test-damaged-register", tracking_uri=uri)
    damaged = tmp_path / "damaged" / "global.safetensors"
    damaged.parent.mkdir()
    damaged.write_bytes((run_dir / "model" / "global.safetensors").read_bytes())
    _truncate(damaged)
    client = MlflowClient(uri, registry_uri=uri)
    client.log_artifact(run_id, str(damaged), artifact_path="model")  # over the good one
    capsys.readouterr()
    assert main(["register", run_id, "--name", name, "--tracking-uri", uri]) == 2
    captured = capsys.readouterr()
    (err,) = error_lines(captured.err)
    assert "global.safetensors is not a readable safetensors file" in err and run_id in err
    assert captured.out == ""
    assert client.search_registered_models(f"name = '{name}'") == []


# ------------------------------------------------------------------------------ two `track` of one directory


class _CreatesHeld(http.server.ThreadingHTTPServer):
    """A forwarding proxy in front of the MLflow server that holds every request to `held` (an endpoint such as
    `/runs/create`) until `released` is set: a `track` that has looked for its run and found none is kept from
    creating it while the other looks too."""

    daemon_threads = True

    def __init__(self, upstream: str, held: str):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream, self.held = urlsplit(upstream), held
        self.creates = 0
        self.counting = threading.Lock()
        self.released = threading.Event()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(http.server.BaseHTTPRequestHandler):
    server: _CreatesHeld

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.split("?")[0].endswith(self.server.held):
            with self.server.counting:
                self.server.creates += 1
            self.server.released.wait()
        upstream = self.server.upstream
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=300)
        skip = {"host", "connection", "keep-alive", "transfer-encoding", "content-length"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        self.send_response(response.status)
        for k, v in response.getheaders():
            if k.lower() not in skip | {"date", "server"}:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


def _waiting_for_lock(folder: Path, pids: set[int]) -> bool:
    """Whether one of `pids` waits for a flock of `folder` (/proc/locks marks a waiter `->`)."""
    inode = f":{os.stat(folder).st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 6 and fields[1] == "->" and fields[-3].endswith(inode) and int(fields[5]) in pids:
            return True
    return False


def _twice_at_once(uri: str, held: str, args: list[str], waiting_on: Path | None = None) -> list[tuple]:
    """Run `fedmedclip ARGS --tracking-uri` twice at once through a proxy holding every request to `held` until
    both have asked (or one ended, or one waits for a lock of `waiting_on`); (stdout, stderr) of each, both
    having exited 0."""
    proxy = _CreatesHeld(uri, held)
    threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    command = [str(Path(sys.executable).parent / "fedmedclip"), *args, "--tracking-uri", proxy.uri]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    pids = {p.pid for p in procs}

    def settled() -> bool:
        ended = [p.poll() is not None for p in procs]
        locked = waiting_on is not None and _waiting_for_lock(waiting_on, pids)
        if proxy.creates >= 2 or any(ended) or locked:
            proxy.released.set()
        return all(ended)

    try:
        wait_for(settled, f"both `{args[0]}` processes to end", timeout=600)
    finally:
        proxy.released.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
        outputs = [p.communicate() for p in procs]
        proxy.shutdown()
        proxy.server_close()
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    return outputs


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="needs Linux's /proc/locks")
def test_two_tracks_of_one_run_directory_at_once_make_one_run(mlops_stack, tmp_path):
    """Two `fedmedclip track RUN_DIR` at once each looked for the run keyed on the directory, found none, and
    created one: two MLflow runs with the same run key. A proxy holds each run's creation until both have
    looked (or one waits for the other's lock on the run directory), so the old race happens every time; now
    the second waits for the first and finds its run."""
    from mlflow import MlflowClient

    uri, exp = mlops_stack.tracking_uri, f"test-track-at-once-{uuid.uuid4().hex[:8]}"
    run_dir = make_run_dir(tmp_path / "run", rounds=1)
    outputs = _twice_at_once(uri, "/runs/create", ["track", str(run_dir), "--experiment", exp], run_dir)
    run_ids = {out.strip() for out, _ in outputs}
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    assert len(runs) == 1, [err for _, err in outputs]  # one MLflow run with the directory's run key
    assert run_ids == {runs[0].info.run_id}
    assert sum("is logged already (nothing logged again)" in err for _, err in outputs) == 1, outputs


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="needs Linux's /proc/locks")
def test_two_registrations_of_one_run_at_once_make_one_version(mlops_stack, tmp_path):
    """Two `fedmedclip register RUN --name N` at once (a retried registration task beside the first, two
    engineers) each looked for the run's version, found none, and created one: two versions of one run. A proxy
    holds each version's creation until both have asked, so that they meet every time; now the later version
    gives way to the earlier, and both commands print the same version."""
    from mlflow import MlflowClient

    uri, name = mlops_stack.tracking_uri, f"fedmedclip-at-once-{uuid.uuid4().hex[:8]}"
    run_id = log_run_dir(make_run_dir(tmp_path / "run", rounds=1), "test-register-at-once", tracking_uri=uri)
    outputs = _twice_at_once(uri, "/model-versions/create", ["register", run_id, "--name", name])
    versions = MlflowClient(uri, registry_uri=uri).search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == ["1"], [err for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["1", "1"], outputs  # the version each prints

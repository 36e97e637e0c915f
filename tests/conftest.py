"""Shared test fixtures. Tests that need ../shared skip with a reason when it is absent."""

from __future__ import annotations

import atexit
import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # as in the images (Dockerfile)
# `make test` runs two pytest-xdist workers on two cores, and tests start servers and parties of their own: one
# torch thread per process, so that threads do not spin against each other (8-15 % of the suite's CPU time).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEDMEDCLIP_SHARED", REPO.parent / "shared"))
BRAIN_MRI = SHARED / "datasets" / "brain-tumor-mri"


@pytest.fixture(autouse=True)
def _same_environment_for_every_test():
    """Code under test may set process environment variables on purpose (`use_stack_s3` points this process
    and the tasks it starts at the local stack); no test sees what an earlier one left."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# The small synthetic data set most tests train on: 4 classes, 3 sites x 12 images per class, 6 global test
# images per class, 32 px. One definition, so that the session's cache below holds it and its feature stores
# once for every test module.
SYNTH = {"per_class_per_site": 12, "test_per_class": 6, "size": 32}


# ----------------------------------------------------------------------------- shared by the session's workers
# What every pytest-xdist worker of one session shares (the synthetic cache, the local stack) lives in one
# folder that the controller (or a run without workers) makes before the workers start, which inherit its
# name through the environment, and removes at the end after stopping the stack.
SHARED_ENV = "FEDMEDCLIP_TEST_SESSION_DIR"


def pytest_configure(config):
    if hasattr(config, "workerinput"):
        # Registered before the tests run, so it runs after every exit handler they register (atexit is LIFO).
        atexit.register(_end_finished_worker, config)
    else:
        import tempfile
        import threading

        os.environ[SHARED_ENV] = tempfile.mkdtemp(prefix="fedmedclip-tests-")
        if getattr(config.option, "numprocesses", None):
            # With pytest-xdist workers the controller has nothing to do while they collect and run: it starts
            # the stack meanwhile, so that the first test needing it does not wait for it (a failure here is
            # left to that test's fixture, which tries again and reports it).
            config._fedmedclip_stack_start = threading.Thread(target=_start_quietly, daemon=True)
            config._fedmedclip_stack_start.start()


def pytest_collection_modifyitems(session, config, items):
    """The test files marked `heavy` first, then the others, most tests first (pytest-xdist's own order, which
    `--no-loadscope-reorder` in pyproject.toml turns off for this one); a file's tests stay together and in
    order. With a file at a time per worker (`--dist loadfile`), xdist's order alone handed out the long files
    of few tests (the SIGKILL runs, kfp.local) last, and one worker ended 10 s after the other."""
    modules: dict = {}
    for item in items:
        modules.setdefault(item.module, []).append(item)

    def first(tests: list) -> tuple[bool, int]:
        return (tests[0].get_closest_marker("heavy") is None, -len(tests))

    items[:] = [item for tests in sorted(modules.values(), key=first) for item in tests]


def pytest_collection_finish(session):
    """The garbage collector of a test process, once its tests are collected (torch, transformers, MLflow, kfp
    and ONNX Runtime imported): what is there now is frozen (never scanned again), and collections run ten
    times less often. A worker's heap grows to millions of objects, and each full collection took about 0.5 s:
    13-15 s of CPU per pytest-xdist worker over the suite with the default thresholds, about 6 s with these
    (tests/conftest.py; a Python-level setting of the test processes only, like OMP_NUM_THREADS above)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def _end_finished_worker(config) -> None:
    """A pytest-xdist worker whose session ended (every result is with the controller) leaves without tearing
    its interpreter down: freeing a heap of millions of objects (torch, transformers, MLflow, kserve, ONNX
    Runtime, each test's leftovers) took a second or more of a loaded machine, while the controller waited for
    it at the end of the suite, when nothing else runs. A worker that did not get there exits as Python does."""
    if getattr(config, "_fedmedclip_unconfigured", False):
        from fedmedclip.startup import leave_now

        leave_now()


def _start_quietly() -> None:
    with contextlib.suppress(Exception):
        shared_stack()


def pytest_unconfigure(config):
    config._fedmedclip_unconfigured = True
    if hasattr(config, "workerinput") or SHARED_ENV not in os.environ:
        return
    import shutil

    starting = getattr(config, "_fedmedclip_stack_start", None)
    if starting is not None:
        starting.join(timeout=600)
    shared = Path(os.environ.pop(SHARED_ENV))
    if (shared / "stack").is_dir():
        from devstack.stack import stop_stack

        stop_stack(shared / "stack")
    shutil.rmtree(shared, ignore_errors=True)


def session_dir() -> Path:
    return Path(os.environ[SHARED_ENV])


@contextlib.contextmanager
def session_lock(name: str):
    """One worker at a time (an advisory lock on a file of the shared folder)."""
    import fcntl

    with (session_dir() / f"{name}.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def synthetic_cache() -> Path:
    """One cache directory for the session's workers: SYNTH is generated into it once and each holder's feature
    store is encoded once (stores are reused by provenance, so a test cannot get another configuration's
    features; processes that meet on the same store keep the first one written)."""
    path = session_dir() / "synthetic-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def brain_mri() -> Path:
    if not (BRAIN_MRI / "Training").is_dir():
        pytest.skip(f"real MRI data not found at {BRAIN_MRI} (only present with ../shared beside the clone)")
    return BRAIN_MRI


@pytest.fixture
def data_with_duplicates(tmp_path: Path) -> tuple[Path, dict]:
    """A small manifest with: a training copy of a test image (same label), two copies of a training image,
    and a training image copied under another class (conflicting labels)."""
    import csv
    import shutil

    from fedmedclip import synthetic

    manifest = synthetic.generate(tmp_path / "data", sites=2, per_class_per_site=3, test_per_class=1, size=16)
    root = manifest.parent
    rows = list(csv.reader(manifest.open()))
    added = {
        "copy_of_test": ("train/site_0/normal/copy-of-test.png", "test/global/normal/0000.png", "normal"),
        "pool_copy": ("train/site_1/normal/copy.png", "train/site_0/normal/0001.png", "normal"),
        "conflict": (
            "train/site_1/round_lesion/conflict.png",
            "train/site_0/normal/0002.png",
            "round_lesion",
        ),
    }
    for new, src, label in added.values():
        shutil.copy(root / src, root / new)
        rows.append([new, label, new.split("/")[1], "train"])
    with manifest.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return manifest, added


@pytest.fixture(scope="session")
def tiny():
    """The built-in tiny backbone (seed 0), built once per test process: it is frozen, and a test that changes
    one of its attributes does so with monkeypatch."""
    from fedmedclip.backbone import load_backbone

    return load_backbone("tiny")


def train_interrupted(cfg, round_: int, error: type[BaseException], site: str = "site_1") -> None:
    """`engine.train(cfg)` stopped by `error`, raised by `site` as it starts training round `round_` (earlier
    rounds, and the sites before it in that round, train as usual), as a process killed there would stop; the
    run directory and checkpoints are left as that moment leaves them."""
    from fedmedclip import engine
    from fedmedclip.federation.site import SiteWorker

    train_site = SiteWorker._train

    def dies(self, r, received):
        if r == round_ and self.name == site:
            raise error
        return train_site(self, r, received)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SiteWorker, "_train", dies)
        with pytest.raises(error):
            engine.train(cfg, progress=False)


def run_workers_at_once(parties: list[dict], run_id: str, features: dict | None = None) -> list[str]:
    """Every party's `worker_step` at once, as the pipeline's loop runs them, here as threads of this process
    over the parties' mailbox: each waits for the others there, so the run can only finish with all of them
    running together. `features`: {party: its feature store's folder}; a party not in it uses its
    configuration's cache. Returns the steps' answers in the parties' order."""
    from concurrent.futures import ThreadPoolExecutor

    from components.worker.component import worker_step

    features = features or {}
    with ThreadPoolExecutor(len(parties)) as pool:
        futures = [
            pool.submit(
                worker_step,
                p["config"],
                p["role"],
                p["party"],
                p["index"],
                run_id,
                p["mailbox"],
                str(features[p["party"]]) if p["party"] in features else None,
                p["server"],
            )
            for p in parties
        ]
        return [f.result(timeout=900) for f in futures]


def without_timing(results: dict) -> dict:
    """results.json without what differs between two runs of the same seed: wall times, the rounds' clock
    times and the run id."""
    import json

    r = json.loads(json.dumps(results))
    for key in ("timing", "run_id"):
        r.pop(key, None)
    for rec in r["history"]:
        rec.pop("seconds")
        rec.pop("finished_at", None)
    return r


# ----------------------------------------------------------------------------- MLOps stack (components)


def wait_for(predicate, what: str, timeout: float = 900) -> None:
    """Wait for an event (a file, a key, a metric); the ceiling is only there so that a broken run ends."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def error_lines(stderr: str) -> list[str]:
    """The `error: ...` lines of a command's stderr: log lines may be there too, where an earlier test in the
    worker left a log handler on stderr (an in-process `serve`)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def free_ports(n: int = 2, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports nothing listens on right now (the OS picks them; all held open until all are
    chosen, so they differ; a race with other processes afterwards is unlikely)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


@contextlib.contextmanager
def stand_in_http_server(answer):
    """A real HTTP server on loopback standing in for another party's (the KFP API, a server that is not
    fedmedclip's): each GET and POST, its body read, is answered `answer(method, path, headers)` -> (status,
    body bytes, Content-Type or None). Yields its URL; shut down and closed afterwards."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Answer(BaseHTTPRequestHandler):
        def reply(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, body, content_type = answer(self.command, self.path, dict(self.headers))
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = reply

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    # Its loop looks for shutdown() every poll_interval: 0.5 s by default, half a second of each test's wall.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def mlops_stack():
    """A real local stack (moto S3 + MLflow server) on free loopback ports, shared by the session's workers:
    the controller of pytest-xdist workers starts it when the session starts, or else the first test that needs
    it; the end of the session stops it (pytest_unconfigure).

    Returns devstack.stack.StackInfo: .tracking_uri, .s3_endpoint, .bucket (versioned), .env (a dict of
    MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL and AWS credentials), .s3_client(). About 8 s to start."""
    return shared_stack()


def shared_stack():
    """The session's stack, started by whoever asks first (one at a time: a lock on the shared folder)."""
    from devstack.stack import read_state, start_stack

    data_dir = session_dir() / "stack"
    with session_lock("stack"):
        info = read_state(data_dir)
        if info is None:
            s3_port, mlflow_port = free_ports(2)
            info = start_stack(data_dir, s3_port=s3_port, mlflow_port=mlflow_port)
    return info


@pytest.fixture(scope="session")
def spec():
    """The Open Inference Protocol's REST schema, which serving tests check answers against."""
    from serving_fixtures import OipRestSpec

    return OipRestSpec()


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """The Open Inference Protocol's gRPC messages, compiled once from its own .proto."""
    from serving_fixtures import oip_grpc_messages

    return oip_grpc_messages(tmp_path_factory.mktemp("oip-proto"))


@pytest.fixture
def s3_env(mlops_stack, monkeypatch):
    """The stack's credentials and endpoint in the environment, as a task's Secret and ConfigMap give them."""
    for k, v in mlops_stack.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", mlops_stack.s3_endpoint)
    return mlops_stack


@pytest.fixture
def as_stack_role(mlops_stack, monkeypatch):
    """`as_stack_role("site_0")`: this test's process (and the processes it starts) acts as that role of the
    session stack, with that role's S3 key only (mlops/policies.py says what it may do); the admin's
    variables are removed. Returns the role's environment."""

    def switch(role: str) -> dict[str, str]:
        for key in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "MLFLOW_S3_ENDPOINT_URL",
            "MLFLOW_TRACKING_URI",
        ):
            monkeypatch.delenv(key, raising=False)
        env = mlops_stack.role_env(role)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return env

    return switch

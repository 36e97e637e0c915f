"""Logging a federated run to MLflow while it goes on (mlops/live.py: LiveRunLogger, MlflowObserver), against the real
MLflow server of the local stack; the outage test cuts a real TCP path to it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time

import pytest
from conftest import SYNTH, free_port
from run_fixtures import make_run_dir

from fedmedclip.config import TrainConfig
from mlops.live import LiveRunLogger
from mlops.registry import register_model
from mlops.tracking import COMPLETE_TAG, KFP_RUN_ID_TAG, PROMOTION_METRIC, RunDirError, TrackingError

SITES = ["site_0", "site_1", "site_2"]


def round_record(r: int, present: list[str] = SITES, seconds: float = 0.25) -> dict:
    """A round as the runtime writes it into results.json's history (fedmedclip.federation.records)."""
    rows = [
        {
            "site": s,
            "acc": 0.5 + 0.01 * r if s in present else None,
            "bacc": 0.4 + 0.01 * r if s in present else None,
            "val_acc": 0.45 + 0.01 * r if s in present else None,
        }
        for s in SITES
    ]
    return {
        "round": r,
        "global": {"acc": 0.3 + 0.01 * r, "bacc": 0.25 + 0.01 * r},
        "sites": rows,
        "sites_present": list(present),
        "rejected": {},
        "val_acc_mean": 0.45 + 0.01 * r,
        "train_loss": 1.0 / r,
        "bytes_up": [1000 + k if s in present else None for k, s in enumerate(SITES)],
        "bytes_down": [5000 if s in present else None for s in SITES],
        "seconds": seconds,
    }


def history(client, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


@pytest.fixture
def client(mlops_stack):
    from mlflow import MlflowClient

    return MlflowClient(mlops_stack.tracking_uri, registry_uri=mlops_stack.tracking_uri)


def test_rounds_reach_mlflow_while_the_run_goes_on(mlops_stack, client, tmp_path):
    run_dir = make_run_dir(tmp_path / "run", bacc=0.8, rounds=3)
    partition = json.loads((run_dir / "partition.json").read_text())
    logger = LiveRunLogger("test-live", mlops_stack.tracking_uri, kfp_run_id="kfp-run-42")
    run_id = logger.start(
        {"method": "fedmedclip", "optim": {"lr": 0.001}, "sites": 3},
        tags={"orchestrator": "kubeflow-pipelines"},
        run_name="fed-2026-12-01",
        site_names=SITES,
        partition=partition,
        data_source="s3://fedmedclip-data",
    )
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "fed-2026-12-01"
    assert (
        run.data.tags[KFP_RUN_ID_TAG] == "kfp-run-42"
        and run.data.tags["orchestrator"] == "kubeflow-pipelines"
    )
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["method"] == "fedmedclip"
    datasets = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
        for i in run.inputs.dataset_inputs
    }
    assert datasets["partition"].digest == partition["digest"][:32]
    assert datasets["training"].name == "fedmedclip-data" and datasets["training"].source_type == "s3"
    assert json.loads(datasets["training"].source) == {"uri": "s3://fedmedclip-data"}

    logger.log_round(round_record(1))
    assert logger.flush(timeout=60)
    # Round 1 is in MLflow while the run is still going.
    assert client.get_run(run_id).info.status == "RUNNING"
    assert [(m.step, m.value) for m in history(client, run_id, "global/bacc")] == [(1, pytest.approx(0.26))]

    time.sleep(0.01)  # rounds finish at different times; so must their points
    logger.log_round(round_record(2, present=["site_0", "site_2"]))
    time.sleep(0.01)
    logger.log_round(round_record(3))
    logger.finish(run_dir, "FINISHED")

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    points = history(client, run_id, "global/bacc")
    assert [m.step for m in points] == [1, 2, 3]
    assert points[0].timestamp < points[1].timestamp < points[2].timestamp
    assert [m.value for m in history(client, run_id, "sites/present")] == [3, 2, 3]
    assert [m.value for m in history(client, run_id, "comm/bytes_up")] == [
        3003,
        2002,
        3003,
    ]  # absent site: nothing
    assert [m.step for m in history(client, run_id, "site_1/bytes_up")] == [1, 3]
    assert [m.step for m in history(client, run_id, "site_1/acc")] == [1, 3]
    for key in (
        "global/acc",
        "site_0/bacc",
        "site_2/val_acc",
        "comm/bytes_down",
        "time/round_seconds",
        "sites/train_loss",
    ):
        assert len(history(client, run_id, key)) == 3, key

    # The end: files, final metrics, lineage; the sites' private heads stay on the sites' side.
    assert run.data.metrics[PROMOTION_METRIC] == pytest.approx(0.8)
    assert run.data.tags[COMPLETE_TAG] == "complete"
    assert run.data.tags["partition_digest"] == partition["digest"]
    files = {f.path for f in client.list_artifacts(run_id)} | {
        f.path for f in client.list_artifacts(run_id, "model")
    }
    assert {
        "results.json",
        "partition.json",
        "plots",
        "rounds",
        "model/model.json",
        "model/global.safetensors",
    } <= files
    assert not any(f.startswith("model/site_") for f in files)
    # ... and the run registers like one logged after the fact.
    assert register_model(run_id, "fedmedclip-live", tracking_uri=mlops_stack.tracking_uri).tags[
        "partition_digest"
    ]


def test_a_run_that_fails_at_round_37_keeps_rounds_1_to_36(mlops_stack, client, tmp_path):
    logger = LiveRunLogger("test-live", mlops_stack.tracking_uri)
    with pytest.raises(RuntimeError, match="site_1 stalled"), logger:
        run_id = logger.start({"rounds": 50}, run_name="fails-at-37", site_names=SITES)
        for r in range(1, 37):
            logger.log_round(round_record(r))
        raise RuntimeError("round 37: site_1 stalled, no quorum")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert [m.step for m in history(client, run_id, "global/bacc")] == list(range(1, 37))
    assert COMPLETE_TAG not in run.data.tags
    with pytest.raises(TrackingError, match="not logged from a complete run directory"):
        register_model(run_id, "fedmedclip-live", tracking_uri=mlops_stack.tracking_uri)


def test_failed_run_with_partial_directory_logs_what_exists(mlops_stack, client, tmp_path):
    run_dir = make_run_dir(tmp_path / "run", rounds=2)
    (run_dir / "results.json").unlink()  # the server died before writing it
    logger = LiveRunLogger("test-live", mlops_stack.tracking_uri)
    run_id = logger.start({"rounds": 2})
    logger.log_round(round_record(1))
    logger.log_round({"round": 2})  # no metric at all: MLflow queues nothing, and nothing waits for it
    assert logger.flush(timeout=60) and logger.unsent_rounds == []
    logger.finish(run_dir, "FAILED")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and [m.step for m in history(client, run_id, "global/acc")] == [1]
    assert {"partition.json", "rounds"} <= {f.path for f in client.list_artifacts(run_id)}
    assert PROMOTION_METRIC not in run.data.metrics

    # Asked to finish FINISHED from an incomplete directory: the run ends FAILED and the caller hears why.
    logger = LiveRunLogger("test-live", mlops_stack.tracking_uri)
    run_id = logger.start({"rounds": 2})
    with pytest.raises(RunDirError, match=r"results\.json is missing"):
        logger.finish(run_dir, "FINISHED")
    assert client.get_run(run_id).info.status == "FAILED"
    with pytest.raises(TrackingError, match="start"):
        logger.log_round(round_record(2))


def test_restarted_server_continues_its_mlflow_run(mlops_stack, client):
    key = f"fed-restart-{os.getpid()}-{time.time_ns()}"
    first = LiveRunLogger("test-live", mlops_stack.tracking_uri)
    run_id = first.start({"rounds": 3, "method": "fedmedclip"}, run_name=key, run_key=key)
    first.log_round(round_record(1))
    assert first.flush(timeout=60)
    # The server is killed here: nobody calls finish. Started again with the same run id, it continues.
    again = LiveRunLogger("test-live", mlops_stack.tracking_uri)
    assert again.start({"rounds": 3, "method": "fedmedclip"}, run_name=key, run_key=key) == run_id
    again.log_round(round_record(2))
    again.finish(None, "FAILED")
    assert [m.step for m in history(client, run_id, "global/acc")] == [1, 2]
    # Another configuration under the same key is refused, not mixed into that run.
    other = LiveRunLogger("test-live", mlops_stack.tracking_uri)
    with pytest.raises(TrackingError, match="rounds"):
        other.start({"rounds": 5, "method": "fedmedclip"}, run_key=key)


class TcpRelay:
    """A real TCP path to the tracking server that can be cut and restored: the network outage between a
    server pod and MLflow. Listens on `port` and pipes every connection to `upstream`."""

    def __init__(self, port: int, upstream: tuple[str, int]):
        self.port, self.upstream = port, upstream
        self.listener: socket.socket | None = None
        self.open_sockets: list[socket.socket] = []

    def up(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        for s in [self.listener, *self.open_sockets]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.open_sockets = []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                downstream, _ = listener.accept()
            except OSError:
                return  # the relay is down
            upstream = socket.create_connection(self.upstream)
            self.open_sockets += [downstream, upstream]
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def test_rounds_logged_during_a_tracking_outage_arrive_when_it_is_back(mlops_stack, client, monkeypatch):
    """The federation never waits for MLflow: rounds logged while the tracking server cannot be reached are
    kept and sent once it answers again, stamped with the times the rounds finished."""
    monkeypatch.setenv(
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"
    )  # each request fails at once; the logger retries
    relay = TcpRelay(free_port(), ("127.0.0.1", mlops_stack.mlflow_port))
    relay.up()
    try:
        logger = LiveRunLogger("test-outage", f"http://127.0.0.1:{relay.port}", retry_seconds=0.2)
        run_id = logger.start({"rounds": 3})
        logger.log_round(round_record(1))
        assert logger.flush(timeout=60)

        relay.down()  # the tracking server is unreachable mid-run
        logger.log_round(round_record(2))
        finished_2 = int(time.time() * 1000)
        logger.log_round(round_record(3))
        assert not logger.flush(timeout=1) and logger.unsent_rounds == [2, 3]

        relay.up()  # back
        assert logger.flush(timeout=60) and logger.unsent_rounds == []
        logger.finish(None, "FAILED")
        points = history(client, run_id, "global/bacc")
        assert [m.step for m in points] == [1, 2, 3]
        assert points[1].timestamp <= finished_2  # the round's own time, not the time it reached MLflow
    finally:
        relay.down()


# ---------------------------------------------------------------- the observer the core calls (mlops/live.py)


def test_observer_logs_rounds_live_and_keeps_them_when_the_run_fails(mlops_stack):
    from mlflow import MlflowClient

    from mlops.live import MlflowObserver

    cfg = TrainConfig(sites=2, rounds=5, synthetic=SYNTH, out="/nonexistent").validate()
    manifest = {
        "sites": [{"name": "site_0"}, {"name": "site_1"}],
        "codec_up": "fp16-zlib",
        "codec_down": "fp16-zlib",
    }
    obs = MlflowObserver(
        cfg,
        "obs-run-1",
        "observer-test",
        tracking_uri=mlops_stack.tracking_uri,
        kfp_run_id="kfp-1",
        options={"quorum": None, "round_timeout": 600.0, "join_timeout": 3600.0, "norm_factor": 10.0},
        record_run_dir=False,
    )
    obs.start({**manifest, "quorum": 2})
    for r in (1, 2):
        obs.round(
            {
                "round": r,
                "global": {"acc": 0.25 * r, "bacc": 0.2 * r},
                "sites": [{"site": "site_0", "acc": 0.5, "bacc": 0.5, "val_acc": 0.4}],
                "sites_present": ["site_0", "site_1"],
                "bytes_up": [10, 12],
                "bytes_down": [20, 20],
                "seconds": 0.1,
            }
        )
    obs.finish(None, "round 3: only 1 of 2 sites answered")
    client = MlflowClient(mlops_stack.tracking_uri)
    run = client.get_run(obs.tracked_run_id)
    assert run.info.status == "FAILED" and run.info.run_name == "obs-run-1"
    assert run.data.tags["kfp.run_id"] == "kfp-1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "global/acc")] == [1, 2]
    assert run.data.params["method"] == cfg.method and run.data.params["site_names"] == "site_0,site_1"
    # Every resolved setting is a parameter: the method's options with their defaults, the operational
    # settings, the server's options (quorum resolved to every site), the preprocessing the method chose.
    from fedmedclip.methods import resolved_options

    params = run.data.params
    options = resolved_options(cfg)
    assert options and all(
        params[f"method_options.{k}"] == (v if isinstance(v, str) else json.dumps(v))
        for k, v in options.items()
    )
    assert params["threads"] == str(cfg.threads) and params["min_class_images"] == str(cfg.min_class_images)
    assert (params["server.quorum"], params["server.join_timeout"], params["server.norm_factor"]) == (
        "2",
        "3600.0",
        "10.0",
    )
    assert params["preprocessing"] in ("squash", "clip") and "out" not in params
    tags = run.data.tags
    assert tags["mlflow.source.type"] == "JOB" and tags["mlflow.user"] and "fedmedclip.run_dir" not in tags
    assert "kfp-1" in tags["mlflow.note.content"]

    # An unreachable tracking server turns tracking off; it never stops the federation.
    off = MlflowObserver(cfg, "obs-run-2", "observer-test", tracking_uri="http://127.0.0.1:9")
    off.start(manifest)
    off.round({"round": 1})
    off.finish({}, None)
    assert off.tracked_run_id is None


def test_server_run_track_finds_the_observer_by_its_entry_point(tmp_path):
    from importlib.metadata import entry_points

    from fedmedclip.observer import RunObserver
    from mlops.live import MlflowObserver

    (ep,) = [e for e in entry_points(group="fedmedclip.observers") if e.name == "mlflow"]
    cfg = TrainConfig(out=str(tmp_path / "run")).validate()
    obs = ep.load()(cfg=cfg, run_id="r-1", experiment="exp")  # how `fedmedclip server run --track` calls it
    assert isinstance(obs, MlflowObserver) and obs.run_dir == tmp_path / "run"
    assert isinstance(obs, RunObserver)  # the core's one observer interface (fedmedclip.observer)
    assert obs.logger.experiment == "exp" and obs.tracked_run_id is None  # nothing logged before start


def test_mlflow_is_the_pinned_version_whose_asynchronous_logging_we_read():
    """mlops/_mlflow.py lists what live logging takes from mlflow beyond its documented API (the futures of an
    asynchronous log_batch): if the pin changes, this fails and the list is checked again."""
    from concurrent.futures import Future
    from importlib.metadata import version

    from mlflow.utils.async_logging.run_operations import RunOperations

    from mlops._mlflow import PINNED_VERSION, operation_futures

    assert version("mlflow") == PINNED_VERSION == "3.17.2"
    future = Future()
    assert operation_futures(RunOperations([future])) == [future]


@pytest.mark.parametrize("uri", ["notascheme", "file:///tmp/mlruns", "sqlite:///mlflow.db"])
def test_a_tracking_uri_that_is_no_server_is_refused_before_any_work(tmp_path, capsys, uri):
    """`train --tracking-uri` (or `serve models:/...`) with a path or a database instead of a tracking server:
    refused in one line before anything is encoded or written. `train` trained the whole run and then said it
    was 'complete but not tracked'; `serve` and `backbone` stopped with MLflow's traceback."""
    from fedmedclip.cli import main

    out = tmp_path / "run"
    argv = [
        "train",
        "--synthetic",
        json.dumps(SYNTH),
        "--rounds",
        "1",
        "--out",
        str(out),
        "--tracking-uri",
        uri,
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(["-q", *argv]) == 2
    assert f"{uri!r} is not a tracking server's address" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "cache").exists()
    assert main(["serve", "models:/any@champion", "--tracking-uri", uri]) == 2
    assert f"{uri!r} is not a tracking server's address" in capsys.readouterr().err

"""The report component: the run directory the server worker published (files first, manifest last) comes back
checked file by file; a changed file, a foreign manifest or no publication at all is refused with a message
naming the object (and the server's status); the report's work imports no torch; and the component itself as a
kfp.local task, with its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.kfp_components import resolve_mailbox
from components.report.component import report_step
from components.worker.component import RUN_DIR, RUN_DIR_FORMAT, RUN_DIR_MANIFEST
from fedmedclip.errors import FedMedClipError
from fedmedclip.federation.mailbox import Mailbox
from fedmedclip.federation.messages import Status
from fedmedclip.federation.storage import LocalDirStore
from mlops.tree import publish_tree, tree_files

RESULTS = {
    "method": "fedmedclip",
    "metrics": {"best_round": 2, "global": {"acc": 0.75, "bacc": 0.5}, "site_mean": {"acc": 0.5, "f1": 0.25}},
}


def _published(tmp_path: Path, run_id: str = "run-1") -> Path:
    """A run directory as the server worker publishes it into a local-directory mailbox."""
    run = tmp_path / "server-run"
    (run / "model").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(RESULTS))
    (run / "model" / "global.safetensors").write_bytes(b"\x00" * 64)
    (run / ".results.json.tmp.part").write_text("an interrupted write: never published")
    manifest = {"format": RUN_DIR_FORMAT, "run_id": run_id, "files": tree_files(run), "mlflow_run_id": "abc"}
    store = Mailbox(LocalDirStore(tmp_path / "mailbox"), run_id).server_private().sub(RUN_DIR)
    publish_tree(store, run, RUN_DIR_MANIFEST, manifest)
    return tmp_path / "mailbox" / "runs" / run_id / "server" / RUN_DIR


def test_the_published_run_directory_comes_back_checked(tmp_path):
    published = _published(tmp_path)
    results, mlflow_run_id = report_step(str(tmp_path / "mailbox"), "run-1", str(tmp_path / "out"))
    assert (results, mlflow_run_id) == (RESULTS, "abc")
    assert sorted(
        p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()
    ) == [
        "model/global.safetensors",
        "results.json",
    ]
    (published / "model" / "global.safetensors").write_bytes(b"\x01" * 64)
    with pytest.raises(FedMedClipError, match=r"global\.safetensors has SHA256 .*changed after publishing"):
        report_step(str(tmp_path / "mailbox"), "run-1", str(tmp_path / "again"))
    assert not (tmp_path / "again" / "model" / "global.safetensors").exists()  # never the changed bytes
    (published / RUN_DIR_MANIFEST).write_text(
        json.dumps({"format": RUN_DIR_FORMAT, "run_id": "other", "files": {}})
    )
    with pytest.raises(FedMedClipError, match="is not run run-1's run directory manifest"):
        report_step(str(tmp_path / "mailbox"), "run-1", str(tmp_path / "again"))


def test_no_published_run_directory_names_the_servers_status(tmp_path):
    mailbox = Mailbox(LocalDirStore(tmp_path / "mailbox"), "run-2")
    mailbox.put_json(
        mailbox.status_key("server"), Status.of("server", "failed", 3, "no quorum", 1.0).to_dict()
    )
    with pytest.raises(
        FedMedClipError, match=r"published no run directory .*server status: failed no quorum"
    ):
        report_step(str(tmp_path / "mailbox"), "run-2", str(tmp_path / "out"))


def test_the_reports_work_imports_no_torch(tmp_path):
    """torch's import is seconds of CPU on the pipeline's critical path (after every worker, before the
    export), for a task that only downloads files."""
    from fedmedclip.config import TrainConfig

    _published(tmp_path, "run-4")
    script = (
        "import sys\n"
        "from components.kfp_components import resolve_mailbox\n"
        "from components.report.component import report_step\n"
        f"mailbox = resolve_mailbox({str(tmp_path / 'mailbox')!r}, '')\n"
        f"report_step(mailbox, 'run-4', {str(tmp_path / 'out')!r})\n"
        "print('torch' in sys.modules)\n"
    )
    repo = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": repo},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "False\n"
    # Without a mailbox, the data's default resolves as the prepare task resolves it: no bucket to default to.
    assert not TrainConfig.data.startswith("s3://")
    with pytest.raises(FedMedClipError, match="no mailbox"):
        resolve_mailbox("", "")
    assert resolve_mailbox("", "s3://bucket") == "s3://bucket"


def test_the_report_component_on_kfp_local(kfp_local, tmp_path):
    from components.kfp_components import components_for

    _published(tmp_path, "run-3")
    task = components_for().report(
        mailbox=str(tmp_path / "mailbox"), settings={}, run_id="run-3", local_stack=""
    )
    assert task.outputs["Output"] == "abc"
    assert json.loads(Path(task.outputs["run_dir"].path, "results.json").read_text()) == RESULTS
    metrics = task.outputs["metrics"].metadata
    assert metrics["best_round"] == 2 and metrics["global_bacc"] == 0.5 and metrics["site_mean_f1"] == 0.25

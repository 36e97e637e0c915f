"""The pipeline's step functions in sequence, in one process (seconds): prepare -> each party's features
(extracted and published to its private area of the run) -> the server and site workers at the same time over a local-directory mailbox -> report; the same metrics,
payloads and model files as `fedmedclip train`. Each component's own tests are beside it (components/<name>/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("kfp")

from conftest import SYNTH, run_workers_at_once, without_timing  # noqa: E402

from components.kfp_components import pipeline_settings  # noqa: E402
from components.prepare.component import prepare_step  # noqa: E402
from components.report.component import report_step  # noqa: E402
from components.worker.component import RUN_DIR, RUN_DIR_MANIFEST, features_step, worker_step  # noqa: E402
from fedmedclip.config import TrainConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _params(cache: Path, **over) -> dict:
    cfg = TrainConfig(sites=2, rounds=2, cache_dir=str(cache), synthetic=SYNTH, out="", **over).validate()
    return {**pipeline_settings(cfg), "join_timeout": 60, "round_timeout": 60}


def test_steps_in_sequence_give_the_engines_run(tmp_path, monkeypatch):
    from fedmedclip.engine import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cache, mailbox, run_id = tmp_path / "cache", str(tmp_path / "mailbox"), "steps-run"
    parties = prepare_step(_params(cache), "", mailbox)
    features = {}
    for p in parties:
        features[p["party"]] = tmp_path / "features" / p["party"]
        args = (p["extraction"], p["role"], p["party"], p["index"], run_id, p["mailbox"])
        assert features_step(*args, str(features[p["party"]]))  # extracted (and published) now
        assert (features[p["party"]] / "provenance.json").exists()

    # Every worker at once, as the pipeline's loop runs them.
    assert run_workers_at_once(parties, run_id, features) == ["", "", ""]  # no tracking server: no MLflow run

    run_dir = tmp_path / "run_dir"
    results, mlflow_run_id = report_step(mailbox, run_id, str(run_dir))
    assert mlflow_run_id == ""
    cfg = TrainConfig(sites=2, rounds=2, cache_dir=str(cache), synthetic=SYNTH, out=str(tmp_path / "engine"))
    ref = train(cfg, progress=False, run_id=run_id)
    assert without_timing(results) == without_timing(ref)
    engine = Path(cfg.out)
    assert json.loads((run_dir / "provenance.json").read_text()) == json.loads(
        (engine / "provenance.json").read_text()
    )
    for rel in ["partition.json", "model/global.safetensors", "model/model.json"] + [
        f"rounds/{p.name}" for p in (engine / "rounds").iterdir()
    ]:
        assert (run_dir / rel).read_bytes() == (engine / rel).read_bytes(), rel
    # The sites' private heads stay in their own state (sites/<k>/private/<run>/), not in the run directory.
    assert not list((run_dir / "model").glob("site_*"))
    for k, site in enumerate(("site_0", "site_1")):
        mine = Path(mailbox, "sites", str(k), "private", run_id, "model", f"site_{site}.safetensors")
        assert mine.read_bytes() == (engine / "model" / f"site_{site}.safetensors").read_bytes()
    assert (run_dir / "plots" / "accuracy.png").exists()

    # A retried server worker after publishing has nothing left to do: it neither trains nor rewrites anything.
    server = parties[0]
    published = Path(mailbox, "runs", run_id, "server", RUN_DIR, RUN_DIR_MANIFEST).read_bytes()
    assert worker_step(server["config"], "server", "server", -1, run_id, mailbox, None) == ""
    assert Path(mailbox, "runs", run_id, "server", RUN_DIR, RUN_DIR_MANIFEST).read_bytes() == published

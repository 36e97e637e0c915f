"""The register component without a tracking server: registration is skipped and the outcome says why, the
run still ends green. (Registration and promotion against a real MLflow, retries included:
tests/test_stack_tracking.py; the whole pipeline: tests/test_pipeline.py.)"""

from __future__ import annotations

from components.register.component import NOT_PROMOTED, register_step
from mlops.promotion import PromotionPolicy


def test_without_a_tracking_server_registration_is_skipped(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    got = register_step(
        str(tmp_path / "run"), str(tmp_path / "onnx"), "", "", "exp", "model", PromotionPolicy()
    )
    assert got == ("", f"{NOT_PROMOTED} (no tracking server)")

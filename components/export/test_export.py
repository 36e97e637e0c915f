"""The export component's own part: an empty `export_site` skips the export and leaves the artifact empty.
(A real export through this step, checked against the metrics the run recorded: tests/test_export.py and the
pipeline's run, tests/test_pipeline.py.)"""

from __future__ import annotations

from components.export.component import export_step


def test_an_empty_site_skips_the_export(tmp_path):
    assert export_step(str(tmp_path / "run"), "", str(tmp_path / "onnx")) == ""
    assert (tmp_path / "onnx").is_dir() and not list((tmp_path / "onnx").iterdir())

"""export: the run's global predictor, or a site's, as one ONNX file (`fedmedclip export`; the contract:
fedmedclip/onnx_contract.py), with its sha256 sidecar."""

import logging
from pathlib import Path

from kfp.dsl import Artifact, Input, Model, Output

log = logging.getLogger("fedmedclip.pipeline")


def export_step(run_dir: str, site: str, onnx_dir: str) -> str:
    """ONNX export of `site` ("global" or a site name) of the run; '' skips. Returns the file or ''."""
    out = Path(onnx_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not site:
        log.info("export skipped: export_site is empty")
        return ""
    from fedmedclip.export import export_onnx
    from fedmedclip.startup import resume_collection

    resume_collection()  # the imports are done (components/__init__.py); exporting builds large graphs
    return str(export_onnx(run_dir, site, out / "model.onnx"))


def export_component(
    run_dir: Input[Artifact], export_site: str, local_stack: str, onnx: Output[Model]
) -> str:
    from components.export.component import export_step
    from components.kfp_components import SERVER_ROLE, act_as

    # The server's credentials: the global model's OOD score is fitted on the server's own images (global test
    # and reference set), read from the run's data as the server worker read them.
    act_as(SERVER_ROLE, local_stack)
    path = export_step(run_dir.path, export_site, onnx.path)
    if path:
        from fedmedclip.digests import read_sha256_sidecar

        onnx.metadata.update({"framework": "onnx", "file": "model.onnx", "sha256": read_sha256_sidecar(path)})
    return path

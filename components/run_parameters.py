"""The pipeline's run-time parameters besides `settings`, each declared once (fedmedclip.flags.setting): its flag
of `pipeline run|submit|demo` (pipelines/cli.py), its argument, and its description in the KFP UI and the
components' READMEs (components.kfp_components.PARAMETER_DOCS). Standard library only: the CLI imports it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from fedmedclip.flags import PIPELINE, declared, setting
from fedmedclip.tracking_server import DEFAULT_EXPERIMENT
from mlops.promotion import PromotionPolicy

_pipeline, _registry = partial(setting, group="pipeline"), partial(setting, group="registry")


@dataclass
class RunParameters(PromotionPolicy):
    """The pipeline's parameters besides `settings` (and `local_stack`, set by a local run): the promotion's
    are `fedmedclip promote`'s (PromotionPolicy)."""

    site_names: str = _pipeline(
        "", empty=True, help="comma-separated site names, checked against the partition's"
    )
    mailbox: str = _pipeline(
        "",
        empty=True,
        help="where the parties exchange modules: s3://BUCKET[/PREFIX] (default: the data's bucket for s3:// "
        "data; locally a folder under the pipeline root)",
    )
    export_site: str = _registry(
        "global",
        empty=True,
        help="model to export to ONNX: global, a site name, or '' (no export; default: %(default)s)",
    )
    tracking_uri: str = _registry(
        "",
        empty=True,
        help="MLflow server (default: locally $MLFLOW_TRACKING_URI, else the running local stack, else no "
        "tracking; in a cluster the endpoints ConfigMap's)",
    )
    experiment: str = _registry(DEFAULT_EXPERIMENT, help="MLflow experiment (default: %(default)s)")
    model_name: str = _registry("fedmedclip", help="registered model (default: %(default)s)")
    fail_if_not_promoted: bool = setting(
        False,
        group="promotion",
        commands=(PIPELINE,),  # `promote` itself always fails on a refusal
        help="fail the run when the promotion is refused (default: the version stays registered and the "
        "register task's `promotion` output says why)",
    )


def descriptions() -> dict[str, str]:
    """Each parameter's description for KFP: its flag's help as a sentence, the default filled in."""
    texts = {d.name: d.meta["help"] % {"default": d.default} for d in declared(RunParameters)}
    return {name: text[0].upper() + text[1:] + "." for name, text in texts.items()}

"""When an alias may move to a new version (mlops/registry.py, `promote`): the promotion options, each declared
once (fedmedclip.flags.setting). They are the flags of `fedmedclip promote` and of `pipeline run|submit|demo`,
whose run-time parameters (components/run_parameters.py, RunParameters) extend this class. Standard library only: the CLI
imports it to add the flags."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from fedmedclip.flags import check_declared, setting

_promotion = partial(setting, group="promotion")


@dataclass
class PromotionPolicy:
    """When an alias may move to a version (see the module's docstring for where these options are used)."""

    # `promote_alias`: the pipeline's parameter name; its flag, as `promote`'s, is --alias.
    promote_alias: str = _promotion(
        "champion",
        flags=("--alias",),
        metavar="ALIAS",
        empty=True,
        help="the alias to move to the new version, served as models:/NAME@ALIAS ('' in a pipeline run: "
        "register only; default: %(default)s)",
    )
    allow_worse: bool = _promotion(
        False,
        help="promote even when its global balanced accuracy is below the alias holder's (recorded on the "
        "version)",
    )
    allow_different_data: bool = _promotion(
        False,
        help="compare with the alias holder even when it was trained on another data set or partition "
        "(recorded on the version; --allow-worse still applies)",
    )
    max_epsilon: float = _promotion(  # not None: KFP refuses None as a parameter's value
        0.0,
        metavar="EPSILON",
        minimum=0.0,  # a negative budget was read as a budget nothing meets: every version refused
        help="refuse a version trained without record-level differential privacy or with a larger epsilon "
        "(the largest over its sites); 0: no budget (default: %(default)s)",
    )
    # A budget is an (epsilon, delta) pair: the same run reports a smaller epsilon at a larger delta (q=0.14,
    # sigma 2, 250 steps: 6.0 at 1e-5, 3.9 at 4e-3), so an epsilon budget alone let a looser delta through.
    max_delta: float = _promotion(
        0.0,
        metavar="DELTA",
        minimum=0.0,
        maximum=1.0,
        help="with --max-epsilon, also refuse a version whose record-level delta is larger; 0: any delta "
        "(default: %(default)s)",
    )

    def __post_init__(self) -> None:
        check_declared(self)  # made from the command line or from the register task's parameters alike
        if self.max_delta and not self.max_epsilon:
            from fedmedclip.errors import ConfigError

            raise ConfigError("--max-delta is half of a privacy budget: give --max-epsilon with it")

"""Differential privacy for the federation (docs/privacy.md): record-level DP-SGD at each site with an
accountant (`dpsgd`, `accounting`), client-level DP on the aggregate (`client`), and the privacy facts of a
run that results.json, the registry, the exported model and the model card carry (`report`)."""

from .accounting import SitePlan, calibrate_sigma, dpsgd_epsilon, max_steps, plan_site
from .dpsgd import DPSGD, clip_per_example, per_example_gradients
from .settings import DEFAULT_CLIP, DEFAULT_DELTA, PrivacySettings

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_DELTA",
    "DPSGD",
    "PrivacySettings",
    "SitePlan",
    "calibrate_sigma",
    "clip_per_example",
    "dpsgd_epsilon",
    "max_steps",
    "per_example_gradients",
    "plan_site",
]

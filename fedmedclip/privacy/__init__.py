"""Differential privacy for the federation (docs/privacy.md): record-level DP-SGD at each site with an
accountant (`dpsgd`, `accounting`), client-level DP on the aggregate (`client`), and the privacy facts of a
run that results.json, the registry, the exported model and the model card carry (`report`).

Only the settings are imported here: `report` and `settings` need neither torch nor dp-accounting, so the
registry and the model card read a run's privacy facts without them."""

from .settings import DEFAULT_CLIP, DEFAULT_DELTA, PrivacySettings

__all__ = ["DEFAULT_CLIP", "DEFAULT_DELTA", "PrivacySettings"]

"""Federated methods, one per module. `METHODS` maps a CLI name to its class."""

from .base import Method, MethodContext, SiteData, SiteTrainer
from .facmic import Facmic
from .fedmedclip_method import FedMedClip

METHODS: dict[str, type[Method]] = {m.name: m for m in (FedMedClip, Facmic)}

__all__ = ["METHODS", "Method", "MethodContext", "SiteData", "SiteTrainer"]

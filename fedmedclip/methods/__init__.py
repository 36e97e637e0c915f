"""Federated methods, one per module. `METHODS` maps a CLI name to its class."""

from .base import Method, MethodContext, SiteData, SiteTrainer
from .facmic import Facmic
from .fedavg import FedAvg
from .fedclip import FedClip
from .fedfocal import FedFocal
from .fedmedclip_method import FedMedClip
from .fedprox import FedProx
from .moon import Moon
from .zeroshot import ZeroShot

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (FedMedClip, Facmic, ZeroShot, FedClip, FedAvg, FedProx, Moon, FedFocal)
}

__all__ = ["METHODS", "Method", "MethodContext", "SiteData", "SiteTrainer"]

"""Federated methods: one module each, everything about a method declared on its class (what travels, what a
site keeps, how its site model is written and rebuilt for export, whether it needs images or a global model,
its group in `fedmedclip compare`, its options with defaults and help).

The registry: `METHODS` maps a name to its class, in the order `compare` tabulates them. A new method is one
module plus one line below; code outside this package never names a method (a test checks it). Methods
defined elsewhere (a plugin, a test) join with `register_method`."""

from __future__ import annotations

import sys

from .base import Method, MethodContext, ModelFiles, SiteData, SiteTrainer
from .facmic import Facmic
from .fedavg import FedAvg
from .fedclip import FedClip
from .fedfocal import FedFocal
from .fedmedclip_method import FedMedClip
from .fedprox import FedProx
from .moon import Moon
from .zeroshot import ZeroShot

METHODS: dict[str, type[Method]] = {}
DEFAULT_METHOD = FedMedClip.name


def register_method(cls: type[Method], replace: bool = False) -> type[Method]:
    """Make `cls` available by its `name` to train, the runtime, export, compare and the CLI."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
        raise TypeError(f"{cls!r} is not a Method subclass with a name")
    if cls.name in METHODS and METHODS[cls.name] is not cls and not replace:
        raise ValueError(
            f"a method named {cls.name!r} is already registered ({METHODS[cls.name].__module__})"
        )
    METHODS[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    METHODS.pop(name, None)


def resolved_preprocessing(cfg) -> str:
    """The run's preprocessing: its own, else its method's default."""
    return cfg.preprocessing or METHODS[cfg.method].default_preprocessing


def resolved_options(cfg) -> dict:
    """The method's options with every default filled in (what results.json's `method_options` holds)."""
    return METHODS[cfg.method].resolved(cfg.method_options or {})


def method_groups() -> dict[str, list[str]]:
    """`compare`'s groups: every method's group, and `all`. The `cached` group also holds the local and
    centralized references its methods declare (`NAME@local`, `NAME@centralized`)."""
    groups: dict[str, list[str]] = {}
    for name, cls in METHODS.items():
        groups.setdefault(cls.group, []).append(name)
    for name, cls in METHODS.items():
        groups.setdefault(cls.group, []).extend(f"{name}@{ref}" for ref in cls.compare_references)
    groups["all"] = [m for g in groups.values() for m in g]
    return groups


def _summary(doc: str | None) -> str:
    """A docstring's first sentence, whatever its line breaks: its first line alone stops mid-sentence."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


def describe_methods() -> str:
    """What `fedmedclip methods` prints: each method, its group, and its options with defaults and help."""
    lines = []
    for name, cls in METHODS.items():
        flags = [
            f"group {cls.group}",
            f"aggregation {cls.weighting}",
            f"preprocessing {cls.default_preprocessing}",
        ]
        if cls.needs_images:
            flags.append("trains on images (no feature cache)")
        if not cls.exportable:
            flags.append("not exportable")
        lines.append(f"{name}: {_summary(cls.__doc__ or sys.modules[cls.__module__].__doc__)}".rstrip(": "))
        lines.append(f"  {', '.join(flags)}")
        for opt, default in cls.options.items():
            setting = f"{opt}={default!r}"
            rule = cls.option_rules.get(opt)
            within = f" ({rule.describe()})" if hasattr(rule, "describe") else ""
            lines.append(f"  --method-opt {setting:<24} {cls.option_help.get(opt, '')}{within}")
    return "\n".join(lines)


for _cls in (ZeroShot, FedClip, Facmic, FedMedClip, FedAvg, FedProx, Moon, FedFocal):
    register_method(_cls)

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Method",
    "MethodContext",
    "ModelFiles",
    "SiteData",
    "SiteTrainer",
    "describe_methods",
    "method_groups",
    "register_method",
    "unregister_method",
]

"""The training configuration, validated up front so a bad option fails before any work starts."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .backbone import PREPROCESSING_NAMES
from .codec import CODECS
from .errors import ConfigError
from .features import DEFAULT_PROMPT
from .partition import SCHEMES

SYNTHETIC = "synthetic"
# federated: the method as published; local: each site alone, nothing shared (lower reference);
# centralized: all sites' training data pooled in one holder (upper reference).
FEDERATIONS = ("federated", "local", "centralized")


@dataclass
class TrainConfig:
    data: str = SYNTHETIC  # image-folder root, CSV manifest, or "synthetic"
    method: str = "fedmedclip"
    federation: str = "federated"  # one of FEDERATIONS
    partition: str = "iid"
    alpha: float | None = None
    sites: int | None = 3
    rounds: int = 10
    backbone: str = "tiny"
    preprocessing: str | None = None  # None: the method's reference recipe
    seed: int = 0
    out: str = "runs/latest"
    batch_size: int = 32
    codec: str = "fp16-zlib"
    split_ratio: tuple[float, float, float] = (0.8, 0.1, 0.1)
    reference_fraction: float = 0.1
    transductive: bool = False
    prompt_template: str = DEFAULT_PROMPT
    cache_dir: str = ".cache/fedmedclip"
    skip_bad_images: bool = False
    method_options: dict = field(default_factory=dict)
    synthetic: dict = field(default_factory=dict)  # arguments of fedmedclip.synthetic.generate

    def validate(self) -> TrainConfig:
        from .methods import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.federation not in FEDERATIONS:
            raise ConfigError(
                f"unknown federation {self.federation!r}; choose one of {', '.join(FEDERATIONS)}"
            )
        if self.partition not in SCHEMES:
            raise ConfigError(f"unknown partition {self.partition!r}; choose one of {', '.join(SCHEMES)}")
        if self.partition == "dirichlet" and not (self.alpha and self.alpha > 0):
            raise ConfigError("--partition dirichlet needs --alpha > 0, e.g. --alpha 0.5")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}")
        if self.sites is not None and self.sites < 1:
            raise ConfigError(f"--sites must be at least 1, got {self.sites}")
        if self.batch_size < 2:
            raise ConfigError(f"--batch-size must be at least 2 (BatchNorm), got {self.batch_size}")
        if self.codec not in CODECS:
            raise ConfigError(f"unknown codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        if self.preprocessing is not None and self.preprocessing not in PREPROCESSING_NAMES:
            raise ConfigError(
                f"unknown preprocessing {self.preprocessing!r}; choose one of {', '.join(PREPROCESSING_NAMES)}"
            )
        # s3://BUCKET: images published per site, read by the pipeline's tasks (components/site_data.py).
        if self.data != SYNTHETIC and not self.data.startswith("s3://") and not Path(self.data).exists():
            raise ConfigError(
                f"--data {self.data!r} does not exist (a folder, a .csv manifest, or 'synthetic')"
            )
        self.split_ratio = tuple(float(x) for x in self.split_ratio)
        return self

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = set(d) - set(known)
        if unknown:
            raise ConfigError(f"unknown configuration key(s): {', '.join(sorted(unknown))}")
        return cls(**known)

    def resume_key(self) -> dict:
        """What must not change between a run and its resumption (`out` and cache paths may)."""
        d = self.to_json()
        for k in ("out", "cache_dir"):
            d.pop(k)
        if d["federation"] == "federated":
            d.pop("federation")  # the default is left out, so keys from before the field existed still match
        return json.loads(json.dumps(d))


def parse_method_options(items: list[str]) -> dict:
    """`KEY=VALUE` pairs; values parsed as JSON where possible (numbers, true/false), else strings."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"method option {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out

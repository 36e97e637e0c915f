"""The training configuration, validated up front so a bad option fails before any work starts."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .aggregation import AGGREGATORS
from .backbone import PREPROCESSING_NAMES
from .codec import CODECS, CodecError, get_codec
from .data import DEFAULT_MIN_CLASS_IMAGES, DUPLICATE_POLICIES
from .encoders import ENGINES
from .errors import ConfigError
from .features import DEFAULT_PROMPT
from .methods import DEFAULT_METHOD
from .partition import SCHEMES

SYNTHETIC = "synthetic"
# federated: the method as published; local: each site alone, nothing shared (lower reference);
# centralized: all sites' training data pooled in one holder (upper reference).
FEDERATIONS = ("federated", "local", "centralized")


@dataclass
class TrainConfig:
    data: str = SYNTHETIC  # image-folder root, CSV manifest, or "synthetic"
    method: str = DEFAULT_METHOD
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
    codec_up: str = "fp16-zlib"  # how a site's update travels to the server (fedmedclip.codec)
    codec_down: str = "fp16-zlib"  # how the global module travels to the sites
    split_ratio: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # Share of the training pool held out, unlabelled, as FACMIC's adaptation target (for every method, so
    # partitions compare fairly). With `transductive` FACMIC adapts toward the global test images instead, as
    # the reference code does, so nothing is held out: validate() sets this to 0 and the sites train on 100 %
    # of the pool, as in the paper.
    reference_fraction: float = 0.1
    transductive: bool = False
    prompt_template: str = DEFAULT_PROMPT
    cache_dir: str = ".cache/fedmedclip"
    skip_bad_images: bool = False
    # The class list. None: inferred from the data, and then a class with fewer than `min_class_images`
    # training images, or in only one of the training pool and the global test set, is refused with every
    # class's counts (a label typo would otherwise become a class). An explicit list skips that check;
    # labels outside it are refused.
    classes: list[str] | None = None
    min_class_images: int = DEFAULT_MIN_CLASS_IMAGES
    # Torch threads for training (feature extraction uses every core). Results depend on it in the last bits:
    # parties that must agree exactly (a simulator and a mailbox run) use the same value. Not a resume key.
    threads: int = 1
    # What runs the image encoder during feature extraction (fedmedclip.encoders): every engine gives float32
    # features within 1e-4 relative of PyTorch's, so stores are shared between them. Not a resume key.
    encoder_engine: str = "auto"
    # A CSV manifest may list images outside the manifest's folder only when the user says so.
    allow_outside_root: bool = False
    method_options: dict = field(default_factory=dict)
    synthetic: dict = field(default_factory=dict)  # arguments of fedmedclip.synthetic.generate
    # Differential privacy (the --dp-* flags; fedmedclip.privacy.PrivacySettings, docs/privacy.md): only the
    # entries that differ from the defaults, empty for a run without DP.
    privacy: dict = field(default_factory=dict)
    # How the server combines the accepted updates: the method's own mean, or a robust rule
    # (fedmedclip/federation/robust.py).
    aggregator: str = "mean"
    # Byte-identical images (fedmedclip.data.deduplicate): drop the training-pool copies (the test copy stays),
    # keep them all (the papers' setting), or refuse the data.
    duplicates: str = "drop"
    # Secure aggregation (fedmedclip/secagg, docs/secure-aggregation.md): the server learns only the weighted
    # sum of the updates of the sites present. `secagg_threshold`: the Shamir threshold t, above half the
    # sites (None: floor(n/2) + 1); every step of a round needs t sites.
    secure_aggregation: bool = False
    secagg_threshold: int | None = None

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
        for flag, name, direction in (
            ("--codec-up", self.codec_up, "up"),
            ("--codec-down", self.codec_down, "down"),
        ):
            if name not in CODECS:
                raise ConfigError(f"unknown codec {name!r} for {flag}; choose one of {', '.join(CODECS)}")
            try:
                get_codec(name, direction)
            except CodecError as exc:  # a difference codec cannot travel down: a late site has no reference
                raise ConfigError(
                    f"{flag} {name}: {exc} (set --codec-up {name} and keep --codec-down)"
                ) from None
        if self.aggregator not in AGGREGATORS:
            raise ConfigError(
                f"unknown aggregator {self.aggregator!r}; choose one of {', '.join(AGGREGATORS)}"
            )
        if self.duplicates not in DUPLICATE_POLICIES:
            raise ConfigError(
                f"unknown --duplicates {self.duplicates!r}; choose one of {', '.join(DUPLICATE_POLICIES)}"
            )
        if self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if self.encoder_engine not in ENGINES:
            raise ConfigError(
                f"unknown --encoder-engine {self.encoder_engine!r}; choose one of {', '.join(ENGINES)}"
            )
        # Unknown method options fail here, before any data is read or any pod starts.
        unknown = sorted(set(self.method_options) - set(METHODS[self.method].options))
        if unknown:
            known = METHODS[self.method].options
            raise ConfigError(
                f"unknown option(s) for {self.method}: {', '.join(unknown)}; known: "
                + (", ".join(f"{k} (default {v})" for k, v in known.items()) or "none")
            )
        if self.preprocessing is not None and self.preprocessing not in PREPROCESSING_NAMES:
            raise ConfigError(
                f"unknown preprocessing {self.preprocessing!r}; choose one of {', '.join(PREPROCESSING_NAMES)}"
            )
        # s3://BUCKET: images published per site, read by the pipeline's tasks (mlops/site_data.py).
        if self.data != SYNTHETIC and not self.data.startswith("s3://") and not Path(self.data).exists():
            raise ConfigError(
                f"--data {self.data!r} does not exist (a folder, a .csv manifest, or 'synthetic')"
            )
        if self.classes is not None:
            names = [c.strip() if isinstance(c, str) else c for c in self.classes]
            if any(not isinstance(c, str) or not c for c in names) or len(set(names)) != len(names):
                raise ConfigError(f"--classes must be distinct non-empty class names, got {self.classes!r}")
            if len(names) < 2:
                raise ConfigError(f"--classes needs at least two classes, got {self.classes!r}")
            self.classes = names
        if isinstance(self.min_class_images, bool) or not isinstance(self.min_class_images, int):
            raise ConfigError(f"--min-class-images must be an integer, got {self.min_class_images!r}")
        if self.min_class_images < 1:
            raise ConfigError(f"--min-class-images must be at least 1, got {self.min_class_images}")
        self._validate_privacy(METHODS[self.method])
        self._validate_secure_aggregation()
        if self.transductive:
            self.reference_fraction = 0.0  # the target is the global test set: hold nothing out
        self.split_ratio = tuple(float(x) for x in self.split_ratio)
        return self

    def _validate_privacy(self, method_cls) -> None:
        from .privacy import PrivacySettings

        if not isinstance(self.privacy, dict):
            raise ConfigError(f"privacy must be an object of settings, got {self.privacy!r}")
        settings = PrivacySettings.from_config(self.privacy)
        if settings.record_level and not method_cls.dp_sgd:
            from .methods.base import dp_sgd_methods

            raise ConfigError(
                f"{self.method} does not support record-level differential privacy (DP-SGD is implemented for "
                f"{', '.join(dp_sgd_methods())}, which train small modules on cached features); drop "
                "--dp-target-epsilon / --dp-noise-multiplier"
            )
        if settings.client_level and self.federation != "federated":
            raise ConfigError(
                f"client-level DP (--dp-client-noise) protects what sites send to the server; --federation "
                f"{self.federation} sends nothing"
            )
        self.privacy = settings.to_config()

    def _validate_secure_aggregation(self) -> None:
        from .privacy import PrivacySettings

        t = self.secagg_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, int)):
            raise ConfigError(f"--secagg-threshold must be an integer, got {t!r}")
        if not self.secure_aggregation:
            if t is not None:
                raise ConfigError("--secagg-threshold needs --secure-aggregation")
            return
        if self.federation != "federated":
            raise ConfigError(
                f"secure aggregation hides the sites' updates from the server; --federation {self.federation} "
                "sends none"
            )
        if self.aggregator != "mean":
            raise ConfigError(
                f"--aggregator {self.aggregator} needs each site's update, which secure aggregation hides from "
                "the server: use the method's mean (each site bounds its own update instead)"
            )
        if self.sites is not None and self.partition != "natural":
            from .secagg.protocol import default_threshold

            if self.sites < 2:
                raise ConfigError("secure aggregation needs two or more sites")
            if t is not None and not default_threshold(self.sites) <= t <= self.sites:
                raise ConfigError(
                    f"--secagg-threshold {t} must be above half the {self.sites} sites and at most "
                    f"{self.sites} (default {default_threshold(self.sites)})"
                )
        privacy = PrivacySettings.from_config(self.privacy)
        if privacy.client_level and privacy.client_noise_at != "server":
            raise ConfigError(
                "client-level DP with the noise at the sites needs discrete noise in secure aggregation's ring "
                "(not implemented); with --secure-aggregation the sites clip and the server adds the noise to "
                "the unmasked sum: use --dp-client-noise-at server (docs/secure-aggregation.md)"
            )
        if privacy.client_quantile is not None:
            raise ConfigError(
                "adaptive clipping (--dp-client-quantile) counts the sites' unclipped updates, which secure "
                "aggregation hides from the server: use a fixed --dp-client-clip"
            )
        from .codec import get_codec
        from .codec.secure import secure_codec

        try:
            secure_codec(get_codec(self.codec_up, "up"), sites=2, bound=1.0)
        except CodecError as exc:
            raise ConfigError(f"--codec-up {self.codec_up} under secure aggregation: {exc}") from None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        d = dict(d)
        if "codec" in d:  # before uplink and downlink codecs were chosen separately: one codec for both
            codec = d.pop("codec")
            d.setdefault("codec_up", codec)
            d.setdefault("codec_down", codec)
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = set(d) - set(known)
        if unknown:
            raise ConfigError(f"unknown configuration key(s): {', '.join(sorted(unknown))}")
        return cls(**known)

    def resume_key(self) -> dict:
        """What must not change between a run and its resumption (`out` and cache paths may)."""
        d = self.to_json()
        for k in ("out", "cache_dir", "threads", "min_class_images", "allow_outside_root", "encoder_engine"):
            d.pop(k)
        if d.get("classes") is None:
            d.pop("classes", None)  # the default is left out: keys from before the field existed still match
        if not d.get("privacy"):
            d.pop("privacy", None)  # likewise: a run without DP keeps the key it had before DP existed
        # Defaults are left out, so keys from before these fields existed still match.
        for key, default in (
            ("federation", "federated"),
            ("aggregator", "mean"),
            ("duplicates", "drop"),
            ("secure_aggregation", False),
            ("secagg_threshold", None),
        ):
            if d.get(key) == default:
                d.pop(key)
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

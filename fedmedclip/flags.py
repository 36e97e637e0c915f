"""One definition of the training configuration's command-line flags. `fedmedclip train`, `server run`,
`compare`, `data publish` and `pipeline run|submit|demo` all add their flags from here (each command picks the
fields it needs), so a flag is spelled, typed, defaulted and documented once."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from .aggregation import AGGREGATORS
from .config import FEDERATIONS, TrainConfig, parse_method_options
from .data import DUPLICATE_POLICIES
from .encoders import ENGINES
from .errors import ConfigError


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise ConfigError(f"--split {text!r} must be three numbers like 0.8,0.1,0.1")
    return parts


def _json_object(flag: str):
    def parse(text: str) -> dict:
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{flag} {text!r} is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{flag} must be a JSON object, e.g. '{{\"per_class_per_site\": 40}}'")
        return value

    return parse


def _classes(text: str) -> list[str]:
    names = [c.strip() for c in str(text).split(",") if c.strip()]
    if not names:
        raise ConfigError("--classes needs a comma-separated list of class names")
    return names


def _methods_help() -> str:
    from .methods import METHODS

    return " | ".join(METHODS)


@dataclass
class Flag:
    field: str  # TrainConfig field
    flags: tuple[str, ...]
    help: str
    kwargs: dict = field(default_factory=dict)
    parse: object = None  # str -> value, applied by config_from_args (errors are ConfigError, exit status 2)
    key: str | None = None  # the entry of a dict field (`privacy`) this flag sets; None: the whole field

    @property
    def dest(self) -> str:
        return f"{self.field}__{self.key}" if self.key else self.field


FLAGS: list[Flag] = [
    Flag(
        "data",
        ("--data",),
        "image-folder root (<root>/<Training|Testing>/<class>/*), a CSV manifest (path,label[,site][,split]), "
        "'synthetic' (generated), or s3://BUCKET published by `fedmedclip data publish` (default: %(default)s)",
    ),
    Flag("method", ("--method",), "the method: {methods} (default: %(default)s)"),
    Flag(
        "federation",
        ("--federation",),
        "federated (default), local (each site alone, nothing shared) or centralized (all training data pooled "
        "in one holder): the lower and upper references for any method",
        {"choices": FEDERATIONS},
    ),
    Flag(
        "partition",
        ("--partition",),
        "iid, dirichlet (with --alpha) or natural (the manifest's site column) (default: %(default)s)",
        {"choices": ("iid", "dirichlet", "natural")},
    ),
    Flag("alpha", ("--alpha",), "Dirichlet concentration (smaller = more label skew)", {"type": float}),
    Flag("sites", ("--sites",), "number of sites (default: %(default)s)", {"type": int}),
    Flag("rounds", ("--rounds",), "federated rounds (default: %(default)s)", {"type": int}),
    Flag(
        "backbone",
        ("--backbone",),
        "tiny | random-vit-b32 | random-vit-b16 | a local CLIP directory | a Hugging Face id already cached "
        "(never downloaded) (default: %(default)s)",
    ),
    Flag(
        "preprocessing",
        ("--preprocessing",),
        "squash or clip (default: the method's reference recipe: fedmedclip squash, facmic clip)",
        {"choices": ("clip", "squash")},
    ),
    Flag(
        "seed",
        ("--seed",),
        "random seed of the partition and every draw (default: %(default)s)",
        {"type": int},
    ),
    Flag("out", ("--out",), "run directory (default: %(default)s)"),
    Flag("batch_size", ("--batch-size",), "training batch size (default: %(default)s)", {"type": int}),
    Flag("codec_up", ("--codec-up",), "how a site's update travels to the server (default: %(default)s)"),
    Flag(
        "codec_down", ("--codec-down",), "how the global module travels to the sites (default: %(default)s)"
    ),
    Flag(
        "split_ratio",
        ("--split",),
        "per-site train,val,test shares (default: 0.8,0.1,0.1)",
        parse=parse_split,
    ),
    Flag(
        "reference_fraction",
        ("--reference-fraction",),
        "share of the training pool held out, unlabelled, as FACMIC's adaptation target (default: %(default)s; "
        "nothing is held out with --transductive)",
        {"type": float},
    ),
    Flag(
        "transductive",
        ("--transductive",),
        "FACMIC adapts toward the global test images, as the reference code does (only to match the paper)",
        {"action": "store_true"},
    ),
    Flag(
        "prompt_template",
        ("--prompt-template",),
        "class prompt, '{}' is the class name (default: %(default)r)",
    ),
    Flag("cache_dir", ("--cache-dir",), "feature stores and generated data (default: %(default)s)"),
    Flag(
        "skip_bad_images",
        ("--skip-bad-images",),
        "skip unreadable images (counted, ids recorded) instead of failing on the first",
        {"action": "store_true"},
    ),
    Flag(
        "method_options",
        ("--method-opt", "--method-option"),
        "a method option KEY=VALUE, e.g. lr_fam=5e-4 or local_steps=50 (repeatable; unknown options are refused "
        "with the list of known ones)",
        {"action": "append", "metavar": "KEY=VALUE"},
        parse=parse_method_options,
    ),
    Flag(
        "synthetic",
        ("--synthetic",),
        "JSON arguments of the synthetic data generator, e.g. '{\"per_class_per_site\": 40}'",
        parse=_json_object("--synthetic"),
    ),
    Flag(
        "classes",
        ("--classes",),
        "the class list, comma-separated (default: inferred from the data, which then refuses a class with fewer "
        "than --min-class-images training images or present in only one split)",
        parse=_classes,
    ),
    Flag(
        "min_class_images",
        ("--min-class-images",),
        "with an inferred class list, the fewest training images a class may have (default: %(default)s)",
        {"type": int},
    ),
    Flag(
        "allow_outside_root",
        ("--allow-outside-root",),
        "let a CSV manifest list images outside the manifest's folder (refused by default)",
        {"action": "store_true"},
    ),
    Flag(
        "aggregator",
        ("--aggregator",),
        "how the server combines the accepted updates: mean (the method's own rule), or for small or untrusted "
        "federations median, trimmed-mean or krum (default: %(default)s)",
        {"choices": AGGREGATORS},
    ),
    Flag(
        "duplicates",
        ("--duplicates",),
        "byte-identical images: drop the training and validation copies (a test copy stays), keep them all "
        "(the papers' setting) or refuse the data; copies with different labels are dropped everywhere "
        "(refuse: stop) (default: %(default)s)",
        {"choices": DUPLICATE_POLICIES},
    ),
    Flag(
        "threads",
        ("--threads",),
        "torch threads for training; extraction uses every core (default: %(default)s)",
        {"type": int},
    ),
    Flag(
        "encoder_engine",
        ("--encoder-engine",),
        "what runs the frozen image encoder during feature extraction: onnxruntime (the encoder exported once "
        "to ONNX, cached under --cache-dir, about 2x faster on CPU), torch, or auto (onnxruntime for a "
        "CLIP-sized backbone when installed); all within 1e-4 of PyTorch (default: %(default)s)",
        {"choices": ENGINES},
    ),
    Flag(
        "secure_aggregation",
        ("--secure-aggregation",),
        "secure aggregation (Bonawitz et al. 2017): the server learns only the weighted sum of the sites' "
        "updates; each site bounds and masks its own, with its registered identity key (docs/secure-aggregation.md)",
        {"action": "store_true"},
    ),
    Flag(
        "secagg_threshold",
        ("--secagg-threshold",),
        "secure aggregation's threshold t: every step of a round needs t sites, and fewer than t colluding "
        "sites learn nothing of another's update (above half the sites; default: floor(sites/2) + 1)",
        {"type": int, "metavar": "T"},
    ),
    # Differential privacy (fedmedclip.privacy, docs/privacy.md): each sets one entry of TrainConfig.privacy.
    Flag(
        "privacy",
        ("--dp-target-epsilon",),
        "record-level DP-SGD at each site: the epsilon each site may spend (per site, at --dp-delta); each site's "
        "noise multiplier is calibrated to it for the planned rounds before any training, and a site stops before "
        "a step that would exceed it",
        {"type": float, "metavar": "EPSILON"},
        key="target_epsilon",
    ),
    Flag(
        "privacy",
        ("--dp-noise-multiplier",),
        "record-level DP-SGD with this noise multiplier sigma (noise std sigma x --dp-clip per step) instead of a "
        "calibrated one; with --dp-target-epsilon that target is then a budget",
        {"type": float, "metavar": "SIGMA"},
        key="noise_multiplier",
    ),
    Flag(
        "privacy",
        ("--dp-clip",),
        "DP-SGD's per-example gradient norm bound C (default: 1.0)",
        {"type": float, "metavar": "C"},
        key="clip",
    ),
    Flag(
        "privacy",
        ("--dp-delta",),
        "delta of every (epsilon, delta) guarantee (default: 1e-5; must not exceed 1/n of the smallest site)",
        {"type": float, "metavar": "DELTA"},
        key="delta",
    ),
    Flag(
        "privacy",
        ("--dp-accountant",),
        "privacy accountant of dp-accounting: rdp (default) or pld (tighter, much slower)",
        {"choices": ("rdp", "pld")},
        key="accountant",
    ),
    Flag(
        "privacy",
        ("--dp-client-noise",),
        "client-level DP: each site's update is clipped and Gaussian noise of this multiplier z (std z x the "
        "clip) is added to the sum; meant for federations of many sites (docs/privacy.md)",
        {"type": float, "metavar": "Z"},
        key="client_noise",
    ),
    Flag(
        "privacy",
        ("--dp-client-clip",),
        "client-level DP: the update norm bound S (the initial one with --dp-client-quantile) (default: 1.0)",
        {"type": float, "metavar": "S"},
        key="client_clip",
    ),
    Flag(
        "privacy",
        ("--dp-client-quantile",),
        "client-level DP with adaptive clipping (Andrew et al. 2021): the clip follows this quantile of the "
        "sites' update norms, e.g. 0.5",
        {"type": float, "metavar": "GAMMA"},
        key="client_quantile",
    ),
    Flag(
        "privacy",
        ("--dp-client-clip-lr",),
        "adaptive clipping's learning rate (geometric update; default: 0.2)",
        {"type": float, "metavar": "ETA"},
        key="client_clip_lr",
    ),
    Flag(
        "privacy",
        ("--dp-client-count-noise",),
        "adaptive clipping: noise std on the count of unclipped updates (default: sites / 20)",
        {"type": float, "metavar": "SIGMA_B"},
        key="client_count_noise",
    ),
    Flag(
        "privacy",
        ("--dp-client-noise-at",),
        "client-level DP: who adds the noise: server (a trusted aggregator, on the sum; default) or sites (each "
        "its share, for an aggregator that sees only the sum)",
        {"choices": ("server", "sites")},
        key="client_noise_at",
    ),
]

# The pieces of the configuration a command can ask for by name.
DATA_FIELDS = (
    "data",
    "partition",
    "alpha",
    "sites",
    "seed",
    "split_ratio",
    "reference_fraction",
    "transductive",
    "synthetic",
    "cache_dir",
    "skip_bad_images",
    "classes",
    "min_class_images",
    "allow_outside_root",
    "duplicates",
)


def add_config_arguments(
    parser: argparse.ArgumentParser,
    include: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
    defaults: dict | None = None,
    title: str | None = None,
) -> None:
    """Add the flags of the chosen TrainConfig fields (default: all), with TrainConfig's defaults unless
    `defaults` overrides them; `--codec` (both directions) comes with the codec fields."""
    base = TrainConfig()
    target = parser.add_argument_group(title) if title else parser
    for f in FLAGS:
        if (include is not None and f.field not in include) or f.field in exclude:
            continue
        default = (defaults or {}).get(f.field, getattr(base, f.field))
        kwargs = dict(f.kwargs)
        if f.key is not None:
            default = (default or {}).get(f.key)  # unset: the setting's own default (fedmedclip.privacy)
        elif kwargs.get("action") == "append":
            default = []
        elif f.field == "split_ratio":
            default = ",".join(str(x) for x in default)
        elif isinstance(default, dict):
            default = None
        kwargs.setdefault("default", default)
        helptext = f.help.format(methods=_methods_help()) if "{methods}" in f.help else f.help
        target.add_argument(*f.flags, dest=f.dest, help=helptext, **kwargs)
        if f.field == "codec_up":
            from .codec import CODECS

            target.add_argument(
                "--codec",
                dest="codec_both",
                default=None,
                help=f"sets both --codec-up and --codec-down: {' | '.join(CODECS)}",
            )


def config_from_args(args: argparse.Namespace, **overrides) -> TrainConfig:
    """A validated TrainConfig from the parsed flags (fields a command did not add keep their defaults)."""
    values = {}
    for f in FLAGS:
        if not hasattr(args, f.dest):
            continue
        value = getattr(args, f.dest)
        if f.key is not None:
            if value is not None:
                values.setdefault(f.field, {})[f.key] = value
            continue
        if f.parse is not None and value is not None:
            value = f.parse(value)
        if value is None and f.field in ("synthetic", "method_options", "classes"):
            continue
        values[f.field] = value
    both = getattr(args, "codec_both", None)
    if both:
        from .codec import CODECS
        from .errors import ConfigError

        if both not in CODECS:  # named by the flag that was given, not the field it sets
            raise ConfigError(f"unknown codec {both!r} for --codec; choose one of {', '.join(CODECS)}")
        values["codec_up"] = values["codec_down"] = both
    values.update(overrides)
    return TrainConfig(**values).validate()

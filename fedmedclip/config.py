"""The training configuration, validated up front so a bad option fails before any work starts."""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from .aggregation import AGGREGATORS
from .backbone import PREPROCESSING_NAMES
from .codec import CODECS, CodecError, get_codec
from .data import DEFAULT_MIN_CLASS_IMAGES, DUPLICATE_POLICIES
from .encoders import DEVICES, ENGINES
from .errors import ConfigError
from .features import DEFAULT_PROMPT
from .flags import (
    COMPARE,
    MAX_THREADS,
    PIPELINE,
    SERVER,
    TRAIN,
    check_declared,
    declared,
    parse_classes,
    parse_json_object,
    parse_method_options,
    parse_split,
    setting,
)
from .methods import DEFAULT_METHOD
from .partition import SCHEMES, valid_split
from .paths import DEFAULT_CACHE_DIR
from .privacy.settings import PrivacySettings

SYNTHETIC = "synthetic"
# federated: the method as published; local: each site alone, nothing shared (lower reference);
# centralized: all sites' training data pooled in one holder (upper reference).
FEDERATIONS = ("federated", "local", "centralized")
# The most rounds a run may ask for: 10**30 was accepted and ran until stopped.
MAX_ROUNDS = 100_000
# How far out a Gaussian noise value may fall, in standard deviations, that a codec must still carry: beyond 8
# std a value is rarer than 1e-15, never seen in a module of millions of values over a run's rounds.
NOISE_TAIL = 8.0


def largest_value(codec) -> float:
    """The largest magnitude `codec` carries finitely: its quantiser's `largest` (fp16's 65504, else float32's)."""
    return float(codec.quantiser.largest)


def _method_options(method: str) -> dict:
    from .methods import METHODS

    return METHODS[method].options if method in METHODS else {}


def _synthetic_arguments() -> dict:
    from .synthetic import defaults

    return defaults()


@dataclass
class TrainConfig:
    """The run's configuration: each field declared once (fedmedclip/flags.py derives the flags of every
    command, the pipeline's `settings`, the schema snapshot and, through to_json/resume_key, config.json, the
    run manifest and the MLflow parameters). `extraction=True`: a party's feature extraction depends on it (the
    pipeline's parties key the features they publish on these alone); `resume`: how it enters the resume key."""

    data: str = setting(
        SYNTHETIC,
        group="data",
        extraction=True,
        help="image-folder root (<root>/<Training|Testing>/<class>/*), a CSV manifest (path,label[,site][,split]), "
        "'synthetic' (generated), or (but for `data publish` itself) s3://BUCKET published by `fedmedclip data "
        "publish` (default: %(default)s)",
    )
    method: str = setting(
        DEFAULT_METHOD, group="training", grid=True, help="the method: {methods} (default: %(default)s)"
    )
    federation: str = setting(
        "federated",
        group="federation",
        commands=(TRAIN, COMPARE),
        grid=True,
        resume="unless_default",
        choices=FEDERATIONS,
        help="federated (default), local (each site alone, nothing shared) or centralized (all training data "
        "pooled in one holder): the lower and upper references for any method",
    )
    partition: str = setting(
        "iid",
        group="data",
        choices=SCHEMES,
        extraction=True,
        partition=True,
        grid=True,
        help="iid, dirichlet (with --alpha) or natural (the manifest's site column) (default: %(default)s)",
    )
    alpha: float | None = setting(
        None,
        group="data",
        extraction=True,
        partition=True,
        grid=True,
        help="Dirichlet concentration of --partition dirichlet, refused with another partition (smaller = more "
        "label skew)",
    )
    sites: int | None = setting(
        3,
        group="data",
        minimum=1,
        extraction=True,
        partition=True,
        help="number of sites (default: %(default)s)",
    )
    rounds: int = setting(
        10,
        group="training",
        minimum=1,
        maximum=MAX_ROUNDS,
        help=f"federated rounds, at most {MAX_ROUNDS:,} (default: %(default)s)",
    )
    backbone: str = setting(
        "tiny",
        group="training",
        extraction=True,
        help="tiny | random-vit-b32 | random-vit-b16 | a local CLIP directory | a Hugging Face id already cached "
        "(never downloaded); in the pipeline also s3://BUCKET/PREFIX or models:/NAME/VERSION published by "
        "`fedmedclip backbone push` (default: %(default)s)",
    )
    # None: the method's reference recipe
    preprocessing: str | None = setting(
        None,
        group="training",
        choices=PREPROCESSING_NAMES,
        extraction=True,
        help="squash or clip (default: the method's reference recipe: fedmedclip squash, facmic clip)",
    )
    seed: int = setting(
        0,
        group="data",
        minimum=0,
        extraction=True,
        partition=True,
        grid=True,
        help="random seed of the partition and every draw (default: %(default)s)",
    )
    out: str = setting(  # empty: a pipeline's parties and a site have no run directory (a command refuses "")
        "runs/latest",
        group="output",
        resume="never",
        grid=True,
        empty=True,
        help="run directory (default: %(default)s)",
    )
    batch_size: int = setting(
        32,
        group="training",
        minimum=2,
        help="training batch size, at least 2 (BatchNorm) (default: %(default)s)",
    )
    codec_up: str = setting(
        "fp16-zlib",
        group="federation",
        help="how a site's update travels to the server (a federated run's: nothing travels with --federation "
        "local|centralized) (default: %(default)s)",
    )
    codec_down: str = setting(
        "fp16-zlib",
        group="federation",
        help="how the global module travels to the sites (a federated run's: nothing travels with --federation "
        "local|centralized) (default: %(default)s)",
    )
    split_ratio: tuple[float, float, float] = setting(
        (0.8, 0.1, 0.1),
        group="data",
        flags=("--split",),
        metavar="TRAIN,VAL,TEST",
        parse=parse_split,
        extraction=True,
        partition=True,
        help="per-site train,val,test shares (default: 0.8,0.1,0.1)",
    )
    # Held out for every method, so partitions compare fairly. With `transductive` FACMIC adapts toward the
    # global test images instead, as the reference code does, so nothing is held out: validate() sets this to
    # 0 and the sites train on 100 % of the pool, as in the paper.
    reference_fraction: float = setting(
        0.1,
        group="data",
        extraction=True,
        partition=True,
        help="share of the training pool held out, unlabelled, as FACMIC's adaptation target (default: "
        "%(default)s; nothing is held out with --transductive)",
    )
    transductive: bool = setting(
        False,
        group="data",
        extraction=True,
        help="FACMIC adapts toward the global test images, as the reference code does (only to match the paper)",
    )
    prompt_template: str = setting(
        DEFAULT_PROMPT,
        group="training",
        extraction=True,
        help="class prompt, '{}' is the class name (default: %(default)r)",
    )
    cache_dir: str = setting(
        DEFAULT_CACHE_DIR,
        group="data",
        extraction=True,
        resume="never",
        help="feature stores, generated data and the built-in backbones' descriptions (default: %(default)s)",
    )
    skip_bad_images: bool = setting(
        False,
        group="data",
        commands=(TRAIN, SERVER, PIPELINE, COMPARE),
        extraction=True,
        help="skip unreadable images (counted, ids recorded) instead of failing on the first",
    )
    # None: inferred from the data, and then a class with fewer than `min_class_images` training images, or in
    # only one of the training pool and the global test set, is refused with every class's counts (a label typo
    # would otherwise become a class). An explicit list skips that check; labels outside it are refused.
    classes: list[str] | None = setting(
        None,
        group="data",
        parse=parse_classes,
        extraction=True,
        resume="unless_default",
        help="the class list, comma-separated (default: inferred from the data, which then refuses a class with "
        "fewer than --min-class-images training images or present in only one split)",
    )
    min_class_images: int = setting(
        DEFAULT_MIN_CLASS_IMAGES,
        group="data",
        minimum=1,
        extraction=True,
        resume="never",
        help="with an inferred class list, the fewest training images a class may have (default: %(default)s)",
    )
    # Results depend on it in the last bits: parties that must agree exactly (a simulator and a mailbox run) use
    # the same value. Not a resume key.
    threads: int = setting(
        1,
        group="training",
        minimum=1,
        maximum=MAX_THREADS,
        resume="never",
        help=f"torch threads for training, at most {MAX_THREADS}; extraction uses every core (default: "
        "%(default)s)",
    )
    # Every engine gives float32 features within 1e-4 relative of PyTorch's (fedmedclip.encoders checks it on a
    # probe batch), so feature stores are shared between engines: not an extraction dependency.
    encoder_engine: str = setting(
        "auto",
        group="training",
        choices=ENGINES,
        resume="never",
        help="what runs the frozen image encoder during feature extraction: onnxruntime (exported once to ONNX, "
        "cached under --cache-dir, about 2x faster on CPU), torch, or auto (onnxruntime for a CLIP-sized "
        "backbone when installed); all within 1e-4 of PyTorch (default: %(default)s)",
    )
    # Features on CUDA are checked against the CPU's to the same 1e-4 (fedmedclip.encoders): not an extraction
    # dependency either, and not checked here, where a CPU machine may be submitting a run for GPU pods.
    encoder_device: str = setting(
        "auto",
        group="training",
        choices=DEVICES,
        resume="never",
        help="where feature extraction runs the image encoder: cuda (the torch engine on the GPU, float32), cpu, "
        "or auto (cuda when torch sees a GPU, as in the pipeline's extraction task; default: %(default)s)",
    )
    allow_outside_root: bool = setting(
        False,
        group="data",
        extraction=True,
        resume="never",
        help="let a CSV manifest list images outside the manifest's folder (refused by default)",
    )
    method_options: dict = setting(
        group="training",
        flags=("--method-opt", "--method-option"),
        parse=parse_method_options,
        metavar="KEY=VALUE",
        repeatable=True,
        grid=True,  # compare's --method-opt, per method
        entries=lambda values: _method_options(values.get("method", DEFAULT_METHOD)),
        default_factory=dict,
        help="a method option KEY=VALUE, e.g. lr_fam=5e-4 or local_steps=50 (repeatable; unknown options are "
        "refused with the list of known ones)",
    )
    # arguments of fedmedclip.synthetic.generate (its keywords, each an integer within the bounds it declares)
    synthetic: dict = setting(
        group="data",
        parse=parse_json_object,
        extraction=True,
        entries=lambda values: _synthetic_arguments(),
        default_factory=dict,
        help="JSON arguments of the synthetic data generator, e.g. '{\"per_class_per_site\": 40}'",
    )
    # Only the entries that differ from the defaults, empty for a run without DP.
    privacy: dict = setting(
        group="privacy",
        nested=PrivacySettings,
        prefix="dp-",
        resume="unless_default",
        default_factory=dict,
        help="differential privacy settings (the --dp-* flags; fedmedclip.privacy.PrivacySettings)",
    )
    aggregator: str = setting(
        "mean",
        group="federation",
        choices=AGGREGATORS,
        resume="unless_default",
        help="how the server combines the accepted updates: mean (the method's own rule), or for small or "
        "untrusted federations median, trimmed-mean or krum (fedmedclip/federation/robust.py), which also "
        "select the round by the sites' median validation accuracy, not their mean (default: %(default)s)",
    )
    duplicates: str = setting(
        "drop",
        group="data",
        choices=DUPLICATE_POLICIES,
        extraction=True,
        resume="unless_default",
        help="byte-identical images: drop the training pool's copies (of a test image; of each other, all but "
        "the first by id), keep them all (the papers' setting) or refuse the data; copies with different labels "
        "are dropped everywhere (refuse: stop) (default: %(default)s)",
    )
    secure_aggregation: bool = setting(
        False,
        group="federation",
        resume="unless_default",
        help="secure aggregation (Bonawitz et al. 2017): the server learns only the weighted sum of the sites' "
        "updates; each site bounds and masks its own, with its registered identity key "
        "(docs/secure-aggregation.md)",
    )
    secagg_threshold: int | None = setting(
        None,
        group="federation",
        metavar="T",
        # a count of sites, above half of at least two: 2 or more, checked with the sites (_validate_secure_aggregation)
        minimum=1,
        resume="unless_default",
        help="secure aggregation's threshold t: every step of a round needs t sites, and fewer than t colluding "
        "sites learn nothing of another's update (above half the sites; default: floor(sites/2) + 1)",
    )

    def validate(self) -> TrainConfig:
        from .methods import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        check_declared(self)  # types, choices and minimums, as each field declares them
        if self.federation != "federated" and METHODS[self.method].needs_global_model:
            # Here, not when the reference run starts: that was after feature extraction, and in `compare` after
            # the cells before it had trained.
            raise ConfigError(
                f"{self.method} regularises toward a global model, which --federation {self.federation} does not "
                "have; use fedavg for the local/centralized reference of the fine-tuning baselines"
            )
        if self.partition == "dirichlet" and not (self.alpha and self.alpha > 0):
            raise ConfigError("--partition dirichlet needs --alpha > 0, e.g. --alpha 0.5")
        if self.alpha is not None and self.partition != "dirichlet":
            # It would be recorded in config.json and the MLflow parameters of a run it did not skew.
            raise ConfigError(
                f"--alpha {self.alpha:g} is the concentration of --partition dirichlet; --partition "
                f"{self.partition} ignores it: drop --alpha, or use --partition dirichlet"
            )
        self._validate_split()
        self._validate_prompt_template()
        self._validate_synthetic()
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
        # Unknown method options and bad values fail here, before any data is read or any pod starts.
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"method_options must be an object, got {self.method_options!r}")
        METHODS[self.method].check_options(self.method_options)
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
        if unsent := self._unsent():
            raise ConfigError(unsent[0][2])
        self._validate_privacy(METHODS[self.method])
        self._validate_secure_aggregation(METHODS[self.method])
        self._validate_aggregator()
        if self.transductive:
            self.reference_fraction = 0.0  # the target is the global test set: hold nothing out
        self.split_ratio = tuple(float(x) for x in self.split_ratio)
        return self

    def sends_updates(self) -> bool:
        """Whether the sites send the server updates to combine: not when each trains alone (`local`), all data
        is pooled in one holder (`centralized`), or the method sends no parameters (zeroshot)."""
        from .methods import METHODS

        return self.federation == "federated" and METHODS[self.method].sends_parameters

    def drop_unsent(self) -> list[str]:
        """Reset to their defaults the options that act only on what the sites and the server send each other,
        where this run sends none of it (validate() refuses them there), and return them as the flags that set
        them. `compare` applies its grid's options to the cells they act on this way, and a stored configuration
        of a reference run from before validate() refused its codecs matches the same run without them."""
        dropped = []
        for flags, defaults, _ in self._unsent():
            dropped += flags
            for name, value in defaults.items():
                setattr(self, name, value)
        return dropped

    def _unsent(self) -> list[tuple[list[str], dict, str]]:
        """The options set that act only on what the sites and the server send each other, where this run sends
        none of it: each as the flags that set it, its fields' default values, and why it means nothing here
        (validate()'s refusal)."""
        from .methods import METHODS

        if self.method not in METHODS:
            return []  # validate() names it
        unsent, sender = [], self._sender()

        def option(flags: list[str], defaults: dict, why: str) -> None:
            unsent.append((flags, defaults, why))

        if not self.sends_updates():
            if self.aggregator != TrainConfig.aggregator:
                why = f"combines the updates the sites send to the server; {sender} sends none: drop --aggregator"
                option(
                    [f"--aggregator {self.aggregator}"],
                    {"aggregator": TrainConfig.aggregator},
                    f"--aggregator {self.aggregator} {why}",
                )
            if self.secure_aggregation:
                threshold = (
                    [] if self.secagg_threshold is None else [f"--secagg-threshold {self.secagg_threshold}"]
                )
                why = (
                    f"{self.method} sends no parameters: there is nothing to aggregate securely"
                    if not METHODS[self.method].sends_parameters
                    else f"secure aggregation hides the sites' updates from the server; {sender} sends none"
                )
                option(
                    ["--secure-aggregation", *threshold],
                    {"secure_aggregation": False, "secagg_threshold": None},
                    why,
                )
            if isinstance(self.privacy, dict) and self.privacy.get("client_noise") is not None:
                client = [k for k in self.privacy if k.startswith("client_")]
                option(
                    [f"--dp-{k.replace('_', '-')} {self.privacy[k]}" for k in client],
                    {"privacy": {k: v for k, v in self.privacy.items() if k not in client}},
                    f"client-level DP (--dp-client-noise) protects what sites send to the server; {sender} sends nothing",
                )
        if self.federation != "federated":
            # Against the default, not whether the flag was given: a stored or pipeline configuration names both
            # codecs, and the defaults must keep working for the references.
            for flag, name, what in (
                ("--codec-up", "codec_up", "the updates the sites send to the server"),
                ("--codec-down", "codec_down", "the global module sent to the sites"),
            ):
                value, default = getattr(self, name), getattr(TrainConfig, name)
                if value != default:
                    why = f"encodes {what}; {sender} sends none: drop {flag} (--codec sets it too)"
                    option([f"{flag} {value}"], {name: default}, f"{flag} {value} {why}")
        return unsent

    def _sender(self) -> str:
        """What sends no updates, as the user chose it: the federation, else the method."""
        return f"--federation {self.federation}" if self.federation != "federated" else self.method

    def _validate_aggregator(self) -> None:
        """A robust rule needs three or more updates to be anything but the mean: with fewer sites it silently
        was the mean. Where the partition's sites are known (not natural: the data names them, checked once it
        is read)."""
        from .federation.robust import check_robust_sites

        if self.sites is not None and self.partition != "natural" and self.sends_updates():
            check_robust_sites(self.aggregator, self.sites)

    def _validate_split(self) -> None:
        # Here, not only where the partition is drawn: a NaN share would otherwise reach config.json first
        # (a traceback from json), and the pipeline would start its pods before refusing.
        split = self.split_ratio
        try:
            shares = tuple(float(x) for x in split)
        except (TypeError, ValueError):
            shares = ()
        if not valid_split(shares):
            text = ",".join(str(x) for x in split) if isinstance(split, (tuple, list)) else repr(split)
            raise ConfigError(
                f"--split {text} must be three train,val,test shares, each a finite number of at least 0 and "
                "train above 0, summing to 1, like 0.8,0.1,0.1"
            )
        if not 0 <= self.reference_fraction < 0.5:
            raise ConfigError(f"--reference-fraction must be in [0, 0.5), got {self.reference_fraction!r}")

    def _validate_prompt_template(self) -> None:
        # Here, not where the prompts are formatted: '{} {x}' was a KeyError there, '{}{}' an IndexError.
        template = self.prompt_template
        if not isinstance(template, str):
            raise ConfigError(f"--prompt-template must be a string, got {template!r}")
        try:
            fields = [f[1:] for f in string.Formatter().parse(template) if f[1] is not None]
        except ValueError as exc:
            fields = [str(exc)]
        if fields != [("", "", None)]:
            raise ConfigError(
                f"--prompt-template {template!r} must hold exactly one '{{}}' (the class name) and no other "
                "replacement field, e.g. 'a brain MRI showing {}' (a literal brace is written '{{' or '}}')"
            )

    def synthetic_arguments(self) -> dict:
        """The arguments of fedmedclip.synthetic.generate for `--data synthetic`: --synthetic's, with one site per
        --sites unless it names its own."""
        return {"sites": self.sites or 3, **self.synthetic}

    def _validate_synthetic(self) -> None:
        # Here, not when the data is generated: that was after config.json was written and the pipeline had
        # started, and an unknown option was a TypeError from generate().
        from .synthetic import check_arguments

        if not isinstance(self.synthetic, dict):
            raise ConfigError(f"--synthetic must be a JSON object, got {self.synthetic!r}")
        check_arguments(self.synthetic, "--synthetic")
        if self.data == SYNTHETIC and "sites" not in self.synthetic:  # the generator's sites are --sites
            check_arguments({"sites": self.synthetic_arguments()["sites"]}, "--sites with --data synthetic")
            # each within its bounds; together within the generator's total (images, pixels)
            check_arguments(self.synthetic_arguments(), "--synthetic with --sites")

    def _validate_privacy(self, method_cls) -> None:
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
        self._validate_client_noise(settings)
        self.privacy = settings.to_config()

    def _validate_client_noise(self, settings: PrivacySettings) -> None:
        """Client-level DP's noise travels in the modules: at the sites in their updates (--codec-up), and either
        way in the new global module (--codec-down). Noise a codec cannot carry failed every round (`overflows
        fp16`) and the run still ended as if it had trained; refused here, with the accountant's cost of the
        rounds (fedmedclip.privacy.accounting)."""
        if not settings.client_level or not self.sends_updates():
            return
        if self.aggregator != "mean":
            # Client-level DP aggregates with its own equal-weight mean of clipped updates (what its accountant
            # composes): a robust rule was recorded in config.json and MLflow, and selected rounds, yet never ran.
            raise ConfigError(
                f"--aggregator {self.aggregator} with --dp-client-noise: client-level DP aggregates with its own "
                "mean of clipped updates (what its guarantee accounts for), never a robust rule; use --aggregator "
                "mean"
            )
        from .privacy.accounting import check_accountable

        check_accountable(settings.accountant, 1.0, settings.client_noise, self.rounds, "--dp-client-noise")
        directions = [("--codec-down", self.codec_down)]
        if settings.client_noise_at == "sites":
            directions.insert(0, ("--codec-up", self.codec_up))
        std = settings.client_noise * settings.client_clip  # the noise's std on one site's share, at most
        for flag, name in directions:
            largest = largest_value(get_codec(name)) / NOISE_TAIL
            if std > largest:
                raise ConfigError(
                    f"--dp-client-noise {settings.client_noise:g} x --dp-client-clip {settings.client_clip:g}: "
                    f"noise of std {std:.3g} cannot travel in {flag} {name} (the most it carries is noise of std "
                    f"{largest:.3g}: {NOISE_TAIL:g} std within its largest finite value): "
                    "lower the noise or the clip, or use a codec of a wider range (fp32-zlib)"
                )

    def _validate_secure_aggregation(self, method_cls) -> None:
        t = self.secagg_threshold
        if not self.secure_aggregation:
            if t is not None:
                raise ConfigError("--secagg-threshold needs --secure-aggregation")
            return
        if self.aggregator != "mean":
            raise ConfigError(
                f"--aggregator {self.aggregator} needs each site's update, which secure aggregation hides from "
                "the server: use the method's mean (each site bounds its own update instead)"
            )
        if t is not None and t < 2 and (self.sites is None or self.partition == "natural"):
            # the data names the sites (checked once it is read): above half of at least two is 2 or more
            raise ConfigError(
                f"--secagg-threshold {t} must be above half the sites, so at least 2 (secure aggregation needs "
                "two or more sites)"
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
        """What must not change between a run and its resumption (the fields declared resume="never", such as
        `out` and cache paths, may); a field declared resume="unless_default" is left out at its default, so
        keys from before it existed still match. The run manifest's `settings` is this."""
        d = self.to_json()
        for f in declared(type(self), nested=False):
            if f.meta["resume"] == "never" or (
                f.meta["resume"] == "unless_default" and d[f.name] == json.loads(json.dumps(f.default))
            ):
                d.pop(f.name)
        return json.loads(json.dumps(d))

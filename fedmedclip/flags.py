"""One declaration per configuration field, and everything derived from it.

A field is declared once, on its dataclass (`TrainConfig`, `PrivacySettings`, `ServerOptions`, `SiteOptions`),
with `setting(default, help=..., group=...)`: its type is the annotation, and the metadata carries its help, its
group (which commands take it), its flag spelling, choices and parser, whether the partition's draw (`partition`)
and a party's feature extraction (`extraction`) depend on it, and how it enters the run's resume key (`resume`);
`grid`: compare's grid sets it per cell (no compare flag of its own); `manifest`: the run's manifest records it
(a server option). From that one declaration come:
- the flags of `train`, `server run`, `site run` (`SiteOptions`), `pipeline run|submit`, `demo`, `compare` and
  `data publish` (`add_config_arguments`, `config_from_args`, `options_from_args`), those of `serve` (its
  settings in serving/options.py), of `promote` (mlops/promotion.py, also the pipeline's) and
  `pipeline compile` (pipelines/pipeline.py, CompileOptions: also the flags a pipeline run compiles with);
- the pipeline's structured `settings` parameter (`to_parameters`, `from_parameters`: KFP gives integers back
  as floats and refuses `None`, so unset fields are left out and the receiving side converts by the type);
- the schema (`schema()`, snapshot in tests/config_schema.json), and through `TrainConfig.to_json()` and
  `resume_key()` the run manifest, config.json and the MLflow parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import types
import typing

from .errors import ConfigError, shown

TRAIN, SERVER, SITE, PIPELINE = "train", "server run", "site run", "pipeline"
COMPARE, PUBLISH = "compare", "data publish"
COMMANDS = (TRAIN, SERVER, SITE, PIPELINE, COMPARE, PUBLISH)
SERVE = "serve"  # `fedmedclip serve`: its options are declared in serving/options.py
PROMOTE = "promote"  # `fedmedclip promote`: its options are declared in mlops/promotion.py
COMPILE = "pipeline compile"  # its options are declared in pipelines/pipeline.py (CompileOptions)
# group -> (argparse title, the commands that take its fields unless a field names its own)
GROUPS = {
    "data": ("data and partition", (TRAIN, SERVER, PIPELINE, COMPARE, PUBLISH)),
    "training": ("training", (TRAIN, SERVER, PIPELINE, COMPARE)),
    "federation": ("federation", (TRAIN, SERVER, PIPELINE, COMPARE)),
    "privacy": ("differential privacy (docs/privacy.md)", (TRAIN, SERVER, PIPELINE, COMPARE)),
    "server": ("the server: quorum, timeouts, update checks", (SERVER, PIPELINE)),
    "output": ("output", (TRAIN, SERVER, COMPARE)),
    "site": ("this site", (SITE,)),
    # the pipeline's own run-time parameters besides `settings` (components/run_parameters.py, RunParameters)
    "pipeline": ("the federation", (PIPELINE,)),
    "registry": ("export, tracking and registry", (PIPELINE,)),
    "promotion": ("promotion: when the alias moves to the new version", (PIPELINE, PROMOTE)),
    # the pipeline's compile options (pipelines/pipeline.py, CompileOptions): a run compiles the graph first
    "compile": (
        "compile options (fixed in the graph; sites and rounds are run-time parameters)",
        (COMPILE, PIPELINE),
    ),
    "serving": ("the server: addresses, request bodies, shutdown, model control", (SERVE,)),
    "serving model": ("the models: device, ONNX Runtime, image decoding", (SERVE,)),
    "serving limits": ("the models: per-request limits", (SERVE,)),
    "serving batching": ("the models: dynamic batching", (SERVE,)),
    "serving monitoring": ("out-of-distribution and drift monitoring", (SERVE,)),
}
# How a field enters TrainConfig.resume_key(); for a server option the manifest records, "never" makes it
# operational: a restart of the server may change it (FederationServer.start).
RESUME = ("always", "unless_default", "never")
# The most threads a setting may ask for (torch's, ONNX Runtime's, image decoding's): far above any machine's cores,
# and not this machine's core count (a run and its config.json move between machines). A million threads
# crashed torch (after config.json was written), and 5000 hung.
MAX_THREADS = 1024
# The most digits an integer read from a flag's JSON may have: 400 is already beyond any float (1e308), which
# every number a setting takes must fit, and Python's int() refuses over 4300 digits with a ValueError.
MAX_JSON_DIGITS = 400


def is_finite_number(value) -> bool:
    """Whether `value` is a number (not a bool) that a float holds finitely: an int beyond a float's range
    (10**400, which `math.isfinite` refuses with an OverflowError) is not. Every check of a finite number uses it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def setting(
    default=dataclasses.MISSING,
    *,
    help: str,
    group: str,
    flags: tuple[str, ...] = (),
    commands: tuple[str, ...] | None = None,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    parse=None,
    metavar: str | None = None,
    repeatable: bool = False,
    empty: bool = False,
    extraction: bool = False,
    partition: bool = False,
    resume: str = "always",
    grid: bool = False,
    manifest: bool = False,
    nested: type | None = None,
    prefix: str = "",
    entries=None,
    default_factory=dataclasses.MISSING,
):
    """A dataclass field with its declaration. `parse`: str -> value for a flag's text (ConfigError on bad
    input); `nested`: a dataclass whose fields become flags `--<prefix><name>` (a dict field of their
    non-default entries); `minimum`, `maximum`: the inclusive range of a number (check_declared refuses a value
    outside it, naming the flag; the schema shows both, and a field's help says its maximum); `repeatable`: the
    flag may be given again, `parse` takes the list of its texts; `empty`: a text that may be "" (its help says
    what "" means), where check_declared refuses "" of any other text: a folder "" was the working folder;
    a bool field whose default is True is switched off by its flag (spell it so: `--no-gpu`); `entries`: for
    another dict field, values -> {key: default} of its entries (their types convert a pipeline's floats back
    to integers); `flags`: the spelling when not `--field-name`;
    `grid`: one of the fields compare's grid (--methods, --partitions, --seeds, --method-opt, --out) sets per
    cell, so compare takes no flag for it; `manifest`: the run's manifest records it (`make_manifest`)."""
    if group not in GROUPS or resume not in RESUME:
        raise ValueError(f"unknown group {group!r} or resume {resume!r}")
    if default is True and not (flags and all(f.startswith("--no-") for f in flags)):
        raise ValueError("a setting that defaults to True is switched off by its flag: spell it --no-...")
    if default == "" and not empty:
        raise ValueError('a text setting that defaults to "" declares empty=True')
    commands = tuple(commands) if commands is not None else GROUPS[group][1]
    meta = dict(
        help=help,
        group=group,
        flags=tuple(flags),
        commands=tuple(c for c in commands if not (grid and c == COMPARE)),
        choices=tuple(choices) if choices is not None else None,
        minimum=minimum,
        maximum=maximum,
        parse=parse,
        metavar=metavar,
        repeatable=repeatable,
        empty=empty,
        extraction=extraction,
        partition=partition,
        resume=resume,
        grid=grid,
        manifest=manifest,
        nested=nested,
        prefix=prefix,
        entries=entries,
    )
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"setting": meta})


@dataclasses.dataclass(frozen=True)
class Declared:
    """One declared field as the derivations see it."""

    name: str
    type: object
    default: object
    meta: dict
    owner: str  # the field of the outer dataclass for a nested one (privacy), else ""
    prefix: str = ""  # the outer field's flag prefix (`dp-`)
    optional: bool = False  # its annotation allows None (`int | None`): None is unset, not a bad value

    @property
    def dest(self) -> str:
        return f"{self.owner}__{self.name}" if self.owner else self.name

    @property
    def flags(self) -> tuple[str, ...]:
        if self.meta["flags"]:
            return self.meta["flags"]
        return (f"--{self.prefix}{self.name.replace('_', '-')}",)

    def takes(self, command: str) -> bool:
        return command in self.meta["commands"]


def _allows_none(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation
    )


def _base_type(annotation):
    """int for `int | None`, the origin for `list[str]`, ..."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _base_type(next(a for a in typing.get_args(annotation) if a is not type(None)))
    return typing.get_origin(annotation) or annotation


@functools.cache
def _type_hints(cls) -> dict:
    """`cls`'s resolved annotations, once: resolving them is most of `declared`'s time, which every parser
    build and every configuration check calls."""
    return typing.get_type_hints(cls)


def declared(cls, nested: bool = True) -> list[Declared]:
    """The declared fields of dataclass `cls` in declaration order (a nested declaration's fields follow
    their outer field, named by it)."""
    hints = _type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("setting")
        if meta is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        hint = hints[f.name]
        out.append(Declared(f.name, _base_type(hint), default, meta, "", optional=_allows_none(hint)))
        if nested and meta["nested"] is not None:
            for inner in declared(meta["nested"]):
                inner_meta = {**inner.meta, "commands": meta["commands"], "group": meta["group"]}
                out.append(dataclasses.replace(inner, meta=inner_meta, owner=f.name, prefix=meta["prefix"]))
    return out


def check_declared(obj) -> None:
    """What each field of `obj` declares of itself: a value (None only where its annotation allows None: unset),
    an integer, a finite number, a text not empty unless it may be, one of its choices, within its minimum and
    maximum; ConfigError names the flag."""
    for d in declared(type(obj), nested=False):
        value, flag = getattr(obj, d.name), d.flags[0]
        if value is None:
            if d.optional:
                continue
            raise ConfigError(
                f"{flag} has no value (None): give one, or leave it out for its default {shown(d.default)}"
            )
        if d.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{flag} must be an integer, got {shown(value)}")
        if d.type is float and not is_finite_number(value):
            raise ConfigError(f"{flag} must be a finite number, got {shown(value)}")
        if value == "" and d.type is str and not d.meta["empty"]:
            raise ConfigError(f"{flag} must not be empty: give a value, or leave it out for its default")
        if d.meta["choices"] is not None and value not in d.meta["choices"]:
            name = d.name.replace("_", " ")
            raise ConfigError(f"unknown {name} {shown(value)}; choose one of {', '.join(d.meta['choices'])}")
        if d.meta["minimum"] is not None and value < d.meta["minimum"]:
            raise ConfigError(f"{flag} must be at least {d.meta['minimum']}, got {shown(value)}")
        if d.meta["maximum"] is not None and value > d.meta["maximum"]:
            raise ConfigError(f"{flag} must be at most {d.meta['maximum']}, got {shown(value)}")


def add_config_arguments(
    parser: argparse.ArgumentParser,
    command: str = TRAIN,
    cls=None,
    exclude: tuple[str, ...] = (),
    defaults: dict | None = None,
) -> None:
    """Add the flags of `command` for the fields of `cls` (default TrainConfig), grouped by their group, with
    the declared defaults unless `defaults` overrides them; `--codec` (both directions) comes with the codecs."""
    if cls is None:
        from .config import TrainConfig as cls
    groups = {}
    for d in declared(cls):
        if not d.takes(command) or d.name in exclude or d.owner in exclude:
            continue
        if d.meta["nested"] is not None:
            continue  # its entries are the flags
        if d.meta["group"] not in groups:
            groups[d.meta["group"]] = parser.add_argument_group(GROUPS[d.meta["group"]][0])
        target = groups[d.meta["group"]]
        default = (defaults or {}).get(d.name, d.default)
        kwargs = {"dest": d.dest, "help": d.meta["help"], "metavar": d.meta["metavar"]}
        if d.owner:
            default = None  # unset: the setting's own default applies (and stays out of the config)
        if d.type is bool:
            # By the declaration, not a command's default: the flag's meaning does not change per command.
            kwargs["action"] = "store_false" if d.default is True else "store_true"
        elif d.meta["repeatable"]:
            kwargs.update(action="append", default=[])
        elif d.meta["parse"] is None and d.type in (int, float):
            kwargs["type"] = d.type
        if d.meta["choices"] is not None and d.meta["parse"] is None:
            kwargs["choices"] = d.meta["choices"]
        if isinstance(default, tuple):  # as the flag spells it: 0.8,0.1,0.1
            default = ",".join(str(x) for x in default)
        kwargs.setdefault("default", None if isinstance(default, dict) else default)
        if "{methods}" in kwargs["help"]:
            from .methods import METHODS

            kwargs["help"] = kwargs["help"].format(methods=" | ".join(METHODS))
        if d.name in CODEC_FIELDS:
            kwargs["action"] = _StoreGiven  # so that --codec can refuse a direction it contradicts
        target.add_argument(*d.flags, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})
        if d.name == "codec_up":
            from .codec import CODECS

            target.add_argument(
                "--codec",
                dest="codec_both",
                default=None,
                metavar="CODEC",
                help=f"sets both --codec-up and --codec-down: {' | '.join(CODECS)}",
            )


CODEC_FIELDS = ("codec_up", "codec_down")  # --codec sets both


class _StoreGiven(argparse.Action):
    """Store the value and record that the flag was given (a value equal to the default is given too)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", option_string)


def values_from_args(args: argparse.Namespace, cls) -> dict:
    """The declared fields of `cls` that the parsed flags set (fields a command did not add are left out)."""
    values = {}
    for d in declared(cls):
        if not hasattr(args, d.dest):
            continue
        value = getattr(args, d.dest)
        if d.owner:
            if value is not None:
                values.setdefault(d.owner, {})[d.name] = value
            continue
        if d.meta["parse"] is not None and value is not None:
            value = d.meta["parse"](value)
        if value is None and isinstance(d.default, dict):
            continue
        values[d.name] = value
    return values


def config_from_args(args: argparse.Namespace, cls=None, **overrides):
    """A validated TrainConfig (or `cls`) from the parsed flags."""
    if cls is None:
        from .config import TrainConfig as cls
    values = values_from_args(args, cls)
    # `out` is declared empty=True, as a pipeline's parties and a site have no run directory, but a command's
    # --out "" was the working folder.
    if values.get("out") == "":
        raise ConfigError("--out must not be empty")
    both = getattr(args, "codec_both", None)
    if both is not None:
        from .codec import CODECS

        if both not in CODECS:  # named by the flag that was given, not the field it sets
            raise ConfigError(f"unknown codec {both!r} for --codec; choose one of {', '.join(CODECS)}")
        for name in CODEC_FIELDS:
            flag = getattr(args, f"{name}_given", None)
            if flag and values.get(name) != both:  # one of the two would be silently dropped
                raise ConfigError(
                    f"--codec {both} sets both directions and {flag} {values[name]} contradicts it: give "
                    "--codec-up and --codec-down alone"
                )
        values["codec_up"] = values["codec_down"] = both
    values.update(overrides)
    return cls(**values).validate()


def options_from_args(args: argparse.Namespace, cls=None):
    """The declared options `cls` (default: the server's `ServerOptions`; a site's `SiteOptions`, the pipeline's
    `RunParameters`, `promote`'s `PromotionPolicy`) from the parsed flags, each checked as declared."""
    if cls is None:
        from .federation.server import ServerOptions as cls
    options = cls(**values_from_args(args, cls))
    check_declared(options)
    return options


# ------------------------------------------------------------------------- pipeline parameters
def to_parameters(obj, command: str = PIPELINE) -> dict:
    """The declared fields of `obj` that `command` takes, as JSON values without None (what KFP accepts in a
    structured parameter): an unset field is left out, and the receiving side gives it its default."""
    values = {}
    for d in declared(type(obj), nested=False):
        value = getattr(obj, d.name)
        if d.takes(command) and value is not None:
            values[d.name] = json.loads(json.dumps(value))
    return values


def _convert(d: Declared, value, where: str):
    if value is None:
        if d.optional:
            return None
        # KFP never sends null: this is a settings object written by hand, and null is no value of the field
        raise ConfigError(
            f"{where} {d.name} is null: give a value, or leave {d.name} out for its default {shown(d.default)}"
        )
    if d.type is int and isinstance(value, float) and value.is_integer():
        return int(value)  # KFP passes every number of a structured parameter as a float
    if d.type is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} {d.name} must be true or false, got {value!r}")
    if d.type in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{where} {d.name} must be a number, got {value!r}")
    if d.type is str and not isinstance(value, str):
        raise ConfigError(f"{where} {d.name} must be a string, got {value!r}")
    if d.type is tuple:
        return tuple(value) if isinstance(value, (list, tuple)) else d.meta["parse"](value)
    if d.type is list:
        # a list of names (classes): the flag's comma-separated text, or a JSON list of strings
        if isinstance(value, str) and d.meta["parse"] is not None:
            return d.meta["parse"](value)
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
            raise ConfigError(
                f"{where} {d.name} must be a list of strings or one comma-separated string, got {shown(value)}"
            )
        return list(value)
    if d.type is dict and not isinstance(value, dict):
        raise ConfigError(f"{where} {d.name} must be an object, got {value!r}")
    return value


def _integral(value, reference) -> object:
    """`value` as an int where the entry it sets is an int (KFP's floats), else as it is."""
    is_int = isinstance(reference, int) and not isinstance(reference, bool)
    return int(value) if is_int and isinstance(value, float) and value.is_integer() else value


def from_parameters(values: dict, *classes, command: str = PIPELINE, where: str = "settings") -> list:
    """Split `values` over the dataclasses `classes` by their fields declared for `command` and build one
    instance of each (not validated); an unknown key is a ConfigError naming every known one."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be an object of settings, got {values!r}")
    built, known = [], set()
    for cls in classes:
        fields = {d.name: d for d in declared(cls, nested=False) if d.takes(command)}
        known |= set(fields)
        mine = {k: _convert(fields[k], v, where) for k, v in values.items() if k in fields}
        for k, value in mine.items():
            meta = fields[k].meta
            if isinstance(value, dict) and (meta["nested"] or meta["entries"]):
                ref = dataclasses.asdict(meta["nested"]()) if meta["nested"] else meta["entries"](mine)
                mine[k] = {e: _integral(v, ref.get(e)) for e, v in value.items()}
        built.append(cls(**mine))
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return built


# ------------------------------------------------------------------------- schema
def schema(*classes) -> dict:
    """Every declared field of `classes` (default: TrainConfig, ServerOptions and SiteOptions) with everything
    declared about it: the snapshot tests/config_schema.json is this, so a field cannot change in one place only."""
    if not classes:
        from .config import TrainConfig
        from .federation.runner import SiteOptions
        from .federation.server import ServerOptions

        classes = (TrainConfig, ServerOptions, SiteOptions)
    out = {}
    for cls in classes:
        entries = {}
        for d in declared(cls):
            meta = {k: v for k, v in d.meta.items() if k not in ("parse", "nested", "entries")}
            parse = d.meta["parse"]
            entries[d.dest] = {
                "type": getattr(d.type, "__name__", str(d.type)),
                "default": json.loads(json.dumps(d.default, default=dataclasses.asdict)),
                "flags": list(d.flags),
                **{k: list(v) if isinstance(v, tuple) else v for k, v in meta.items() if k != "flags"},
                "parse": parse.__name__ if parse is not None else None,
            }
        out[cls.__name__] = entries
    return out


# ------------------------------------------------------------------------- flag parsers
def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise ConfigError(f"--split {text!r} must be three numbers like 0.8,0.1,0.1")
    return parts


def _json_integer(token: str, refuse):
    """A JSON integer `token` as an int, `refuse(token)` beyond a float's range: 10**400 was an OverflowError
    where a finite number was checked, and over 4300 digits Python's int() refuses with a ValueError."""
    digits = len(token.lstrip("-"))
    if digits > MAX_JSON_DIGITS:
        return refuse(f"an integer of {digits} digits")
    value = int(token)
    return value if is_finite_number(value) else refuse(f"an integer of {digits} digits")


def _finite_json(text: str, flag: str):
    """`text` as JSON, refusing what is not JSON: NaN, Infinity and a number beyond a float's range (1e400, or
    an integer of 400 digits), which Python's json reads but no JSON file, config.json or pipeline parameter can
    hold; and an object that names a key twice (Python's json keeps the last one silently)."""

    def refuse(token: str):
        raise ConfigError(f"{flag} {shown(text)}: {token} is not a JSON number; give a finite number")

    def number(token: str) -> float:
        value = float(token)
        return value if math.isfinite(value) else refuse(token)

    def unique(pairs: list) -> dict:
        out = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(f"{flag} {shown(text)}: key {key!r} is given twice; give it once")
            out[key] = value
        return out

    return json.loads(
        text,
        parse_constant=refuse,
        parse_float=number,
        parse_int=lambda token: _json_integer(token, refuse),
        object_pairs_hook=unique,
    )


def parse_json_object(text: str) -> dict:
    try:
        value = _finite_json(text, "--synthetic")
    except ValueError as exc:
        raise ConfigError(f"--synthetic {text!r} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(
            f"--synthetic {text!r} must be a JSON object, e.g. '{{\"per_class_per_site\": 40}}'"
        )
    return value


def parse_classes(text: str) -> list[str]:
    names = [c.strip() for c in str(text).split(",") if c.strip()]
    if not names:
        raise ConfigError("--classes needs a comma-separated list of class names")
    return names


def parse_pairs(items: list[str], flag: str) -> dict[str, str]:
    """KEY=VALUE items of a repeatable flag, keys and values stripped."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {shown(item)} must look like KEY=VALUE")
        key = key.strip()
        if key in out:  # the last one silently won
            raise ConfigError(
                f"{flag} {key} is given twice ({shown(out[key])} and {shown(value.strip())}): give it once"
            )
        out[key] = value.strip()
    return out


def parse_method_options(items: list[str]) -> dict:
    """`--method-opt KEY=VALUE` pairs; values parsed as JSON where possible (numbers, true/false), else strings."""
    out = {}
    for key, text in parse_pairs(items, "--method-opt").items():

        def refuse(token: str, key=key, text=text):
            raise ConfigError(f"--method-opt {key}={shown(text)}: {token} is beyond any finite number")

        try:
            out[key] = json.loads(text, parse_int=lambda token, refuse=refuse: _json_integer(token, refuse))
        except json.JSONDecodeError:
            out[key] = text
    return out

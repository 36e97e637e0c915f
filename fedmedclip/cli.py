"""`fedmedclip` command line. The core commands live here; the MLOps layers (stack, tracking,
pipelines, serving) add theirs through the `fedmedclip.commands` entry points, so the core never
imports them (see docs/contracts.md)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from .errors import ConfigError, FedMedClipError, run_command
from .extensions import installed, load_extension
from .observer import NO_OBSERVER, RunObserver
from .startup import imports_without_collection
from .tracking_server import DEFAULT_EXPERIMENT

DESCRIPTION = (
    "Federated adaptation of a frozen CLIP for medical image classification (FedMedCLIP, FACMIC and their "
    "baselines): train in one process, run the federation's server and sites as long-lived processes, and, "
    "with the MLOps layers installed, the local stack, MLflow tracking and registry, the Kubeflow pipeline "
    "and ONNX serving. The maths: docs/algorithms.md."
)


def _add_train_args(p: argparse.ArgumentParser, runtime: bool = False) -> None:
    from .flags import SERVER, TRAIN, add_config_arguments

    # The federation runtime runs federated training only, and always resumes what its state holds.
    add_config_arguments(p, SERVER if runtime else TRAIN)
    if not runtime:
        p.add_argument(
            "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
        )
        p.add_argument(
            "--run-id",
            default="inprocess",
            help="the run id written into every payload's header; a mailbox run's id gives its payloads and "
            "results byte for byte (default: %(default)s)",
        )
    p.add_argument(
        "--track",
        action="store_true",
        help="log the run to MLflow while it goes on, each round as it finishes (tracking server: "
        "--tracking-uri, else MLFLOW_TRACKING_URI, else the local stack of `fedmedclip stack up`); on by default "
        "when --tracking-uri or MLFLOW_TRACKING_URI is set",
    )
    p.add_argument("--tracking-uri", help="the MLflow tracking server for --track (turns it on)")
    p.add_argument(
        "--no-track",
        action="store_true",
        help="do not log to MLflow even if --tracking-uri or MLFLOW_TRACKING_URI is set",
    )
    p.add_argument(
        "--experiment",
        default=DEFAULT_EXPERIMENT,
        help="MLflow experiment for --track (default: %(default)s)",
    )


def config_from_args(args):
    from .flags import config_from_args as from_flags

    return from_flags(args)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def print_summary(results: dict, out: str) -> None:
    """What a person reads at the end of a run: the selected round and how, metrics, traffic, time."""
    from .privacy.report import rounded

    m = results["metrics"]
    g = m["global"]
    print(
        f"\n{results['method']} on {_count(results['sites'], 'site')}, {_count(results['rounds'], 'round')} "
        f"(selected round {m['best_round']}: {m['selection']})"
    )
    print(
        f"  global test : acc {g['acc']:.3f}  bacc {g['bacc']:.3f}  f1 {g['f1']:.3f}  ece {g['ece']:.3f}  (n={g['n']})"
    )
    for s in m["sites"]:
        if s.get("n"):
            print(
                f"  {s['site']:<12}: acc {s['acc']:.3f}  bacc {s['bacc']:.3f}  f1 {s['f1']:.3f}  ece {s['ece']:.3f}  (n={s['n']})"
            )
    dup = (results.get("data") or {}).get("duplicates")
    if dup and dup["groups"]:
        print(
            f"  data        : {dup['groups']} groups of byte-identical images ({dup['groups_across_splits']} across "
            f"training and test): dropped {dup['dropped_training_copies']} training copies, "
            f"{dup['dropped_conflicting']} with conflicting labels (--duplicates {dup['policy']})"
        )
    for entry in results.get("recovery") or []:
        print(
            f"  recovery    : {entry['party']} resumed from older state at round {entry['round']}: {entry['reason']}"
        )
    c, t = results["comm"], results["timing"]
    print(
        f"  comm        : {c['bytes_up_per_site_per_round'] / 1e3:.1f} kB up ({c['codec_up']}), "
        f"{c['bytes_down_per_site_per_round'] / 1e3:.1f} kB down ({c['codec_down']}) per site per round"
    )
    print(f"  time        : {_round_time(results['history'])}, features {t['feature_seconds']:.1f} s")
    privacy = results.get("privacy") or {}
    if privacy.get("epsilon") is not None:
        print(
            f"  privacy     : epsilon {rounded(privacy['epsilon'], 4)} (largest over the sites) at delta "
            f"{rounded(privacy['delta'], 4)}"
        )
    if (privacy.get("client_level") or {}).get("epsilon") is not None:
        print(
            f"  privacy     : client-level epsilon {rounded(privacy['client_level']['epsilon'], 4)} at delta "
            f"{rounded(privacy['delta'], 4)}"
        )
    print(f"results: {out}/results.json\nplots  : {out}/plots/accuracy.png, {out}/plots/reliability.png")


def _round_time(history: list[dict]) -> str:
    """Seconds per round. Round 1 of a mailbox run also waits for the sites to start and encode their
    images, so it is shown apart from the others."""
    seconds = [float(r["seconds"]) for r in history]
    if len(seconds) < 2:
        return f"{seconds[0] if seconds else 0.0:.2f} s per round"
    rest = sum(seconds[1:]) / len(seconds[1:])
    return (
        f"{rest:.2f} s per round after round 1 ({seconds[0]:.2f} s, which in a mailbox run also waits for "
        "the sites to start)"
    )


def _tracking_on(args) -> bool:
    """Whether to log to MLflow; asked for, the tracking server must be there before any work starts."""
    given = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    on = bool(args.track or (given and not args.no_track))
    if on:
        from .tracking_server import require_tracking_uri

        # Tracking switched on by the environment alone surprises: say so, and how to go without it.
        why = "--track" if args.track or args.tracking_uri else "tracking (on as MLFLOW_TRACKING_URI is set)"
        try:
            require_tracking_uri(args.tracking_uri, purpose=why)
        except FedMedClipError as e:
            raise FedMedClipError(f"{e}; or pass --no-track" if why != "--track" else str(e)) from None
    return on


def _cmd_train(args) -> int:
    from .engine import train
    from .federation.mailbox import check_name

    cfg = config_from_args(args)
    run_id = check_name("run id", args.run_id)
    tracked = _tracking_on(args)
    observer = _observer(args, cfg, run_id=None) if tracked else NO_OBSERVER
    results = train(cfg, resume=args.resume, progress=not args.quiet, run_id=run_id, observer=observer)
    print_summary(results, args.out)
    if tracked and observer.tracked_run_id is None:
        raise FedMedClipError(
            f"the run in {args.out} is complete but was not tracked (see the warning above)"
        )
    if observer.tracked_run_id:
        print(observer.tracked_run_id)
    return 0


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mailbox",
        required=True,
        help="where the parties exchange modules: s3://BUCKET[/PREFIX] or a local directory shared by all parties",
    )
    p.add_argument("--run-id", required=True, help="the run's name in the mailbox (letters, digits, ._-)")
    p.add_argument(
        "--state",
        default=None,
        help="where this party keeps its private state and checkpoints: a directory or s3://BUCKET/PREFIX "
        "(default: the server's area of the mailbox; a site: .fedmedclip-state/RUN_ID/SITE on its own disk)",
    )


def _cmd_server_run(args) -> int:
    from .federation.runner import run_server
    from .flags import options_from_args

    options = options_from_args(args)
    cfg = config_from_args(args)
    site_keys = args.site_keys
    if site_keys and not cfg.secure_aggregation:
        raise ConfigError("--site-keys registers identity keys for --secure-aggregation, which is off")
    if cfg.secure_aggregation and not site_keys:
        raise ConfigError(
            "--secure-aggregation needs the sites' public identity keys: --site-keys FILE (a JSON object "
            "{site: key}, each printed by `fedmedclip site keygen`), or --site-keys mailbox (each site "
            "registers its own: `site run --register-identity`)"
        )
    if site_keys and site_keys != "mailbox":
        from .federation.secure import read_site_keys

        site_keys = read_site_keys(site_keys)
    observer = (
        _observer(args, cfg, run_id=args.run_id, options=asdict(options))
        if _tracking_on(args)
        else NO_OBSERVER
    )
    results = run_server(
        cfg,
        args.mailbox,
        args.run_id,
        args.out,
        args.state,
        options,
        observer,
        not args.quiet,
        site_keys=site_keys,
    )
    print_summary(results, args.out)
    return 0


def _observer(args, cfg, run_id: str | None, **kwargs) -> RunObserver:
    """The MLOps layer's live MLflow logger (entry point `fedmedclip.observers`), if installed: the one
    tracking mechanism of `train --track` and `server run --track` (`run_id=None`: train's own key)."""
    observer = load_extension("fedmedclip.observers", "mlflow", FedMedClipError, "--track")
    if observer is None:
        raise FedMedClipError("--track needs the MLOps layer: install the project with its `pipelines` extra")
    return observer(
        cfg=cfg, run_id=run_id, experiment=args.experiment, tracking_uri=args.tracking_uri, **kwargs
    )


def _cmd_site_run(args) -> int:
    from .federation.runner import SiteOptions, run_site
    from .flags import options_from_args

    run_site(
        args.mailbox,
        args.run_id,
        args.site,
        state_url=args.state,
        progress=not args.quiet,
        identity=args.identity,
        register_identity=args.register_identity,
        **asdict(options_from_args(args, SiteOptions)),
    )
    return 0


def _cmd_site_keygen(args) -> int:
    from .secagg.identity import IDENTITY_FILE, site_identity

    where = f"{str(args.state).rstrip('/')}/{IDENTITY_FILE}"
    key, created = site_identity(where, create=True)
    print(
        f"{'generated' if created else 'kept the existing'} identity key {where} (private: it never leaves "
        "this site)\npublic key, for the operator to register in the run (server run --site-keys):",
        file=sys.stderr,
    )
    print(key.public)
    return 0


def _add_runtime_commands(sub) -> None:
    from .federation.runner import DEFAULT_IDENTITY, STATE_ROOT, SiteOptions
    from .federation.server import ServerOptions
    from .flags import SERVER, SITE, add_config_arguments

    server = sub.add_parser(
        "server", help="the federation's aggregator, as a long-lived process"
    ).add_subparsers(dest="server_command", metavar="COMMAND", required=True)
    p = server.add_parser(
        "run",
        help="aggregate a federated run through a mailbox (S3 or a directory); restart with the same arguments "
        "to continue it",
    )
    _add_runtime_args(p)
    _add_train_args(p, runtime=True)
    add_config_arguments(p, SERVER, ServerOptions)
    p.add_argument(
        "--site-keys",
        default=None,
        metavar="FILE|mailbox",
        help="with --secure-aggregation: the sites' public identity keys, a JSON file {site: 'ed25519:...'} "
        "(each printed by `fedmedclip site keygen` at its site), written into the run's manifest; 'mailbox': "
        "take the keys the sites register there themselves (`site run --register-identity`), trusting each "
        "site's storage role (docs/secure-aggregation.md)",
    )
    p.set_defaults(func=_cmd_server_run)

    site = sub.add_parser("site", help="a hospital's worker, as a long-lived process").add_subparsers(
        dest="site_command", metavar="COMMAND", required=True
    )
    p = site.add_parser(
        "run",
        help="join a federated run as one site: reads only this site's data, sends only module updates; restart "
        "with the same arguments to continue",
    )
    _add_runtime_args(p)
    p.add_argument(
        "--site", required=True, help="this site's name in the run (as the server's partition names it)"
    )
    add_config_arguments(p, SITE, SiteOptions)
    p.add_argument(
        "--identity",
        default=DEFAULT_IDENTITY,
        help="this site's identity key for secure aggregation (`site keygen` writes it): a PEM file or "
        "s3://BUCKET/PREFIX/identity.pem (default: %(default)s)",
    )
    p.add_argument(
        "--register-identity",
        action="store_true",
        help="create the identity key if it is missing and register its public key through the mailbox, for "
        "a server started with --site-keys mailbox (sites the operator's system creates)",
    )
    p.set_defaults(func=_cmd_site_run)

    p = site.add_parser(
        "keygen",
        help="generate this site's long-term identity key for secure aggregation (kept, never overwritten) and "
        "print its public key for the operator",
    )
    p.add_argument(
        "--state",
        default=STATE_ROOT,
        help="where this site keeps its private state: the key is written to STATE/identity.pem, readable by "
        "its owner only (a directory, or s3://BUCKET/PREFIX) (default: %(default)s)",
    )
    p.set_defaults(func=_cmd_site_keygen)


def _cmd_methods(args) -> int:
    from .methods import describe_methods

    print(describe_methods())
    return 0


# `synth`'s flags: the keyword of `synthetic.generate` each sets, whose default it takes.
SYNTH_FLAGS = (
    ("--sites", "sites", "hospitals, each with its own scanner look"),
    ("--per-class", "per_class_per_site", "images per class per site"),
    ("--test-per-class", "test_per_class", "global test images per class"),
    ("--size", "size", "image side in pixels"),
    ("--seed", "seed", "generator seed"),
)


def _cmd_synth(args) -> int:
    from .synthetic import generate

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # never written over a run or older images
        raise ConfigError(f"{out} is not an empty folder: give a new one for the synthetic data")
    print(generate(args.out, **{name: getattr(args, name) for _, name, _ in SYNTH_FLAGS}))
    return 0


def _cmd_backbone(args) -> int:
    from .backbone import load_backbone

    print(json.dumps(load_backbone(args.spec).identity(), indent=2))
    return 0


def _cmd_export(args) -> int:
    from .export import export_onnx, export_site_state

    rate = args.ood_false_alarm_rate
    if not args.no_ood and not 0 < rate < 1:  # a typo, refused before the model and its features are loaded
        raise ConfigError(f"--ood-false-alarm-rate must be in (0, 1), e.g. 0.05, got {rate}")
    common = dict(
        precision="fp16" if args.fp16 else "fp32",
        exporter=args.exporter,
        ood="off" if args.no_ood else "require",
        false_alarm_rate=args.ood_false_alarm_rate,
    )
    if args.state:
        missing = [f"--{o.replace('_', '-')}" for o in ("mailbox", "run_id") if not getattr(args, o)]
        if args.run_dir or missing or args.site == "global":
            raise ConfigError(
                "export --state exports a site's own model: give --site NAME, --mailbox and --run-id (the ones "
                f"`site run` used) and no run directory{'; missing ' + ', '.join(missing) if missing else ''}"
            )
        export_site_state(
            args.state,
            args.site,
            args.mailbox,
            args.run_id,
            args.out,
            data=args.data,
            cache_dir=args.cache_dir,
            backbone=args.backbone,
            **common,
        )
    else:
        if not args.run_dir:
            raise ConfigError("export needs a run directory (RUN), or --state for a site's own model")
        stray = [f"--{o}" for o in ("mailbox", "data") if getattr(args, o)]
        if stray:  # a run directory's export finds its run's data itself: these would be ignored
            raise ConfigError(
                f"{' and '.join(stray)} go with --state (a site exporting its own model); a run directory's "
                "export reads its run's configuration"
            )
        export_onnx(
            args.run_dir, args.site, args.out, run_id=args.run_id or "", backbone=args.backbone, **common
        )
    return 0  # the export's log line says the file, its sha256 and its OOD threshold


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fedmedclip", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="federated training on cached CLIP features, in one process")
    _add_train_args(p)
    p.set_defaults(func=_cmd_train)

    _add_runtime_commands(sub)

    p = sub.add_parser(
        "methods", help="the registered methods: group, aggregation, options with defaults and help"
    )
    p.set_defaults(func=_cmd_methods)

    import inspect

    from .synthetic import generate  # numpy and Pillow, which the commands' declarations load already

    p = sub.add_parser("synth", help="write the synthetic multi-site scan set (PNGs + manifest.csv)")
    p.add_argument("out", help="the folder to write (PNGs and manifest.csv with a site column)")
    generator = inspect.signature(generate).parameters  # its own defaults
    for flag, name, help in SYNTH_FLAGS:
        default = generator[name].default
        p.add_argument(
            flag, dest=name, type=int, default=default, metavar="N", help=f"{help} (default: %(default)s)"
        )
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser(
        "backbone", help="load a backbone offline and print its identity (checks weights are present)"
    )
    p.add_argument(
        "spec",
        help="tiny | random-vit-b32 | random-vit-b16 | a local CLIP directory | a cached Hugging Face id",
    )
    p.set_defaults(func=_cmd_backbone)

    from . import compare  # light at import: the engine loads only when the command runs
    from .federation.runner import SiteOptions

    p = sub.add_parser("compare", help="methods x partitions x seeds side by side (resumable), tabulated")
    compare.add_arguments(p)
    p.set_defaults(func=compare.cmd_compare)

    from .ood import DEFAULT_FALSE_ALARM_RATE  # torch, which the commands' declarations load already

    p = sub.add_parser(
        "export",
        help="export a trained site's or the global predictor to one ONNX file, with its OOD score",
        description="Export the global model or a site's model of a run directory (`export RUN --site S`), or a "
        "site's personalised model from its own private state, on the site's machine (`export --state DIR "
        "--site NAME --mailbox URL --run-id ID`). The out-of-distribution score is fitted on the exporting "
        "party's own images (found through the run's configuration and feature cache) and calibrated on "
        "held-out ones to --ood-false-alarm-rate.",
    )
    p.add_argument(
        "run_dir", nargs="?", help="a `fedmedclip train --out` or `server run --out` run directory"
    )
    p.add_argument("--site", default="global", help="global | a site name | a site index (default: global)")
    p.add_argument(
        "--out",
        default="model.onnx",
        help="ONNX file to write (default: %(default)s); a file already there is replaced only when it is an "
        "earlier export (its .sha256 sidecar matches it), anything else is refused",
    )
    p.add_argument("--fp16", action="store_true", help="half-precision image encoder (for GPU serving)")
    p.add_argument(
        "--run-id",
        default=None,
        help="training run id recorded in the metadata (default: the run directory's own, from its results.json; "
        "with --state, the run's)",
    )
    p.add_argument("--backbone", default=None, help="where the frozen weights are, if moved (hash-checked)")
    p.add_argument(
        "--exporter",
        default="auto",
        choices=("auto", "dynamo", "torchscript"),
        help="torch's ONNX exporter: dynamo (torch.export), torchscript (tracing), or auto (dynamo, then "
        "torchscript if dynamo fails; default)",
    )
    p.add_argument("--no-ood", action="store_true", help="export without the out-of-distribution score")
    p.add_argument(
        "--ood-false-alarm-rate",
        type=float,
        default=DEFAULT_FALSE_ALARM_RATE,
        help="share of held-out in-distribution images the OOD threshold flags (default: %(default)s)",
    )
    p.add_argument(
        "--state", help="a site's private state (`site run --state`): export that site's own model"
    )
    p.add_argument("--mailbox", help="with --state: the run's mailbox (directory or s3://...)")
    p.add_argument(
        "--data", help="with --state: the site's own data, as `site run --data` (default: the run's)"
    )
    p.add_argument(
        "--cache-dir",
        default=SiteOptions.cache_dir,
        help="with --state: the site's feature cache, as `site run --cache-dir` (default: %(default)s)",
    )
    p.set_defaults(func=_cmd_export)

    for ep in installed("fedmedclip.commands"):
        try:
            ep.load()(sub)
        except ImportError as exc:  # that layer's extra is not installed in this environment
            logging.getLogger(__name__).debug("commands from %s unavailable: %s", ep.name, exc)
    _global_flags_everywhere(parser)
    return parser


def _global_flags_everywhere(parser: argparse.ArgumentParser) -> None:
    """-v/--verbose and -q/--quiet are accepted after any command too (`fedmedclip pipeline run --local -v`),
    not only before it. SUPPRESS: a command that does not see them leaves the top-level value alone."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in set(action.choices.values()):
            taken = child._option_string_actions
            if not {"-v", "--verbose"} & set(taken):
                child.add_argument(
                    "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
                )
            if not {"-q", "--quiet"} & set(taken):
                child.add_argument(
                    "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars"
                )
            _global_flags_everywhere(child)


# What an interrupted command keeps, and how it goes on: only `train` has --resume; compare skips its finished
# cells when run again; a server or site process resumes from its state when started again with its arguments.
INTERRUPTED = {
    "train": "; a finished round is checkpointed: rerun with --resume",
    "compare": "; finished cells are kept and a finished round is checkpointed: rerun the same compare command "
    "to resume",
    "server": "; a finished round is checkpointed: start it again with the same arguments to resume",
    "site": "; its state is checkpointed: start it again with the same arguments to resume",
}


def main(argv: list[str] | None = None) -> int:
    # MLflow 3 sends usage events to mlflow.org unless told not to: off for every command and the processes it
    # starts (the pipeline's local tasks, the parties), as in the images; MLFLOW_DISABLE_TELEMETRY=false opts in.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if not sys.stderr.isatty():  # a pod's or a script's log: MLflow's download bar redrawn in place is noise
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The parser's declarations import torch and the methods: in a fresh process, without the garbage collector
    # walking them meanwhile (fedmedclip/startup.py); every command then runs with it as usual.
    with imports_without_collection():
        parser = build_parser()
        args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return run_command(args)
    except KeyboardInterrupt:
        print(f"interrupted{INTERRUPTED.get(args.command, '')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

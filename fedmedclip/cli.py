"""`fedmedclip` command line. The core commands live here; the MLOps layers (stack, tracking,
pipelines, serving) add theirs through the `fedmedclip.commands` entry points, so the core never
imports them (see docs/contracts.md)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib.metadata import entry_points

from .errors import FedMedClipError


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .codec import CODECS
    from .config import TrainConfig
    from .partition import SCHEMES

    d = TrainConfig()
    p.add_argument(
        "--data",
        default=d.data,
        help="image-folder root (<root>/<split>/<class>/*), a CSV manifest "
        "(path,label[,site][,split]), or 'synthetic' (default: %(default)s)",
    )
    p.add_argument(
        "--method",
        default=d.method,
        help="fedmedclip | facmic | fedclip | zeroshot | fedavg | fedprox | moon | fedfocal (default: %(default)s)",
    )
    p.add_argument(
        "--federation",
        default=d.federation,
        choices=("federated", "local", "centralized"),
        help="federated (default), local (each site alone, nothing shared) or centralized (all training "
        "data pooled in one holder): the lower and upper references for any method",
    )
    p.add_argument("--partition", default=d.partition, choices=SCHEMES)
    p.add_argument("--alpha", type=float, default=None, help="Dirichlet concentration (smaller = more skew)")
    p.add_argument("--sites", type=int, default=d.sites)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument(
        "--backbone",
        default=d.backbone,
        help="tiny | random-vit-b32 | random-vit-b16 | a local CLIP "
        "directory | a Hugging Face id already cached (never downloaded)",
    )
    p.add_argument(
        "--preprocessing",
        default=None,
        choices=("clip", "squash"),
        help="default: the method's reference recipe (fedmedclip: squash, facmic: clip)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="run directory (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--codec", default=d.codec, choices=CODECS, help="how module updates travel")
    p.add_argument(
        "--split", default="0.8,0.1,0.1", help="per-site train,val,test shares (default: %(default)s)"
    )
    p.add_argument(
        "--reference-fraction",
        type=float,
        default=d.reference_fraction,
        help="share of the training pool held out as the unlabelled reference set (FACMIC)",
    )
    p.add_argument(
        "--transductive",
        action="store_true",
        help="FACMIC: adapt toward the global test images (reference code; only to match the paper)",
    )
    p.add_argument(
        "--method-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, e.g. lr_fam=5e-4 or local_steps=50 (repeatable)",
    )
    p.add_argument(
        "--cache-dir", default=d.cache_dir, help="feature stores and synthetic data (default: %(default)s)"
    )
    p.add_argument(
        "--skip-bad-images", action="store_true", help="skip unreadable images (logged) instead of failing"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--track",
        action="store_true",
        help="log the finished run to MLflow (`fedmedclip track`); on by default when MLFLOW_TRACKING_URI is set",
    )
    p.add_argument(
        "--no-track", action="store_true", help="do not log to MLflow even if MLFLOW_TRACKING_URI is set"
    )
    p.add_argument(
        "--experiment", default="fedmedclip", help="MLflow experiment for --track (default: %(default)s)"
    )


def config_from_args(args) -> TrainConfig:  # noqa: F821 - imported lazily for a fast --help
    from .config import TrainConfig, parse_method_options
    from .errors import ConfigError

    try:
        split = tuple(float(x) for x in args.split.split(","))
    except ValueError:
        raise ConfigError(f"--split {args.split!r} must be three numbers like 0.8,0.1,0.1") from None
    return TrainConfig(
        data=args.data,
        method=args.method,
        federation=args.federation,
        partition=args.partition,
        alpha=args.alpha,
        sites=args.sites,
        rounds=args.rounds,
        backbone=args.backbone,
        preprocessing=args.preprocessing,
        seed=args.seed,
        out=args.out,
        batch_size=args.batch_size,
        codec=args.codec,
        split_ratio=split,
        reference_fraction=args.reference_fraction,
        transductive=args.transductive,
        method_options=parse_method_options(args.method_opt),
        cache_dir=args.cache_dir,
        skip_bad_images=args.skip_bad_images,
    ).validate()


def _cmd_train(args) -> int:
    from .engine import train

    results = train(config_from_args(args), resume=args.resume, progress=not args.quiet)
    m = results["metrics"]
    g = m["global"]
    print(
        f"\n{results['method']} on {results['sites']} sites, {results['rounds']} rounds "
        f"(selected round {m['best_round']} by mean site validation accuracy)"
    )
    print(
        f"  global test : acc {g['acc']:.3f}  bacc {g['bacc']:.3f}  f1 {g['f1']:.3f}  ece {g['ece']:.3f}  (n={g['n']})"
    )
    for s in m["sites"]:
        if s.get("n"):
            print(
                f"  {s['site']:<12}: acc {s['acc']:.3f}  bacc {s['bacc']:.3f}  f1 {s['f1']:.3f}  ece {s['ece']:.3f}  (n={s['n']})"
            )
    c, t = results["comm"], results["timing"]
    print(
        f"  comm        : {c['bytes_up_per_site_per_round'] / 1e3:.1f} kB up per site per round ({c['codec']})"
    )
    print(f"  time        : {t['seconds_per_round']:.2f} s per round, features {t['feature_seconds']:.1f} s")
    print(
        f"results: {args.out}/results.json\nplots  : {args.out}/plots/accuracy.png, {args.out}/plots/reliability.png"
    )
    if args.track or (os.environ.get("MLFLOW_TRACKING_URI") and not args.no_track):
        return _track(args.out, args.experiment)
    return 0


def _track(run_dir: str, experiment: str) -> int:
    """Log the run with the `track` command of the MLOps layer (the core never imports mlflow)."""
    if "track" not in _command_names():
        raise FedMedClipError(
            "--track needs the MLOps layer: install the project with its `pipelines` extra (make install)"
        )
    return main(["track", run_dir, "--experiment", experiment])


def _cmd_synth(args) -> int:
    from .synthetic import generate

    manifest = generate(
        args.out,
        sites=args.sites,
        per_class_per_site=args.per_class,
        test_per_class=args.test_per_class,
        size=args.size,
        seed=args.seed,
    )
    print(manifest)
    return 0


def _cmd_backbone(args) -> int:
    from .backbone import load_backbone

    print(json.dumps(load_backbone(args.spec).identity(), indent=2))
    return 0


def _cmd_export(args) -> int:
    from .export import export_onnx

    path = export_onnx(
        args.run_dir,
        args.site,
        args.out,
        precision="fp16" if args.fp16 else "fp32",
        run_id=args.run_id,
        backbone=args.backbone,
        exporter=args.exporter,
    )
    print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmedclip", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="federated training on cached CLIP features, in one process")
    _add_train_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("synth", help="write the synthetic multi-site scan set (PNGs + manifest.csv)")
    p.add_argument("out")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--per-class", type=int, default=80)
    p.add_argument("--test-per-class", type=int, default=30)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser(
        "backbone", help="load a backbone offline and print its identity (checks weights are present)"
    )
    p.add_argument("spec")
    p.set_defaults(func=_cmd_backbone)

    from . import compare  # light at import: the engine loads only when the command runs

    p = sub.add_parser("compare", help="methods x partitions x seeds side by side (resumable), tabulated")
    compare.add_arguments(p)
    p.set_defaults(func=compare.cmd_compare)

    p = sub.add_parser("export", help="export a trained site's or the global predictor to one ONNX file")
    p.add_argument("run_dir", help="a `fedmedclip train --out` run directory")
    p.add_argument("--site", default="global", help="global | a site name | a site index (default: global)")
    p.add_argument("--out", default="model.onnx", help="ONNX file to write (default: %(default)s)")
    p.add_argument("--fp16", action="store_true", help="half-precision image encoder (for GPU serving)")
    p.add_argument("--run-id", default="", help="training run id recorded in the metadata")
    p.add_argument("--backbone", default=None, help="where the frozen weights are, if moved (hash-checked)")
    p.add_argument("--exporter", default="auto", choices=("auto", "dynamo", "torchscript"))
    p.set_defaults(func=_cmd_export)

    for ep in entry_points(group="fedmedclip.commands"):
        try:
            ep.load()(sub)
        except ImportError as exc:  # that layer's extra is not installed in this environment
            logging.getLogger(__name__).debug("commands from %s unavailable: %s", ep.name, exc)
    return parser


def _command_names() -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def main(argv: list[str] | None = None) -> int:
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
        return int(args.func(args) or 0)
    except FedMedClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a finished round is checkpointed: rerun with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`fedmedclip track|register|promote|card|data|backbone push`: the MLOps sub-commands (entry point `fedmedclip.commands`).

Nothing heavy is imported here (no mlflow, boto3): `fedmedclip train` loads this module on every start.
stdout carries only what scripts capture (run id, version number, export lines); the rest goes to stderr.
"""

from __future__ import annotations

import functools
import json
import os
import sys

from fedmedclip.paths import DEFAULT_CACHE_DIR
from fedmedclip.tracking_server import DEFAULT_EXPERIMENT


def _quiet_mlflow() -> None:
    # MLflow prints "View run ... at ..." to stdout, which would pollute `RUN_ID=$(fedmedclip track ...)`.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _mlflow_errors(fn):
    """Unexpected MLflow server answers become user errors with the server's message, not tracebacks."""

    @functools.wraps(fn)
    def wrapper(args) -> int:
        from mlflow.exceptions import MlflowException

        from .tracking import TrackingError

        _quiet_mlflow()
        try:
            return fn(args)
        except MlflowException as e:
            raise TrackingError(f"MLflow: {e.message}") from e

    return wrapper


@_mlflow_errors
def cmd_track(args) -> int:
    """log a finished run directory to MLflow afterwards, each round at its recorded time; prints the run id
    (`train --track` logs while it runs)"""
    from .rundir import read_run_dir, track_run_dir
    from .tracking import _client, experiment_ui_url

    run = read_run_dir(args.run_dir)  # a wrong directory is said before the tracking server is looked for
    client, uri = _client(args.tracking_uri)
    run_id, existing = track_run_dir(
        run,
        args.experiment,
        uri,
        args.run_name,
        include_site_models=args.include_site_models,
        kfp_run_id=args.kfp_run_id,
    )
    url = experiment_ui_url(uri, client.get_run(run_id).info.experiment_id, run_id)
    done = "is logged already (nothing logged again) in" if existing else "logged to"
    print(f"{args.run_dir} {done} experiment {args.experiment!r}: {url}", file=sys.stderr)
    print(run_id)
    return 0


@_mlflow_errors
def cmd_register(args) -> int:
    """register a tracked run's model as a new version; prints the version number"""
    from fedmedclip.digests import ONNX_SHA256_TAG

    from .registry import register_model

    mv = register_model(args.run_id, args.name, onnx_path=args.onnx, tracking_uri=args.tracking_uri)
    sha = f" ({ONNX_SHA256_TAG} {mv.tags[ONNX_SHA256_TAG]})" if mv.tags.get(ONNX_SHA256_TAG) else ""
    done = "already registered: " if mv.existing else "registered "
    print(f"{done}{mv.uri} from run {mv.run_id}{sha}", file=sys.stderr)
    print(mv.version)
    return 0


@_mlflow_errors
def cmd_promote(args) -> int:
    """point NAME@ALIAS at a version; refuses one with lower global balanced accuracy than the holder"""
    from fedmedclip.errors import ConfigError
    from fedmedclip.flags import options_from_args

    from .promotion import PromotionPolicy
    from .registry import promote

    policy = options_from_args(args, PromotionPolicy)
    # '' is the pipeline's "register only" (components/register): a promotion with no alias to move.
    if not policy.promote_alias:
        raise ConfigError("--alias must not be empty: promote moves an alias")
    print(promote(args.name, args.version, policy, args.tracking_uri).describe())
    return 0


@_mlflow_errors
def cmd_card(args) -> int:
    """print the model card of a registered version (NAME@ALIAS or NAME/VERSION) or a run directory"""
    from pathlib import Path

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file
    if Path(args.model).is_dir():  # a run directory: its card, without the registry's facts
        from fedmedclip.model_card import build_card, render_markdown

        card = build_card(args.model)
        print(json.dumps(card, indent=1) if args.json else render_markdown(card))
        return 0
    from .model_card import read_model_card

    print(read_model_card(args.model, "json" if args.json else "md", tracking_uri=args.tracking_uri))
    return 0


def _stack_credentials_for(role: str | None = None, root: str | None = None):
    """Without S3 credentials in the environment, on a development machine: `role`'s from the recorded local
    stack (devstack), which is granted on `root` first if it is not yet. Returns the stack's record, or None
    (no stack recorded, or no devstack package: the images ship none)."""
    try:
        from devstack.stack import add_data_root, use_recorded_stack_s3
    except ImportError:
        return None
    info = use_recorded_stack_s3(role=role)
    if info is not None and root is not None and root not in info.data_roots:
        add_data_root(info.data_dir, root)
        print(f"local stack: roles granted on the new data root {root}", file=sys.stderr)
    return info


def _recorded_stack():
    """The recorded local stack (devstack), credentials untouched; None without one or without devstack."""
    try:
        from devstack.stack import read_state, recorded_stack_dir
    except ImportError:
        return None
    return read_state(recorded_stack_dir())


def cmd_backbone(args) -> int:
    """`backbone push DIR --to URL` publishes a CLIP directory; `backbone SPEC` with an s3:// or models:/
    spec downloads and checks it into the cache first; any other spec goes to the core's handler as it is."""
    from fedmedclip.errors import ConfigError

    from .backbones import is_remote_backbone, push_backbone, resolve_backbone

    if args.spec == "push" and not (args.directory and args.to):
        raise ConfigError("usage: fedmedclip backbone push DIR --to s3://BUCKET/PREFIX (or models:/NAME)")
    if args.spec != "push" and (args.directory or args.to):
        raise ConfigError(
            f"`fedmedclip backbone {args.spec} {args.directory or ''}`: only `backbone push DIR --to URL` "
            "takes a directory and --to"
        )
    if args.spec == "push" or is_remote_backbone(args.spec):
        _quiet_mlflow()
        _stack_credentials_for()  # like `data publish`: the local stack when the environment names no S3
    if args.spec == "push":
        published = push_backbone(args.directory, args.to, tracking_uri=args.tracking_uri)
        print(published.describe(), file=sys.stderr)
        print(published.spec)
        return 0
    if is_remote_backbone(args.spec):
        local = resolve_backbone(args.spec, args.cache_dir, tracking_uri=args.tracking_uri)
        print(f"{args.spec}: checked copy in {local}", file=sys.stderr)
        args.spec = local
    return args.core_backbone(args)


def cmd_data_publish(args) -> int:
    """upload images to s3://BUCKET/sites/<k>/ and server/ as a partition assigns them (pipeline input)"""
    from fedmedclip.errors import ConfigError
    from fedmedclip.flags import config_from_args

    from .site_data import is_s3, parse_bucket, parse_root, publish, publish_site

    if args.site is not None:
        root = "/".join(filter(None, parse_root(args.to))) if is_s3(args.to) else None
        cfg = config_from_args(args)
        if root:  # the site's own role, like a hospital holding only its own Secret
            _stack_credentials_for(args.site, root)
        summary = publish_site(cfg, args.site, args.to, progress=not args.quiet)
        samples = ", ".join(f"{s} {n}" for s, n in summary["samples"].items())
        moved = "uploaded" if is_s3(args.to) else "written"
        print(
            f"published {args.site}'s {summary['images']} images (site {summary['index']}: {samples}) to "
            f"{summary['location']} ({summary['bytes_uploaded'] / 1e6:.1f} MB {moved}), with its catalog and "
            "its summary for the server",
            file=sys.stderr,
        )
        return 0
    if not is_s3(args.to):
        raise ConfigError(
            f"--to {args.to!r}: the whole data set is published to s3://BUCKET; a local directory takes one "
            "site's share (--site NAME)"
        )
    bucket = parse_bucket(args.to, "--to")
    cfg = config_from_args(args)
    _stack_credentials_for("publisher", bucket)  # the local stack when the environment names no credentials
    summary = publish(cfg, bucket, progress=not args.quiet)
    sites = ", ".join(f"{s}: {n}" for s, n in summary["sites"].items())
    alpha = f" --alpha {cfg.alpha}" if cfg.alpha else ""
    print(
        f"published {summary['images']} images to s3://{bucket} ({summary['bytes_uploaded'] / 1e6:.1f} MB "
        f"uploaded; sites {sites}; server {summary['server']})\nrun on it: fedmedclip pipeline run --local "
        f"--data s3://{bucket} --partition {cfg.partition} --seed {cfg.seed}{alpha} --sites {len(summary['sites'])}",
        file=sys.stderr,
    )
    return 0


def cmd_data_withdraw(args) -> int:
    """a site deletes its own published images (every version), its catalog and its summary, with its own key"""
    from fedmedclip.errors import ConfigError

    from .site_data import withdraw_site

    index = args.site_index
    # The local stack: the site's own key and index.
    info = _stack_credentials_for(args.site) if args.site is not None else None
    if info is None and args.site is not None and index is None:
        # A key in the environment (a party's shell: `eval "$(fedmedclip stack env --role site_1)"`) is kept,
        # and the recorded stack still says which k the role is.
        info = _recorded_stack()
        if info is not None and args.site not in info.roles:
            raise ConfigError(
                f"the local stack in {info.data_dir} has no role {args.site!r}; its roles: "
                + ", ".join(info.role_names)
            )
    if index is None and info is not None and args.site in info.roles:
        index = info.roles[args.site].site_index
    if index is None:
        # --site names a role of the local stack; without one recorded it cannot say which k the site is.
        given = (
            f"--site {args.site} takes its k from the local stack, and none is recorded (`fedmedclip stack up`; "
            "$FEDMEDCLIP_STACK_DIR names a --data-dir other than .stack); otherwise "
            if args.site
            else ""
        )
        raise ConfigError(
            f"{given}give --site-index K (the k of sites/<k>/ and of the Secret fedmedclip-site-<k>-s3)"
        )
    images, versions = withdraw_site(args.from_, index)
    what = (
        f"{images} images, catalog and summary"
        if images is not None
        else "summary (its images and catalog were gone already)"
    )
    print(
        f"withdrew site {index}'s {what} from {args.from_.rstrip('/')} ({versions} object versions deleted)",
        file=sys.stderr,
    )
    return 0


URI_HELP = (
    "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the running local stack of $FEDMEDCLIP_STACK_DIR "
    "or .stack/, else an error)"
)


def _command(subparsers, name: str, func, mlflow: bool = True):
    """A command and its handler, whose docstring is its help; one that talks to MLflow takes --tracking-uri."""
    p = subparsers.add_parser(name, help=func.__doc__)
    if mlflow:
        p.add_argument("--tracking-uri", help=URI_HELP)
    p.set_defaults(func=func)
    return p


def register(subparsers) -> None:
    """Add `track`, `register`, `promote`, `card`, `data`, `backbone push` to the `fedmedclip` command line."""
    from fedmedclip.flags import PROMOTE, PUBLISH, add_config_arguments

    from .promotion import PromotionPolicy

    p = _command(subparsers, "track", cmd_track)
    p.add_argument("run_dir", metavar="RUN_DIR", help="output of `fedmedclip train --out RUN_DIR`")
    p.add_argument(
        "--experiment",
        default=DEFAULT_EXPERIMENT,
        help="MLflow experiment (created if missing; default: %(default)s)",
    )
    p.add_argument("--run-name", help="default: the run directory's name")
    p.add_argument(
        "--include-site-models",
        action="store_true",
        help="also log the sites' private heads (model/site_*.safetensors); by default they stay off the "
        "central MLflow",
    )
    p.add_argument("--kfp-run-id", help="the Kubeflow run this run belongs to (tag kfp.run_id)")

    p = _command(subparsers, "register", cmd_register)
    p.add_argument(
        "run_id",
        metavar="RUN_ID",
        help="the MLflow run of a tracked run directory (what `fedmedclip track` or `train --track` prints)",
    )
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument(
        "--onnx",
        help="this run's exported ONNX file (`fedmedclip export`; a file of another run is refused); without "
        "it the run's model/ folder",
    )

    p = _command(subparsers, "promote", cmd_promote)
    p.add_argument("name", metavar="NAME", help="the registered model")
    p.add_argument("--version", required=True, help="the version to promote (what `register` printed)")
    # The promotion options, as the pipeline's (one declaration: mlops/promotion.py).
    add_config_arguments(p, PROMOTE, PromotionPolicy)

    p = _command(subparsers, "card", cmd_card)
    p.add_argument(
        "model", metavar="NAME@ALIAS|NAME/VERSION|RUN_DIR", help="a registered version, or a run directory"
    )
    p.add_argument("--json", action="store_true", help="the card's JSON instead of its Markdown")
    p = subparsers.add_parser(
        "data", help="publish a data set to S3, each site's images under its own prefix"
    )
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = _command(sub, "publish", cmd_data_publish, mlflow=False)
    d.add_argument(
        "--to",
        default="s3://fedmedclip-data",
        help="the data bucket (default: %(default)s); with --site also s3://BUCKET/PREFIX or a local directory",
    )
    d.add_argument(
        "--site",
        metavar="NAME",
        help="upload only site NAME's share of the partition (its images, catalog and summary), with that "
        "site's own credentials: a hospital onboarding itself; nothing else in the bucket is touched",
    )
    # The data and partition settings, spelled as in `fedmedclip train` (one definition: fedmedclip/flags.py).
    add_config_arguments(d, PUBLISH)
    w = _command(sub, "withdraw", cmd_data_withdraw, mlflow=False)
    w.add_argument(
        "--from",
        dest="from_",
        metavar="s3://BUCKET[/PREFIX]",
        required=True,
        help="the data root the site published to",
    )
    w.add_argument("--site-index", type=int, help="the site's k (its prefix sites/<k>/)")
    w.add_argument(
        "--site", help="on the local stack: the site's role name (its key and its k from the stack)"
    )

    # `backbone push` and remote specs, added to the core's `backbone SPEC` command (which prints a backbone's
    # identity) without changing it: its handler still serves every other spec.
    p = subparsers.choices.get("backbone")
    if p is None:  # this layer's commands without the core's (tests that build their own parser)
        return
    p.add_argument("directory", nargs="?", metavar="DIR", help="with `push`: the CLIP directory to publish")
    p.add_argument("--to", help="with `push`: s3://BUCKET/PREFIX or models:/NAME (the MLflow registry)")
    p.add_argument(
        "--cache-dir",
        default=DEFAULT_CACHE_DIR,
        help="where s3:// and models:/ backbones are downloaded (<cache-dir>/backbones/; default: %(default)s)",
    )
    p.add_argument("--tracking-uri", help="with models:/: " + URI_HELP)
    p.epilog = (
        "SPEC: tiny | random-vit-b32 | random-vit-b16 | a local CLIP directory | a cached Hugging Face id | "
        "s3://BUCKET/PREFIX or models:/NAME/VERSION, models:/NAME@ALIAS (downloaded into --cache-dir and "
        "checked against the weights hash recorded when pushed).  "
        "`fedmedclip backbone push DIR --to s3://BUCKET/PREFIX|models:/NAME` publishes DIR for the pods; "
        "it prints the spec to pass as --backbone."
    )
    p.set_defaults(func=cmd_backbone, core_backbone=p.get_default("func"))

"""`fedmedclip stack|track|register|promote|data`: the MLOps sub-commands (entry point `fedmedclip.commands`).

Nothing heavy is imported here (no mlflow, boto3): `fedmedclip train` loads this module on every start.
stdout carries only what scripts capture (run id, version number, export lines); the rest goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else default


def _stack_dir_default() -> str:
    from .stack import recorded_stack_dir

    return recorded_stack_dir()


def _add_stack_options(p: argparse.ArgumentParser, ports: bool) -> None:
    p.add_argument(
        "--data-dir",
        default=_stack_dir_default(),
        help="where the stack keeps stack.json, logs and the MLflow database (default: $FEDMEDCLIP_STACK_DIR or .stack)",
    )
    if ports:
        p.add_argument(
            "--s3-port",
            type=int,
            default=_env_int("FEDMEDCLIP_S3_PORT", 9000),
            help="S3 (moto) port (default: $FEDMEDCLIP_S3_PORT or 9000)",
        )
        p.add_argument(
            "--mlflow-port",
            type=int,
            default=_env_int("FEDMEDCLIP_MLFLOW_PORT", 5000),
            help="MLflow port (default: $FEDMEDCLIP_MLFLOW_PORT or 5000)",
        )
        p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")


def _quiet_mlflow() -> None:
    # MLflow prints "View run ... at ..." to stdout, which would pollute `RUN_ID=$(fedmedclip track ...)`.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _mlflow_errors(fn):
    """Unexpected MLflow server answers become user errors with the server's message, not tracebacks."""

    def wrapper(args) -> int:
        from mlflow.exceptions import MlflowException

        from .tracking import TrackingError

        _quiet_mlflow()
        try:
            return fn(args)
        except MlflowException as e:
            raise TrackingError(f"MLflow: {e.message}") from e

    return wrapper


# ------------------------------------------------------------------------------------------ handlers


def cmd_stack_up(args) -> int:
    from .stack import stack_status, start_stack

    was_running = stack_status(args.data_dir).running
    info = start_stack(args.data_dir, s3_port=args.s3_port, mlflow_port=args.mlflow_port, host=args.host)
    status = stack_status(args.data_dir)
    if was_running:
        print("already running (ports as recorded; stop it first to change them)", file=sys.stderr)
    print(status.describe(), file=sys.stderr)
    print(
        f"S3 lives in moto's memory: artifacts do not survive `fedmedclip stack down`.\n"
        f"to use it from a shell: eval $(fedmedclip stack env --data-dir {info.data_dir})",
        file=sys.stderr,
    )
    return 0


def cmd_stack_down(args) -> int:
    from .stack import stop_stack

    stopped = stop_stack(args.data_dir, purge=args.purge)
    if stopped:
        print(f"stopped {', '.join(stopped)} (S3 contents are gone)", file=sys.stderr)
    else:
        print(f"no running stack recorded in {args.data_dir}: nothing to stop", file=sys.stderr)
    if args.purge:
        print("removed the MLflow database", file=sys.stderr)
    return 0


def cmd_stack_status(args) -> int:
    from .stack import stack_status

    status = stack_status(args.data_dir)
    print(status.describe())
    return 0 if status.running else 1


def cmd_stack_env(args) -> int:
    from .stack import running_stack

    print(running_stack(args.data_dir).export_lines())
    return 0


@_mlflow_errors
def cmd_track(args) -> int:
    from .tracking import log_run_dir, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    run_id = log_run_dir(args.run_dir, args.experiment, tracking_uri=uri, run_name=args.run_name)
    print(f"logged {args.run_dir} to experiment {args.experiment!r} on {uri}", file=sys.stderr)
    print(run_id)
    return 0


@_mlflow_errors
def cmd_register(args) -> int:
    from .tracking import register_model

    mv = register_model(args.run_id, args.name, onnx_path=args.onnx, tracking_uri=args.tracking_uri)
    sha = mv.tags.get("onnx_sha256")
    print(
        f"registered {mv.uri} from run {mv.run_id}" + (f" (onnx_sha256 {sha})" if sha else ""),
        file=sys.stderr,
    )
    print(mv.version)
    return 0


@_mlflow_errors
def cmd_promote(args) -> int:
    from .tracking import promote

    result = promote(
        args.name,
        args.version,
        alias=args.alias,
        allow_worse=args.allow_worse,
        tracking_uri=args.tracking_uri,
    )
    print(result.describe())
    return 0


def cmd_data_publish(args) -> int:
    import json

    from fedmedclip.config import TrainConfig
    from fedmedclip.errors import ConfigError

    from .site_data import parse_bucket, publish
    from .stack import use_recorded_stack_s3

    bucket = parse_bucket(args.to)
    try:
        split = tuple(float(x) for x in args.split.split(","))
        synthetic = json.loads(args.synthetic) if args.synthetic else {}
    except ValueError as e:
        raise ConfigError(f"--split must be like 0.8,0.1,0.1 and --synthetic a JSON object ({e})") from None
    cfg = TrainConfig(
        data=args.data,
        partition=args.partition,
        alpha=args.alpha,
        sites=args.sites,
        seed=args.seed,
        split_ratio=split,
        reference_fraction=args.reference_fraction,
        synthetic=synthetic,
        cache_dir=args.cache_dir,
    ).validate()
    use_recorded_stack_s3()  # like `track`: the local stack when the environment names no S3 credentials
    summary = publish(cfg, bucket, progress=not args.quiet)
    sites = ", ".join(f"{s}: {n}" for s, n in summary["sites"].items())
    print(
        f"published {summary['images']} images to s3://{bucket} ({summary['bytes_uploaded'] / 1e6:.1f} MB "
        f"uploaded; sites {sites}; server {summary['server']})\n"
        f"run on it: fedmedclip pipeline run --local --data s3://{bucket} --partition {cfg.partition} "
        f"--seed {cfg.seed}"
        + (f" --alpha {cfg.alpha}" if cfg.alpha else "")
        + f" --sites {len(summary['sites'])}",
        file=sys.stderr,
    )
    return 0


# ------------------------------------------------------------------------------------------ register


def _register_data(subparsers) -> None:
    p = subparsers.add_parser(
        "data", help="publish a data set to S3, each site's images under its own prefix"
    )
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = sub.add_parser(
        "publish",
        help="upload images to s3://BUCKET/sites/<k>/ and server/ as a partition assigns them (pipeline input)",
    )
    d.add_argument("--data", default="synthetic", help="image folder, CSV manifest or 'synthetic'")
    d.add_argument("--to", default="s3://fedmedclip-data", help="the data bucket (default: %(default)s)")
    d.add_argument("--partition", default="iid", choices=("iid", "dirichlet", "natural"))
    d.add_argument("--alpha", type=float, default=None, help="Dirichlet concentration")
    d.add_argument("--sites", type=int, default=3)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--split", default="0.8,0.1,0.1", help="per-site train,val,test shares")
    d.add_argument("--reference-fraction", type=float, default=0.1)
    d.add_argument("--synthetic", default=None, help="JSON arguments of the synthetic generator")
    d.add_argument("--cache-dir", default=".cache/fedmedclip", help="where synthetic data is generated")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_data_publish)


def register(subparsers) -> None:
    """Add `stack`, `track`, `register`, `promote` to the `fedmedclip` command line."""
    p = subparsers.add_parser(
        "stack", help="local S3 (moto) + MLflow servers for development, demos and tests"
    )
    stack_sub = p.add_subparsers(dest="stack_command", metavar="ACTION", required=True)
    s = stack_sub.add_parser("up", help="start the servers in the background and wait until they answer")
    _add_stack_options(s, ports=True)
    s.set_defaults(func=cmd_stack_up)
    s = stack_sub.add_parser("down", help="stop the servers (idempotent); S3 contents are lost")
    _add_stack_options(s, ports=False)
    s.add_argument("--purge", action="store_true", help="also delete the MLflow database")
    s.set_defaults(func=cmd_stack_down)
    s = stack_sub.add_parser("status", help="are the servers running and answering? (exit 1 if not)")
    _add_stack_options(s, ports=False)
    s.set_defaults(func=cmd_stack_status)
    s = stack_sub.add_parser("env", help="print the export lines for clients: eval $(fedmedclip stack env)")
    _add_stack_options(s, ports=False)
    s.set_defaults(func=cmd_stack_env)

    uri_help = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local stack in .stack/)"

    p = subparsers.add_parser("track", help="log a run directory to MLflow; prints the run id")
    p.add_argument("run_dir", metavar="RUN_DIR", help="output of `fedmedclip train --out RUN_DIR`")
    p.add_argument("--experiment", default="fedmedclip", help="MLflow experiment (created if missing)")
    p.add_argument("--run-name", default=None, help="default: the run directory's name")
    p.add_argument("--tracking-uri", default=None, help=uri_help)
    p.set_defaults(func=cmd_track)

    p = subparsers.add_parser(
        "register", help="register a tracked run's model as a new version; prints the version number"
    )
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument(
        "--onnx",
        default=None,
        help="exported ONNX file (`fedmedclip export`); without it the run's model/ folder",
    )
    p.add_argument("--tracking-uri", default=None, help=uri_help)
    p.set_defaults(func=cmd_register)

    p = subparsers.add_parser(
        "promote",
        help="point NAME@ALIAS at a version; refuses one with lower global balanced accuracy than the holder",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--version", required=True)
    p.add_argument("--alias", default="champion")
    p.add_argument(
        "--allow-worse", action="store_true", help="promote even if worse than the current holder (recorded)"
    )
    p.add_argument("--tracking-uri", default=None, help=uri_help)
    p.set_defaults(func=cmd_promote)
    _register_data(subparsers)

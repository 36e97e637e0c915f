"""`fedmedclip stack|track|register|promote|card|data|backbone push`: the MLOps sub-commands (entry point `fedmedclip.commands`).

Nothing heavy is imported here (no mlflow, boto3): `fedmedclip train` loads this module on every start.
stdout carries only what scripts capture (run id, version number, export lines); the rest goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_port_options(p: argparse.ArgumentParser) -> None:
    """--s3-port and --mlflow-port of a new local stack (`stack up`, `demo`): components.stack.stack_ports."""
    p.add_argument(
        "--s3-port",
        type=int,
        default=None,
        help="S3 (moto) port (default: $FEDMEDCLIP_S3_PORT, else 9000, else a free port, said when chosen)",
    )
    p.add_argument(
        "--mlflow-port",
        type=int,
        default=None,
        help="MLflow port (default: $FEDMEDCLIP_MLFLOW_PORT, else 5000, else a free port, said when chosen)",
    )


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
        add_port_options(p)
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


def _site_names(args) -> list[str]:
    from fedmedclip.errors import ConfigError

    from .policies import default_site_names

    if args.site_names:
        names = [n.strip() for n in args.site_names.split(",") if n.strip()]
        if args.sites is not None and args.sites != len(names):
            raise ConfigError(f"--sites {args.sites} but --site-names names {len(names)} sites: {names}")
        return names
    return default_site_names(args.sites if args.sites is not None else 3)


def cmd_stack_up(args) -> int:
    from .stack import DEFAULT_DATA_BUCKET, stack_status, start_stack

    was_running = stack_status(args.data_dir).running
    info = start_stack(
        args.data_dir,
        s3_port=args.s3_port,
        mlflow_port=args.mlflow_port,
        host=args.host,
        site_names=_site_names(args),
        data_roots=args.data_bucket or [DEFAULT_DATA_BUCKET],
    )
    status = stack_status(args.data_dir)
    if was_running:
        print(
            "already running (ports, sites and buckets as recorded; stop it first to change them)",
            file=sys.stderr,
        )
    print(status.describe(), file=sys.stderr)
    print(
        f"S3 lives in moto's memory: artifacts do not survive `fedmedclip stack down`.\n"
        f"S3 enforces per-role credentials (in {info.data_dir}/stack.json, readable by you only).\n"
        f'a party\'s shell: eval "$(fedmedclip stack env --data-dir {info.data_dir} --role ROLE)" with ROLE one '
        f"of {', '.join(info.role_names)}; without --role: the admin key (bootstrap and operators only)",
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

    info = running_stack(args.data_dir)
    print(info.export_lines(args.role))
    if args.role is None:
        print(
            "(these are the stack's ADMIN credentials, for bootstrap and operators; a party of the federation "
            "uses its own: --role " + "|".join(info.role_names) + ")",
            file=sys.stderr,
        )
    return 0


def cmd_stack_add_bucket(args) -> int:
    from .stack import add_data_root

    info = add_data_root(args.data_dir, args.root)
    print(
        f"roles {', '.join(r for r in info.roles if r != 'mlflow')} granted on {args.root} (versioned); "
        f"data roots: {', '.join(info.data_roots)}",
        file=sys.stderr,
    )
    return 0


@_mlflow_errors
def cmd_track(args) -> int:
    from .tracking import log_run_dir, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    run_id = log_run_dir(
        args.run_dir,
        args.experiment,
        tracking_uri=uri,
        run_name=args.run_name,
        include_site_models=args.include_site_models,
        kfp_run_id=args.kfp_run_id,
    )
    from mlflow import MlflowClient

    from .tracking import experiment_ui_url

    exp = MlflowClient(uri).get_run(run_id).info.experiment_id
    print(
        f"logged {args.run_dir} to experiment {args.experiment!r}: {experiment_ui_url(uri, exp, run_id)}",
        file=sys.stderr,
    )
    print(run_id)
    return 0


@_mlflow_errors
def cmd_register(args) -> int:
    from .tracking import register_model

    mv = register_model(args.run_id, args.name, onnx_path=args.onnx, tracking_uri=args.tracking_uri)
    sha = mv.tags.get("onnx_sha256")
    print(
        ("already registered: " if mv.existing else "registered ")
        + f"{mv.uri} from run {mv.run_id}"
        + (f" (onnx_sha256 {sha})" if sha else ""),
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
        allow_different_data=args.allow_different_data,
        max_epsilon=args.max_epsilon,
    )
    print(result.describe())
    return 0


@_mlflow_errors
def cmd_card(args) -> int:
    from pathlib import Path

    if Path(args.model).is_dir():  # a run directory: its card, without the registry's facts
        from fedmedclip.model_card import build_card, render_markdown

        card = build_card(args.model)
        print(json.dumps(card, indent=1) if args.json else render_markdown(card))
        return 0
    from .model_card import read_model_card

    print(read_model_card(args.model, "json" if args.json else "md", tracking_uri=args.tracking_uri))
    return 0


def _stack_credentials_for(role: str, root: str | None) -> None:
    """Without S3 credentials in the environment: `role`'s from the recorded local stack, which is granted
    on `root` first if it is not yet (as the stack's admin, whose key is in the same state file)."""
    from .stack import add_data_root, use_recorded_stack_s3

    info = use_recorded_stack_s3(role=role)
    if info is not None and root is not None and root not in info.data_roots:
        add_data_root(info.data_dir, root)
        print(f"local stack: roles granted on the new data root {root}", file=sys.stderr)


def cmd_backbone(args) -> int:
    """`backbone push DIR --to URL` publishes a CLIP directory; `backbone SPEC` with an s3:// or models:/
    spec downloads and checks it into the cache first; any other spec goes to the core's handler as it is."""
    from fedmedclip.errors import ConfigError

    if args.spec == "push":
        if not args.directory or not args.to:
            raise ConfigError("usage: fedmedclip backbone push DIR --to s3://BUCKET/PREFIX (or models:/NAME)")
        from .backbones import push_backbone
        from .stack import use_recorded_stack_s3

        _quiet_mlflow()
        use_recorded_stack_s3()  # like `data publish`: the local stack when the environment names no S3
        published = push_backbone(args.directory, args.to, tracking_uri=args.tracking_uri)
        print(published.describe(), file=sys.stderr)
        print(published.spec)
        return 0
    if args.directory or args.to:
        raise ConfigError(
            f"`fedmedclip backbone {args.spec} {args.directory or ''}`: only `backbone push DIR --to URL` "
            "takes a directory and --to"
        )
    from .backbones import is_remote_backbone, resolve_backbone

    if is_remote_backbone(args.spec):
        _quiet_mlflow()
        from .stack import use_recorded_stack_s3

        use_recorded_stack_s3()
        local = resolve_backbone(args.spec, args.cache_dir, tracking_uri=args.tracking_uri)
        print(f"{args.spec}: checked copy in {local}", file=sys.stderr)
        args.spec = local
    if args.core_backbone is not None:
        return args.core_backbone(args)
    import json

    from fedmedclip.backbone import load_backbone

    print(json.dumps(load_backbone(args.spec).identity(), indent=2))
    return 0


def cmd_data_publish(args) -> int:
    from fedmedclip.flags import config_from_args

    from .site_data import is_s3, parse_bucket, parse_root, publish, publish_site

    if args.site is None:
        bucket = parse_bucket(args.to)
    elif is_s3(args.to):
        bucket, prefix = parse_root(args.to)
    cfg = config_from_args(args)
    if args.site is not None:
        if is_s3(args.to):  # the site's own role, like a hospital holding only its own Secret
            _stack_credentials_for(args.site, "/".join(filter(None, (bucket, prefix))))
        summary = publish_site(
            cfg, args.site, args.to, progress=not args.quiet, allow_outside_root=args.allow_outside_root
        )
        samples = ", ".join(f"{s} {n}" for s, n in summary["samples"].items())
        moved = "uploaded" if is_s3(args.to) else "written"
        print(
            f"published {args.site}'s {summary['images']} images (site {summary['index']}: {samples}) to "
            f"{summary['location']} ({summary['bytes_uploaded'] / 1e6:.1f} MB {moved}), with its catalog and "
            "its summary for the server",
            file=sys.stderr,
        )
        return 0
    _stack_credentials_for("publisher", bucket)  # the local stack when the environment names no credentials
    summary = publish(cfg, bucket, progress=not args.quiet, allow_outside_root=args.allow_outside_root)
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


def delete_every_version(client, bucket: str, key: str) -> int:
    """Delete `key` and all its earlier versions (a versioned bucket keeps them) without listing, which a
    site's role may not: HEAD gives the current version, which is deleted until none is left. Returns how many
    versions went."""
    from botocore.exceptions import ClientError

    gone = 0
    while True:
        try:
            version = client.head_object(Bucket=bucket, Key=key).get("VersionId")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return gone
            raise
        if version in (None, "", "null"):
            client.delete_object(Bucket=bucket, Key=key)
            return gone + 1
        client.delete_object(Bucket=bucket, Key=key, VersionId=version)
        gone += 1


def cmd_data_withdraw(args) -> int:
    """A hospital withdraws its published data with its own key: every version of its images (the ids its
    catalog lists), then its catalog and its summary. Its private state is its own to delete as well."""
    import json

    import boto3
    from botocore.exceptions import ClientError

    from fedmedclip.errors import ConfigError, DataError
    from fedmedclip.paths import check_relative_id

    from .site_data import parse_root

    bucket, prefix = parse_root(args.from_)
    root = "/".join(filter(None, (bucket, prefix)))
    index = args.site_index
    if args.site is not None:
        from .stack import use_recorded_stack_s3

        info = use_recorded_stack_s3(role=args.site)  # the local stack: the site's own key and index
        if info is not None and args.site in info.roles:
            index = info.roles[args.site].site_index if index is None else index
    if index is None:
        raise ConfigError(
            "give --site-index K (the k of sites/<k>/ and of the Secret fedmedclip-site-<k>-s3)"
        )
    base = f"{prefix}/" if prefix else ""
    client = boto3.client("s3")
    catalog_key = f"{base}sites/{index}/catalog.json"
    try:
        catalog = json.loads(client.get_object(Bucket=bucket, Key=catalog_key)["Body"].read(64 << 20))
    except ClientError as e:
        raise DataError(
            f"cannot read s3://{bucket}/{catalog_key}: {e.response.get('Error', {}).get('Code')}"
        ) from None
    ids = [check_relative_id(i, f"s3://{bucket}/{catalog_key}") for i in (catalog.get("md5") or {})]
    versions = 0
    try:
        for image_id in ids:
            versions += delete_every_version(client, bucket, f"{base}sites/{index}/images/{image_id}")
        for key in (catalog_key, f"{base}summaries/sites/{index}.json"):
            versions += delete_every_version(client, bucket, key)
    except ClientError as e:
        raise DataError(f"withdrawing site {index}'s data from s3://{root} failed: {e}") from None
    print(
        f"withdrew site {index}'s {len(ids)} images, catalog and summary from s3://{root} ({versions} object "
        "versions deleted)",
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
    d.add_argument(
        "--to",
        default="s3://fedmedclip-data",
        help="the data bucket (default: %(default)s); with --site also s3://BUCKET/PREFIX or a local directory",
    )
    d.add_argument(
        "--site",
        default=None,
        metavar="NAME",
        help="upload only site NAME's share of the partition (its images, catalog and summary), with that "
        "site's own credentials: a hospital onboarding itself; nothing else in the bucket is touched",
    )
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    # The data and partition settings, spelled as in `fedmedclip train` (one definition: fedmedclip/flags.py).
    from fedmedclip.flags import DATA_FIELDS, add_config_arguments

    add_config_arguments(d, include=DATA_FIELDS, exclude=("skip_bad_images",), title="data and partition")
    d.set_defaults(func=cmd_data_publish)
    w = sub.add_parser(
        "withdraw",
        help="a site deletes its own published images (every version), its catalog and its summary, with its "
        "own key",
    )
    w.add_argument("--from", dest="from_", required=True, help="the data root: s3://BUCKET[/PREFIX]")
    w.add_argument("--site-index", type=int, default=None, help="the site's k (its prefix sites/<k>/)")
    w.add_argument(
        "--site",
        default=None,
        help="on the local stack: the site's role name (its key and its k from the stack)",
    )
    w.set_defaults(func=cmd_data_withdraw)


def _register_backbone(subparsers) -> None:
    """`backbone push` and remote specs, added to the core's `backbone SPEC` command (which prints a
    backbone's identity) without changing it: its handler still serves every other spec."""
    p = subparsers.choices.get("backbone")
    if p is None:  # this layer's commands without the core's (its own tests)
        p = subparsers.add_parser("backbone", help="load a backbone offline and print its identity")
        p.add_argument("spec", help="a backbone spec, or `push`")
    p.add_argument("directory", nargs="?", metavar="DIR", help="with `push`: the CLIP directory to publish")
    p.add_argument(
        "--to", default=None, help="with `push`: s3://BUCKET/PREFIX or models:/NAME (the MLflow registry)"
    )
    p.add_argument(
        "--cache-dir",
        default=".cache/fedmedclip",
        help="where s3:// and models:/ backbones are downloaded (<cache-dir>/backbones/; default: %(default)s)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow for models:/ (default: $MLFLOW_TRACKING_URI, else .stack/)",
    )
    p.epilog = (
        "SPEC: tiny | random-vit-b32 | random-vit-b16 | a local CLIP directory | a cached Hugging Face id | "
        "s3://BUCKET/PREFIX or models:/NAME/VERSION, models:/NAME@ALIAS (downloaded into --cache-dir and "
        "checked against the weights hash recorded when pushed).  "
        "`fedmedclip backbone push DIR --to s3://BUCKET/PREFIX|models:/NAME` publishes DIR for the pods; "
        "it prints the spec to pass as --backbone."
    )
    p.set_defaults(func=cmd_backbone, core_backbone=p.get_default("func"))


def register(subparsers) -> None:
    """Add `stack`, `track`, `register`, `promote`, `card`, `data`, `backbone push` to the `fedmedclip` command line."""
    p = subparsers.add_parser(
        "stack", help="local S3 (moto) + MLflow servers for development, demos and tests"
    )
    stack_sub = p.add_subparsers(dest="stack_command", metavar="ACTION", required=True)
    s = stack_sub.add_parser(
        "up",
        help="start the servers in the background and wait until they answer; S3 enforces one IAM user per "
        "role (publisher, server, each site, mlflow)",
    )
    _add_stack_options(s, ports=True)
    s.add_argument("--sites", type=int, default=None, help="site roles site_0..site_{N-1} (default 3)")
    s.add_argument(
        "--site-names", default=None, help="comma-separated site role names instead (site k = the k-th name)"
    )
    s.add_argument(
        "--data-bucket",
        action="append",
        default=None,
        metavar="BUCKET[/PREFIX]",
        help="a data bucket (or mailbox root) the roles are granted on, created versioned; repeatable "
        "(default: fedmedclip-data; more later: `stack add-bucket`)",
    )
    s.set_defaults(func=cmd_stack_up)
    s = stack_sub.add_parser("down", help="stop the servers (idempotent); S3 contents are lost")
    _add_stack_options(s, ports=False)
    s.add_argument("--purge", action="store_true", help="also delete the MLflow database")
    s.set_defaults(func=cmd_stack_down)
    s = stack_sub.add_parser("status", help="are the servers running and answering? (exit 1 if not)")
    _add_stack_options(s, ports=False)
    s.set_defaults(func=cmd_stack_status)
    s = stack_sub.add_parser(
        "env",
        help='print export lines for a client: eval "$(fedmedclip stack env --role site_0)"; without --role '
        "the ADMIN key (bootstrap and operators only)",
    )
    _add_stack_options(s, ports=False)
    s.add_argument(
        "--role",
        default=None,
        help="publisher, server, a site's name (site_0, ...), mlflow or admin (default: admin, as before)",
    )
    s.set_defaults(func=cmd_stack_env)
    s = stack_sub.add_parser(
        "add-bucket", help="grant every data role on another bucket (or BUCKET/PREFIX), created versioned"
    )
    _add_stack_options(s, ports=False)
    s.add_argument(
        "root", metavar="BUCKET[/PREFIX]", help="the bucket (created versioned) or a mailbox root in it"
    )
    s.set_defaults(func=cmd_stack_add_bucket)

    uri_help = (
        "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the running local stack of $FEDMEDCLIP_STACK_DIR "
        "or .stack/, else an error)"
    )

    p = subparsers.add_parser(
        "track",
        help="log a finished run directory to MLflow afterwards, each round at its recorded time; prints the "
        "run id (`train --track` logs while it runs)",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="output of `fedmedclip train --out RUN_DIR`")
    p.add_argument("--experiment", default="fedmedclip", help="MLflow experiment (created if missing)")
    p.add_argument("--run-name", default=None, help="default: the run directory's name")
    p.add_argument("--tracking-uri", default=None, help=uri_help)
    p.add_argument(
        "--include-site-models",
        action="store_true",
        help="also log the sites' private heads (model/site_*.safetensors); by default they stay off the "
        "central MLflow",
    )
    p.add_argument("--kfp-run-id", default=None, help="the Kubeflow run this run belongs to (tag kfp.run_id)")
    p.set_defaults(func=cmd_track)

    p = subparsers.add_parser(
        "register", help="register a tracked run's model as a new version; prints the version number"
    )
    p.add_argument(
        "run_id",
        metavar="RUN_ID",
        help="the MLflow run of a tracked run directory (what `fedmedclip track` or `train --track` prints)",
    )
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
    p.add_argument("name", metavar="NAME", help="the registered model")
    p.add_argument("--version", required=True, help="the version to promote (what `register` printed)")
    p.add_argument(
        "--alias",
        default="champion",
        help="the alias to move to it; serve it with models:/NAME@ALIAS (default: %(default)s)",
    )
    p.add_argument(
        "--allow-worse", action="store_true", help="promote even if worse than the current holder (recorded)"
    )
    p.add_argument(
        "--allow-different-data",
        action="store_true",
        help="compare with the current holder even if trained on another data set or partition (recorded)",
    )
    p.add_argument(
        "--max-epsilon",
        type=float,
        default=None,
        metavar="EPSILON",
        help="refuse a version trained without record-level differential privacy or with a larger epsilon "
        "(the largest over its sites)",
    )
    p.add_argument("--tracking-uri", default=None, help=uri_help)
    p.set_defaults(func=cmd_promote)

    p = subparsers.add_parser(
        "card",
        help="print the model card of a registered version (NAME@ALIAS or NAME/VERSION) or a run directory",
    )
    p.add_argument("model", metavar="NAME@ALIAS", help="NAME@ALIAS, NAME/VERSION, or a run directory")
    p.add_argument("--json", action="store_true", help="the card's JSON instead of its Markdown")
    p.add_argument("--tracking-uri", default=None, help=uri_help)
    p.set_defaults(func=cmd_card)
    _register_data(subparsers)
    _register_backbone(subparsers)

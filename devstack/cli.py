"""`fedmedclip stack up|down|status|env|add-bucket`: the local development stack's commands (entry point
`fedmedclip.commands`, name `devstack`). Nothing heavy is imported here."""

from __future__ import annotations

import argparse
import sys

from fedmedclip.paths import check_folder_flag


def add_port_options(p: argparse.ArgumentParser) -> None:
    """--s3-port and --mlflow-port of a new local stack (`stack up`, `demo`): devstack.stack.stack_ports."""
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
        "--stack-dir",  # the name `demo` gives it
        default=_stack_dir_default(),
        help="where the stack keeps stack.json, logs and the MLflow database (default: $FEDMEDCLIP_STACK_DIR or .stack)",
    )
    if ports:
        add_port_options(p)
        p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")


def _site_names(args) -> list[str]:
    from fedmedclip.errors import ConfigError
    from mlops.policies import default_site_names

    if args.site_names is not None:
        names = [n.strip() for n in args.site_names.split(",")]
        if not all(names):  # ",," named no site; "a,,b" a typo: neither starts a stack without site roles
            raise ConfigError(
                f"--site-names {args.site_names!r}: a site name is empty; give comma-separated names, "
                "e.g. --site-names charite,ucsf"
            )
        if args.sites is not None and args.sites != len(names):
            raise ConfigError(f"--sites {args.sites} but --site-names names {len(names)} sites: {names}")
        return names
    return default_site_names(args.sites if args.sites is not None else 3)


def cmd_stack_up(args) -> int:
    from .stack import DEFAULT_DATA_BUCKET, earlier_registry_note, stack_status, start_stack

    check_folder_flag("--data-dir", args.data_dir)  # before anything is written or started
    was_running = stack_status(args.data_dir).running
    stale = None if was_running else earlier_registry_note(args.data_dir)
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
    if stale:
        print(f"warning: {stale}", file=sys.stderr)
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
        kept = (
            "" if args.purge else "; the MLflow database is kept, its artifacts are not: --purge removes it"
        )
        print(f"stopped {', '.join(stopped)} (S3 contents are gone{kept})", file=sys.stderr)
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

    check_folder_flag("--data-dir", args.data_dir)
    root = args.root.removeprefix("s3://")  # as `data publish --to` spells it; it was "'s3:' is not a bucket"
    info = add_data_root(args.data_dir, root)
    print(
        f"roles {', '.join(r for r in info.roles if r != 'mlflow')} granted on {root.strip('/')} (versioned); "
        f"data roots: {', '.join(info.data_roots)}",
        file=sys.stderr,
    )
    return 0


def register(subparsers) -> None:
    """Add `stack` to the `fedmedclip` command line."""
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
        help="publisher, server, a site's name (site_0, ...), mlflow or admin (default: admin)",
    )
    s.set_defaults(func=cmd_stack_env)
    s = stack_sub.add_parser(
        "add-bucket", help="grant every data role on another bucket (or BUCKET/PREFIX), created versioned"
    )
    _add_stack_options(s, ports=False)
    s.add_argument(
        "root",
        metavar="BUCKET[/PREFIX]",
        help="the bucket (created versioned) or a mailbox root in it; s3:// in front is accepted",
    )
    s.set_defaults(func=cmd_stack_add_bucket)

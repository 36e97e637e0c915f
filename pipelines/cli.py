"""`fedmedclip pipeline compile|run --local|submit` and `fedmedclip demo` (entry point `pipelines`).

The configuration's flags come from fedmedclip/flags.py (one definition with `train`), and the configuration is
validated here, before anything is compiled or submitted: an unknown method, option, codec or partition fails
at once with exit status 2, before any pod (or local task) starts.
Nothing heavy is imported at module level (docs/contracts.md): kfp, torch and mlflow load in the handlers."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_YAML = str(Path(__file__).with_name("fedmedclip_pipeline.yaml"))
LOCAL_CACHE = ".cache/fedmedclip"
POD_CACHE = "/tmp/fedmedclip-cache"  # pipelines.pipeline.POD_CACHE_DIR (not imported: it pulls kfp)
DEMO_ROUNDS = 30  # a round costs a fraction of a second: enough of them to see the model learn
# A local run is on one machine: a site that cannot start is reported within minutes, not the cluster's hour.
LOCAL_JOIN_TIMEOUT = 900.0
# TrainConfig fields that are not pipeline parameters (components.kfp_components.NOT_PARAMETERS).
NOT_PIPELINE_FIELDS = ("federation", "out", "aggregator", "duplicates")  # see kfp_components.NOT_PARAMETERS


# ------------------------------------------------------------------------------------------- flags
def _compile_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compile options (fixed in the graph; sites and rounds are run-time parameters)")
    g.add_argument("--base-image", default=None, help="the components' image (default: the training image)")
    g.add_argument("--no-gpu", action="store_true", help="request no GPU for feature extraction")
    g.add_argument(
        "--gpu-node-selector",
        action="append",
        default=[],
        metavar="LABEL=VALUE",
        help="node selector of the extraction tasks (repeatable), e.g. nvidia.com/gpu.present=true",
    )
    g.add_argument(
        "--gpu-toleration",
        action="append",
        default=[],
        metavar="KEY[=VALUE][:EFFECT]",
        help="toleration of the extraction tasks (repeatable), e.g. nvidia.com/gpu:NoSchedule",
    )
    g.add_argument(
        "--resources",
        action="append",
        default=[],
        metavar="KIND=CPU_REQ,CPU_LIM,MEM_REQ,MEM_LIM",
        help="requests and limits of a kind of task (prepare, extract, worker, report, export, register), "
        "e.g. worker=2,4,8Gi,16Gi",
    )
    g.add_argument(
        "--timeout", action="append", default=[], metavar="KIND=SECONDS", help="a kind of task's time limit"
    )
    g.add_argument(
        "--worker-retries",
        type=int,
        default=None,
        help="retries of a failed worker (default: 5, with backoff)",
    )


def compile_options_from_args(args):
    from fedmedclip.errors import ConfigError
    from pipelines.pipeline import DEFAULT_RESOURCES, DEFAULT_RETRIES, CompileOptions, Resources, Retry

    def pairs(items, flag):
        out = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"{flag} {item!r} must look like KEY=VALUE")
            out[key.strip()] = value.strip()
        return out

    resources = dict(DEFAULT_RESOURCES)
    for kind, spec in pairs(args.resources, "--resources").items():
        parts = spec.split(",")
        if kind not in resources or len(parts) != 4:
            raise ConfigError(
                f"--resources {kind}={spec}: give one of {', '.join(resources)} and four values "
                "CPU_REQ,CPU_LIM,MEM_REQ,MEM_LIM"
            )
        resources[kind] = Resources(*parts)
    from pipelines.pipeline import DEFAULT_TIMEOUTS

    timeouts = dict(DEFAULT_TIMEOUTS)
    for kind, seconds in pairs(args.timeout, "--timeout").items():
        if kind not in timeouts or not seconds.isdigit():
            raise ConfigError(
                f"--timeout {kind}={seconds}: give one of {', '.join(timeouts)} and whole seconds"
            )
        timeouts[kind] = int(seconds)
    retries = dict(DEFAULT_RETRIES)
    if args.worker_retries is not None:
        retries["worker"] = Retry(args.worker_retries)
    tolerations = []
    for item in args.gpu_toleration:
        key_value, _, effect = item.partition(":")
        key, sep, value = key_value.partition("=")
        tolerations.append(
            {
                "key": key,
                "operator": "Equal" if sep else "Exists",
                "value": value if sep else None,
                "effect": effect or None,
            }
        )
    return CompileOptions(
        base_image=args.base_image,
        gpu=not args.no_gpu,
        gpu_node_selector=pairs(args.gpu_node_selector, "--gpu-node-selector"),
        gpu_tolerations=tuple(tolerations),
        resources=resources,
        timeouts=timeouts,
        retries=retries,
    )


def _pipeline_params(p: argparse.ArgumentParser, defaults: dict) -> None:
    from fedmedclip.flags import FLAGS, add_config_arguments

    fields = tuple(f.field for f in FLAGS if f.field not in NOT_PIPELINE_FIELDS)
    add_config_arguments(p, include=fields, defaults=defaults, title="the run (as in `train`)")
    g = p.add_argument_group("the federation")
    g.add_argument(
        "--site-names", default="", help="comma-separated site names, checked against the partition's"
    )
    g.add_argument(
        "--mailbox",
        default="",
        help="where the parties exchange modules: s3://BUCKET[/PREFIX] (default: the data's bucket for s3:// "
        "data; locally a folder under the pipeline root)",
    )
    g.add_argument(
        "--quorum", type=int, default=0, help="fewest sites per round after a timeout (0: every site)"
    )
    g.add_argument(
        "--round-timeout", type=float, default=600.0, help="seconds a round waits (default: %(default)s)"
    )
    g.add_argument(
        "--join-timeout", type=float, default=None, help="seconds round 1 waits while sites prepare"
    )
    g = p.add_argument_group("export, tracking and registry")
    g.add_argument("--export-site", default="global", help="model to export to ONNX ('' skips the export)")
    g.add_argument(
        "--tracking-uri", default="", help="MLflow server ('': $MLFLOW_TRACKING_URI or no tracking)"
    )
    g.add_argument("--experiment", default="fedmedclip", help="MLflow experiment (default: %(default)s)")
    g.add_argument("--model-name", default="fedmedclip", help="registered model (default: %(default)s)")
    g.add_argument("--alias", default="champion", help="alias to promote to ('' registers only)")
    g.add_argument("--allow-worse", action="store_true", help="promote even below the current alias holder")
    g.add_argument(
        "--allow-different-data",
        action="store_true",
        help="promote even when the alias holder was trained on other data or another partition",
    )


def validated_config(args):
    """The run's configuration, validated before anything is compiled or started (ConfigError: exit 2)."""
    from fedmedclip.flags import config_from_args

    return config_from_args(args, federation="federated", out="")


def pipeline_arguments(args, cfg, local_stack: str = "") -> dict:
    """The pipeline's run-time parameters for this command line."""
    from components.kfp_components import config_to_parameters

    params = config_to_parameters(cfg)
    params.update(
        site_names=args.site_names,
        mailbox=args.mailbox,
        quorum=args.quorum,
        round_timeout=args.round_timeout,
        export_site=args.export_site,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        model_name=args.model_name,
        promote_alias=args.alias,
        allow_worse=args.allow_worse,
        allow_different_data=args.allow_different_data,
        local_stack=local_stack,
    )
    if args.join_timeout is not None:
        params["join_timeout"] = args.join_timeout
    return params


def _compile(args, out: str) -> Path:
    from pipelines.pipeline import compile_pipeline

    return compile_pipeline(out, compile_options_from_args(args))


# ------------------------------------------------------------------------------------------- commands
def cmd_compile(args) -> int:
    path = _compile(args, args.out)
    print(
        f"compiled -> {path} ({path.stat().st_size / 1e3:.1f} kB; sites and rounds are run-time parameters)"
    )
    return 0


def _local_stack_for(cfg, args) -> str:
    """The local stack whose per-role keys the local tasks take when they touch S3 (s3:// data or mailbox)."""
    if getattr(args, "local_stack", None):
        return str(Path(args.local_stack).resolve())
    if not (cfg.data.startswith("s3://") or str(args.mailbox).startswith("s3://")):
        return ""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return ""  # the environment's own credentials, for every task
    from components.stack import read_state, recorded_stack_dir

    stack = recorded_stack_dir()
    return str(Path(stack).resolve()) if read_state(stack) is not None else ""


def _local_paths(cfg) -> None:
    # Tasks run with this process's working directory; a relative path would be ambiguous.
    cfg.cache_dir = str(Path(cfg.cache_dir).resolve())
    if cfg.data != "synthetic" and "://" not in cfg.data:
        cfg.data = str(Path(cfg.data).resolve())


def cmd_run(args) -> int:
    from fedmedclip.errors import FedMedClipError

    if not args.local:
        raise FedMedClipError(
            "only --local runs here; use `fedmedclip pipeline submit --host URL` for a cluster"
        )
    cfg = validated_config(args)  # before anything is compiled or started
    _local_paths(cfg)
    root = Path(args.pipeline_root or tempfile.mkdtemp(prefix="fedmedclip-kfp-")).resolve()
    run = _run_local(args, cfg, root, _local_stack_for(cfg, args))
    _print_run(run)
    return 0


def _run_local(args, cfg, root: Path, local_stack: str):
    from pipelines.local import run_local

    root.mkdir(parents=True, exist_ok=True)
    if not args.mailbox and not cfg.data.startswith("s3://"):
        args.mailbox = str(root / "mailbox")
    if args.join_timeout is None:
        args.join_timeout = LOCAL_JOIN_TIMEOUT
    params = pipeline_arguments(args, cfg, local_stack)
    yaml_path = Path(args.yaml) if args.yaml else _compile(args, str(root / "pipeline.yaml"))
    log_path = root / "pipeline.log"
    if not args.verbose:
        print(f"running the pipeline locally; task logs: {log_path}", flush=True)
    with _kfp_chatter_off(not args.verbose):
        return run_local(
            yaml_path,
            root,
            args.out,
            log_path=None if args.verbose else log_path,
            progress=not args.quiet,
            **params,
        )


@contextlib.contextmanager
def _kfp_chatter_off(active: bool):
    """kfp.local logs every loop item it selects at INFO on the root logger, whose console handler our CLI set
    up: keep kfp's records below WARNING off the console (they are in the task log)."""
    if not active:
        yield
        return
    marker = f"{os.sep}kfp{os.sep}"

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or marker not in record.pathname

    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(keep)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(keep)


def learning_curve(results: dict) -> str:
    """Round 1 against the selected round: what a newcomer looks at to see the federation learn."""
    hist = results["history"]
    first = hist[0]
    best = next(h for h in hist if h["round"] == results["metrics"]["best_round"])

    def sites(h):
        accs = [s["acc"] for s in h["sites"] if s.get("acc") is not None]
        return sum(accs) / len(accs) if accs else float("nan")

    return (
        f"learning: round {first['round']}: global acc {first['global']['acc']:.3f}, sites {sites(first):.3f}"
        f"  ->  round {best['round']}: global acc {best['global']['acc']:.3f}, sites {sites(best):.3f}"
    )


def _print_run(run) -> None:
    from fedmedclip.cli import print_summary

    print(f"\npipeline finished in {run.seconds:.1f} s; task artifacts and logs: {run.pipeline_root}")
    print_summary(run.results, str(run.run_dir))
    print(learning_curve(run.results))
    print(f"model: {run.model_uri}" if run.model_uri else "model: not registered (no tracking server)")


def cmd_submit(args) -> int:
    cfg = validated_config(args)  # before anything is compiled or submitted
    import kfp

    params = pipeline_arguments(args, cfg)
    yaml_path = args.yaml or _compile(
        args, str(Path(tempfile.mkdtemp(prefix="fedmedclip-kfp-")) / "pipeline.yaml")
    )
    client = kfp.Client(host=args.host, namespace=args.namespace)
    result = client.create_run_from_pipeline_package(
        str(yaml_path),
        arguments=params,
        run_name=args.run_name,
        experiment_name=args.experiment_name,
        namespace=args.namespace,
        enable_caching=not args.no_cache,
    )
    print(f"submitted run {result.run_id}: {args.host.rstrip('/')}/#/runs/details/{result.run_id}")
    return 0


def cmd_demo(args) -> int:
    """The newcomer path: local stack, data in its S3 one prefix per site, the pipeline on this machine with
    each task holding only its own role's key, a live MLflow run, a registered and promoted model."""
    from components.policies import default_site_names
    from components.stack import start_stack
    from fedmedclip.errors import ConfigError

    cfg = validated_config(args)
    _local_paths(cfg)
    ports = {k: v for k, v in (("s3_port", args.s3_port), ("mlflow_port", args.mlflow_port)) if v}
    names = default_site_names(cfg.sites or 3) if cfg.partition != "natural" else None
    info = start_stack(args.stack_dir, site_names=names, **ports)  # the running stack when it is already up
    missing = [n for n in names or [] if n not in info.site_names]
    if missing:
        raise ConfigError(
            f"the local stack in {info.data_dir} has roles for {', '.join(info.site_names)}, not for "
            f"{', '.join(missing)}: `fedmedclip stack down --data-dir {args.stack_dir}` and run the demo again"
        )
    print(f"local stack up: MLflow {info.tracking_uri}, S3 {info.s3_endpoint}")
    args.tracking_uri = args.tracking_uri or info.tracking_uri
    if not args.local_data:
        cfg.data = _publish_for_demo(cfg, info, args.quiet)
    root = Path(args.pipeline_root or tempfile.mkdtemp(prefix="fedmedclip-demo-")).resolve()
    run = _run_local(args, cfg, root, info.data_dir)
    _print_run(run)
    print(f"\nMLflow UI:  {info.tracking_uri}\nmodel URI:  {run.model_uri or '(registration failed)'}")
    if run.model_uri and "@" not in run.model_uri:
        print(
            f"(registered but not promoted; `fedmedclip promote {args.model_name} --version ... --alias "
            f"{args.alias} --allow-worse` overrides)"
        )
    return 0


def _publish_for_demo(cfg, info, quiet: bool) -> str:
    """Publish the demo's data to the local stack's S3, one prefix per site, as the publisher role; one bucket
    per (source, partition), so a later demo reuses it and another data set never collides."""
    from components.site_data import partition_settings, publish
    from components.stack import add_data_root, use_stack_s3
    from fedmedclip.features import canonical_digest

    key = {"data": cfg.data, "synthetic": cfg.synthetic, **partition_settings(cfg)}
    bucket = f"fedmedclip-demo-{canonical_digest(key)[:12]}"
    add_data_root(info.data_dir, bucket)  # the bucket, and every role's policy on it (as the admin)
    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3")
    }
    try:
        use_stack_s3(info, role="publisher")
        summary = publish(cfg, bucket, progress=not quiet)
    finally:  # the tasks take their own roles' keys; none inherits the publisher's
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    per_site = ", ".join(f"{s} {n}" for s, n in summary["sites"].items())
    print(
        f"data published to s3://{bucket}: sites/<k>/ per site ({per_site}), server/ {summary['server']} images"
    )
    return f"s3://{bucket}"


# ------------------------------------------------------------------------------------------- registration
def register(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="the Kubeflow pipeline: compile, run locally, submit")
    sub = p.add_subparsers(dest="pipeline_command", metavar="{compile,run,submit}")

    c = sub.add_parser("compile", help="compile the pipeline to IR YAML (the same for any sites and rounds)")
    _compile_options(c)
    c.add_argument("--out", default=DEFAULT_YAML, help="output YAML (default: the committed %(default)s)")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser(
        "run", help="run the compiled pipeline on this machine (kfp.local, every worker at once)"
    )
    r.add_argument(
        "--local", action="store_true", required=True, help="run with kfp.local's SubprocessRunner"
    )
    r.add_argument("--yaml", default=None, help="a compiled YAML to run (default: compile with the options)")
    r.add_argument("--out", default=None, help="copy the run directory here")
    r.add_argument("--pipeline-root", default=None, help="where task artifacts go (default: a temp dir)")
    r.add_argument(
        "--local-stack",
        default=None,
        help="local stack directory whose per-role S3 keys the tasks take (default: the recorded stack, for "
        "s3:// data or mailbox, when the environment holds no S3 key)",
    )
    _compile_options(r)
    _pipeline_params(r, {"cache_dir": LOCAL_CACHE})
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("submit", help="submit to a Kubeflow Pipelines endpoint (kfp.Client)")
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    s.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    s.add_argument("--yaml", default=None, help="compiled YAML (default: compile with the options)")
    s.add_argument("--run-name", default=None)
    s.add_argument("--experiment-name", default="fedmedclip", help="KFP experiment")
    s.add_argument("--no-cache", action="store_true", help="disable KFP step caching for this run")
    _compile_options(s)
    _pipeline_params(s, {"cache_dir": POD_CACHE})
    s.set_defaults(func=cmd_submit)
    p.set_defaults(func=lambda a: (p.print_help(sys.stderr), 2)[1])

    d = subparsers.add_parser(
        "demo",
        help="start the local stack, run the pipeline locally on its S3, register and promote the model",
    )
    d.add_argument("--stack-dir", default=".stack", help="local stack data directory (default: %(default)s)")
    d.add_argument(
        "--s3-port", type=int, default=None, help="S3 port when the stack starts (default: the stack's)"
    )
    d.add_argument("--mlflow-port", type=int, default=None, help="MLflow port when the stack starts")
    d.add_argument("--out", default=None, help="copy the run directory here")
    d.add_argument("--pipeline-root", default=None)
    d.add_argument("--yaml", default=None, help="a compiled YAML to run (default: compile)")
    d.add_argument(
        "--local-data",
        action="store_true",
        help="tasks read --data from this machine's disk instead of from the stack's S3 (one prefix per site)",
    )
    _compile_options(d)
    _pipeline_params(d, {"cache_dir": LOCAL_CACHE, "rounds": DEMO_ROUNDS})
    d.set_defaults(func=cmd_demo)

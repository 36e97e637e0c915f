"""`fedmedclip pipeline compile|run --local|submit` and `fedmedclip demo` (entry point `pipelines`).

Nothing heavy is imported here at module level (docs/contracts.md): kfp, torch and mlflow load in the handlers."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

DEFAULT_SITES = 3  # keep in step with pipelines.pipeline (not imported here: it pulls kfp)
DEFAULT_ROUNDS = 3
DEFAULT_YAML = str(Path(__file__).with_name("fedmedclip_pipeline.yaml"))
# Few rounds keep the demo short (each task is a process); more local work per round makes them count.
DEMO_METHOD_OPTIONS = {"fedmedclip": ["local_epochs=5"]}


def _compile_options(p: argparse.ArgumentParser, rounds_default: int = DEFAULT_ROUNDS) -> None:
    g = p.add_argument_group("compile options (unrolled into the graph)")
    g.add_argument("--sites", type=int, default=DEFAULT_SITES, help="number of sites (default: %(default)s)")
    g.add_argument(
        "--rounds", type=int, default=rounds_default, help="federated rounds (default: %(default)s)"
    )
    g.add_argument(
        "--site-names",
        default=None,
        help="comma-separated site names as the partition names them (default: site_0,site_1,...; "
        "needed for --partition natural)",
    )
    g.add_argument(
        "--base-image", default=None, help="the components' image (default: the project's training image)"
    )
    g.add_argument("--no-gpu", action="store_true", help="do not request a GPU for extraction and training")


def _pipeline_params(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline parameters")
    g.add_argument(
        "--data",
        default="synthetic",
        help="image folder, CSV manifest, 'synthetic', or s3://BUCKET (published by `fedmedclip data publish`)",
    )
    g.add_argument("--method", default="fedmedclip")
    g.add_argument("--partition", default="iid", choices=("iid", "dirichlet", "natural"))
    g.add_argument("--alpha", type=float, default=0.0, help="Dirichlet concentration (dirichlet partition)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--codec", default="fp16-zlib")
    g.add_argument("--backbone", default="tiny")
    g.add_argument("--preprocessing", default="", help="clip | squash (default: the method's recipe)")
    g.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--synthetic", default=None, help="JSON arguments of the synthetic generator")
    g.add_argument("--cache-dir", default=None, help="feature/synthetic cache inside the tasks")
    g.add_argument("--export-site", default="global", help="model to export to ONNX ('' skips the export)")
    g.add_argument("--tracking-uri", default="", help="MLflow server ('' : $MLFLOW_TRACKING_URI or skip)")
    g.add_argument("--experiment", default="fedmedclip")
    g.add_argument("--model-name", default="fedmedclip")
    g.add_argument("--alias", default="champion", help="alias to promote to ('' registers only)")
    g.add_argument("--allow-worse", action="store_true", help="promote even below the current alias holder")


def params_from_args(args, local: bool) -> dict:
    from fedmedclip.config import parse_method_options

    params = {
        "data": args.data,
        "method": args.method,
        "partition": args.partition,
        "alpha": args.alpha,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "codec": args.codec,
        "backbone": args.backbone,
        "preprocessing": args.preprocessing,
        "method_options": json.dumps(parse_method_options(args.method_option)),
        "export_site": args.export_site,
        "tracking_uri": args.tracking_uri,
        "experiment": args.experiment,
        "model_name": args.model_name,
        "promote_alias": args.alias,
        "allow_worse": args.allow_worse,
    }
    if args.synthetic:
        params["synthetic"] = args.synthetic
    if args.cache_dir or local:
        # Locally the tasks share this machine's cache with `fedmedclip train` (same feature stores).
        params["cache_dir"] = str(Path(args.cache_dir or ".cache/fedmedclip").resolve())
    if local and args.data != "synthetic" and not args.data.startswith("s3://"):
        params["data"] = str(Path(args.data).resolve())
    return params


def _compile(args, out: str) -> Path:
    from pipelines.pipeline import compile_pipeline

    names = args.site_names.split(",") if args.site_names else None
    return compile_pipeline(out, args.sites, args.rounds, names, args.base_image, gpu=not args.no_gpu)


def cmd_compile(args) -> int:
    path = _compile(args, args.out)
    print(f"compiled {args.sites} sites x {args.rounds} rounds -> {path}")
    return 0


def cmd_run(args) -> int:
    from fedmedclip.errors import FedMedClipError

    if not args.local:
        raise FedMedClipError(
            "only --local runs here; use `fedmedclip pipeline submit --host URL` for a cluster"
        )

    root = Path(args.pipeline_root or tempfile.mkdtemp(prefix="fedmedclip-kfp-")).resolve()
    yaml_path = Path(args.yaml) if args.yaml else _compile(args, str(root / "pipeline.yaml"))
    run = _run(args, yaml_path, root)
    _print_run(run)
    return 0


def _s3_credentials_from_stack(args) -> None:
    """Local tasks inherit this process's environment: for s3:// data without credentials in it, use the
    local stack's (in a cluster each task gets its own site's Secret instead)."""
    if args.data.startswith("s3://"):
        from components.stack import use_recorded_stack_s3

        use_recorded_stack_s3(getattr(args, "stack_dir", None))


def _run(args, yaml_path: Path, root: Path):
    from pipelines.local import run_local

    _s3_credentials_from_stack(args)
    log_path = root / "pipeline.log"
    if not args.verbose:
        print(f"running the pipeline locally; task logs: {log_path}", flush=True)
    return run_local(
        yaml_path,
        root,
        args.out,
        log_path=None if args.verbose else log_path,
        progress=not args.quiet,
        **params_from_args(args, local=True),
    )


def _print_run(run) -> None:
    m = run.results["metrics"]
    g, s = m["global"], m["site_mean"]
    print(
        f"pipeline finished in {run.seconds:.1f} s (selected round {m['best_round']} of {run.results['rounds']})\n"
        f"  sites, own test splits (mean): acc {s['acc']:.3f}  bacc {s['bacc']:.3f}  f1 {s['f1']:.3f}\n"
        f"  global test set ({g['n']} images): acc {g['acc']:.3f}  bacc {g['bacc']:.3f}  ece {g['ece']:.3f}\n"
        f"run directory: {run.run_dir}  (results.json, plots/accuracy.png, plots/reliability.png)\n"
        f"task artifacts and logs: {run.pipeline_root}"
    )
    print(f"model: {run.model_uri}" if run.model_uri else "model: not registered (no tracking server)")


def cmd_submit(args) -> int:
    import kfp

    yaml_path = args.yaml or _compile(
        args, str(Path(tempfile.mkdtemp(prefix="fedmedclip-kfp-")) / "pipeline.yaml")
    )
    client = kfp.Client(host=args.host, namespace=args.namespace)
    result = client.create_run_from_pipeline_package(
        str(yaml_path),
        arguments=params_from_args(args, local=False),
        run_name=args.run_name,
        experiment_name=args.experiment_name,
        namespace=args.namespace,
        enable_caching=not args.no_cache,
    )
    print(f"submitted run {result.run_id}: {args.host.rstrip('/')}/#/runs/details/{result.run_id}")
    return 0


def cmd_demo(args) -> int:
    """The newcomer path: local stack, pipeline on this machine, MLflow run, registered + promoted model."""
    from components.stack import start_stack

    ports = {k: v for k, v in (("s3_port", args.s3_port), ("mlflow_port", args.mlflow_port)) if v}
    info = start_stack(args.stack_dir, **ports)  # returns the running stack unchanged when it is already up
    print(f"local stack up: MLflow {info.tracking_uri}, S3 {info.s3_endpoint}")
    args.tracking_uri = info.tracking_uri
    if not args.local_data:
        args.data = _publish_for_demo(args, info)
    if not args.method_option and args.method in DEMO_METHOD_OPTIONS:
        args.method_option = DEMO_METHOD_OPTIONS[args.method]
        print(f"demo setting for {args.method}: {' '.join(args.method_option)} (--method-option overrides)")
    root = Path(args.pipeline_root or tempfile.mkdtemp(prefix="fedmedclip-demo-")).resolve()
    yaml_path = _compile(args, str(root / "pipeline.yaml"))
    run = _run(args, yaml_path, root)
    _print_run(run)
    print(f"\nMLflow UI:  {info.tracking_uri}\nmodel URI:  {run.model_uri or '(registration failed)'}")
    if run.model_uri and "@" not in run.model_uri:
        print(
            f"(registered but not promoted: worse than the current @{args.alias}; "
            f"`fedmedclip promote {args.model_name} --version ... --alias {args.alias} --allow-worse` overrides)"
        )
    return 0


def _publish_for_demo(args, info) -> str:
    """Publish the demo's data to the local stack's S3, one prefix per site, as a hospital deployment holds
    it; the pipeline then reads s3://BUCKET and each site's tasks download only their own images. One bucket
    per (source, partition), so re-running the demo reuses it and another data set never collides."""
    from components.site_data import partition_settings, publish
    from components.stack import use_stack_s3
    from fedmedclip.config import TrainConfig
    from fedmedclip.features import canonical_digest

    data = args.data if args.data == "synthetic" else str(Path(args.data).resolve())
    cfg = TrainConfig(
        data=data,
        partition=args.partition,
        alpha=args.alpha or None,
        sites=args.sites,
        seed=args.seed,
        synthetic=json.loads(args.synthetic) if args.synthetic else {},
        cache_dir=str(Path(args.cache_dir or ".cache/fedmedclip").resolve()),
    ).validate()
    key = {"data": data, "synthetic": cfg.synthetic, **partition_settings(cfg)}
    bucket = f"fedmedclip-demo-{canonical_digest(key)[:12]}"
    use_stack_s3(info)
    summary = publish(cfg, bucket, progress=not args.quiet)
    per_site = ", ".join(f"{s} {n}" for s, n in summary["sites"].items())
    print(
        f"data published to s3://{bucket}: sites/<k>/ per site ({per_site}), server/ {summary['server']} images"
    )
    return f"s3://{bucket}"


def register(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="the Kubeflow pipeline: compile, run locally, submit")
    sub = p.add_subparsers(dest="pipeline_command", metavar="{compile,run,submit}")

    c = sub.add_parser("compile", help="compile the pipeline to IR YAML")
    _compile_options(c)
    c.add_argument("--out", default=DEFAULT_YAML, help="output YAML (default: the committed %(default)s)")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="run the pipeline on this machine (kfp.local, no cluster)")
    r.add_argument(
        "--local", action="store_true", required=True, help="run with kfp.local's SubprocessRunner"
    )
    r.add_argument("--yaml", default=None, help="a compiled YAML to run (default: compile with the options)")
    r.add_argument("--out", default=None, help="copy the run directory here")
    r.add_argument("--pipeline-root", default=None, help="where task artifacts go (default: a temp dir)")
    _compile_options(r)
    _pipeline_params(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("submit", help="submit to a Kubeflow Pipelines endpoint (kfp.Client)")
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    s.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    s.add_argument("--yaml", default=None, help="compiled YAML (default: compile with the options)")
    s.add_argument("--run-name", default=None)
    s.add_argument("--experiment-name", default="fedmedclip", help="KFP experiment")
    s.add_argument("--no-cache", action="store_true", help="disable KFP step caching for this run")
    _compile_options(s)
    _pipeline_params(s)
    s.set_defaults(func=cmd_submit)
    p.set_defaults(func=lambda a: (p.print_help(sys.stderr), 2)[1])

    d = subparsers.add_parser(
        "demo", help="start the local stack, run the pipeline locally, register and promote the model"
    )
    d.add_argument("--stack-dir", default=".stack", help="local stack data directory (default: %(default)s)")
    d.add_argument(
        "--s3-port", type=int, default=None, help="S3 port when the stack starts (default: the stack's)"
    )
    d.add_argument("--mlflow-port", type=int, default=None, help="MLflow port when the stack starts")
    d.add_argument("--out", default=None, help="copy the run directory here")
    d.add_argument("--pipeline-root", default=None)
    d.add_argument(
        "--local-data",
        action="store_true",
        help="tasks read --data from this machine's disk instead of from the stack's S3 (one prefix per site)",
    )
    _compile_options(d)
    _pipeline_params(d)
    d.set_defaults(func=cmd_demo)

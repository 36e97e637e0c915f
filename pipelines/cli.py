"""`fedmedclip pipeline compile|run --local|submit` and `fedmedclip demo` (entry point `pipelines`).

The run's flags come from their declarations (fedmedclip/flags.py) and are validated before anything is compiled
or submitted (exit status 2). Nothing heavy at module level (docs/contracts.md): kfp, torch and mlflow load in
the handlers."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import warnings
from dataclasses import asdict, fields
from pathlib import Path

from components.kfp_components import POD_CACHE_DIR, pipeline_settings
from components.run_parameters import RunParameters
from fedmedclip.errors import ConfigError, FedMedClipError
from fedmedclip.flags import COMPILE, PIPELINE, add_config_arguments, config_from_args, options_from_args
from fedmedclip.paths import check_folder_flag
from pipelines.pipeline import DEFAULT_YAML, CompileOptions, compile_pipeline

DEMO_ROUNDS = 30  # a round costs a fraction of a second: enough of them to see the model learn
# A local run is on one machine: a site that cannot start is reported within minutes, not the cluster's hour.
LOCAL_JOIN_TIMEOUT = 900.0


def _compile(args, out: str | Path) -> Path:  # ConfigError for a malformed option
    return compile_pipeline(out, options_from_args(args, CompileOptions))


def _run_flags(p: argparse.ArgumentParser, func, defaults: dict, local: bool = True) -> None:
    """What `run --local`, `submit` and `demo` share: the YAML, a local run's outputs, the compile options, the
    run's settings (every field declared for the pipeline) and the pipeline's own parameters (RunParameters)."""
    from fedmedclip.config import TrainConfig
    from fedmedclip.federation.server import ServerOptions

    p.add_argument("--yaml", help="a compiled YAML to run (default: compile with the options)")
    if local:
        p.add_argument("--out", help="copy the run directory here")
        p.add_argument(
            "--pipeline-root",
            help="where the tasks' artifacts, the task log and (for local data) the mailbox go (default: a temp "
            "dir)",
        )
    for cls in (CompileOptions, TrainConfig, ServerOptions, RunParameters):
        add_config_arguments(p, PIPELINE, cls, defaults=defaults)
    p.set_defaults(func=func)


def validated_config(args):
    """The run's configuration, validated before anything is compiled or started (ConfigError: exit 2): its
    settings, the server's options, the pipeline's parameters and the compile options, all before the pipeline
    root is made or the tracking server is looked up (--quorum 0 and --max-epsilon nan were refused after)."""
    from fedmedclip.federation.server import ServerOptions

    cfg = config_from_args(args, federation="federated", out="")
    for cls in (ServerOptions, RunParameters, CompileOptions):
        options_from_args(args, cls)
    root = getattr(args, "pipeline_root", None)  # `submit` has none
    if root:
        check_folder_flag("--pipeline-root", root)
    return cfg


def pipeline_arguments(args, cfg, local_stack: str = "") -> dict:
    """The pipeline's run-time parameters for this command line: the run's `settings`, then RunParameters."""
    settings = pipeline_settings(cfg, options_from_args(args))
    return dict(settings=settings, **asdict(options_from_args(args, RunParameters)), local_stack=local_stack)


# ------------------------------------------------------------------------------------------- commands
def cmd_compile(args) -> int:
    path = _compile(args, args.out)
    size = path.stat().st_size / 1e3
    print(f"compiled -> {path} ({size:.1f} kB; sites and rounds are run-time parameters)")
    return 0


def check_yaml(args) -> None:
    """--yaml, when given, is a compiled pipeline taking this command's parameters: one line (exit 2) before
    anything starts, where kfp's loader raised AttributeError, KeyError or YAML's ScannerError."""
    if args.yaml:
        from pipelines.local import load_pipeline

        load_pipeline(args.yaml, ("settings", *(f.name for f in fields(RunParameters)), "local_stack"))


def check_local_stack(stack_dir: str) -> None:
    """An explicit --local-stack is a running local stack's directory (one line, exit 2), before anything
    starts: its keys were otherwise found missing only inside the prepare task, after its retries."""
    from devstack.stack import StackError, stack_status

    try:
        status = stack_status(stack_dir)
    except StackError as exc:  # a stack.json that cannot be read
        raise ConfigError(f"--local-stack {stack_dir}: {exc}") from None
    if not status.running:
        why = (
            f"its servers are not running or not answering (`fedmedclip stack status --data-dir {stack_dir}`)"
            if status.recorded
            else "no stack.json there"
        )
        raise ConfigError(
            f"--local-stack {stack_dir}: not a running local stack ({why}); start one with "
            f"`fedmedclip stack up --data-dir {stack_dir}`, or leave --local-stack out"
        )


def cmd_run(args) -> int:
    if not args.local:  # argparse's `required` printed the whole usage, 50 lines, before its one
        raise ConfigError(
            "pipeline run runs on this machine: give --local (a cluster: `pipeline submit --host URL`)"
        )
    cfg = validated_config(args)  # before anything is compiled or started
    check_yaml(args)
    # The local stack whose per-role keys the tasks take when they touch S3 and the environment holds no key.
    stack = args.local_stack
    if stack:
        check_local_stack(stack)
    s3 = any(x.startswith("s3://") for x in (cfg.data, args.mailbox))
    if not stack and s3 and not os.environ.get("AWS_ACCESS_KEY_ID"):
        from devstack.stack import read_state, recorded_stack_dir

        recorded = recorded_stack_dir()
        stack = recorded if read_state(recorded) is not None else ""
    if s3:  # whose keys the tasks use: the environment's (`stack env` exports the admin's) reach every prefix
        if stack:
            keys = f"each task takes its own role's key from the local stack in {stack}"
        elif os.environ.get("AWS_ACCESS_KEY_ID"):
            keys = "every task uses this environment's key (AWS_ACCESS_KEY_ID); --local-stack DIR gives each task "
            keys += "its own role's key instead"
        else:
            keys = "no key in the environment and no local stack: the tasks take boto3's default credentials "
            keys += "(a profile, an instance role)"
        print(f"S3: {keys}", flush=True)
    if cfg.data.startswith("s3://"):  # as the prepare task reads it: with the server's key
        from devstack.stack import read_state
        from mlops.site_data import check_published_partition

        info = read_state(stack) if stack else None
        check_published_partition(cfg, info.s3_client("server") if info is not None else None)
    _run_local(args, cfg, str(Path(stack).resolve()) if stack else "", "fedmedclip-kfp-")
    return 0


def _run_local(args, cfg, local_stack: str, prefix: str):
    """Run the pipeline on this machine, its tasks' artifacts under --pipeline-root (else a new temporary
    directory starting with `prefix`), and print what it gave."""
    from fedmedclip.cli import print_summary
    from fedmedclip.tracking_server import NO_TRACKING_SERVER, find_tracking_uri
    from pipelines.local import run_local, server_status_reader

    root = Path(args.pipeline_root or tempfile.mkdtemp(prefix=prefix)).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not args.mailbox and not cfg.data.startswith("s3://"):
        args.mailbox = str(root / "mailbox")
    # The one rule of every command (fedmedclip.tracking_server); a local run without a server is not tracked.
    args.tracking_uri = find_tracking_uri(args.tracking_uri) or ""
    untracked = f"none ({NO_TRACKING_SERVER}); the run is neither tracked nor registered"
    print(f"tracking: {args.tracking_uri or untracked}", flush=True)
    params = pipeline_arguments(args, cfg, local_stack)
    yaml_path = Path(args.yaml) if args.yaml else _compile(args, root / "pipeline.yaml")
    log_path = root / "pipeline.log"
    if not args.verbose:
        print(f"running the pipeline locally; task logs: {log_path}", flush=True)
    run = run_local(
        yaml_path,
        root,
        args.out,
        log_path=None if args.verbose else log_path,  # kfp's own output there, off the console
        progress=not args.quiet,
        rounds_of=server_status_reader(args.mailbox or cfg.data.rstrip("/"), local_stack),
        **params,
    )
    print(f"\npipeline finished in {run.seconds:.1f} s; task artifacts and logs: {run.pipeline_root}")
    print_summary(run.results, str(run.run_dir))
    print(learning_curve(run.results))
    print(f"model: {run.model_uri}" if run.model_uri else "model: not registered (no tracking server)")
    if run.model_uri:
        print(f"promotion: {run.promotion}")
    return run


def learning_curve(results: dict) -> str:
    """Round 1 against the selected round: what a newcomer looks at to see the federation learn."""
    best_round = results["metrics"]["best_round"]
    parts = []
    for h in (results["history"][0], next(h for h in results["history"] if h["round"] == best_round)):
        accs = [s["acc"] for s in h["sites"] if s.get("acc") is not None]
        sites = sum(accs) / len(accs) if accs else float("nan")
        parts.append(f"round {h['round']}: global acc {h['global']['acc']:.3f}, sites {sites:.3f}")
    return "learning: " + "  ->  ".join(parts)


# The oldest Kubeflow Pipelines backend that runs the compiled YAML: kfp-kubernetes (2.17.0 here) writes the
# `optional` field on every secret and config map mapped to environment variables, which drivers older than
# 2.15 refuse ("unknown field \"optional\" in kfp_kubernetes.SecretAsEnv"); the Secret names taken from the
# parties' loop items (secretNameParameter), activeDeadlineSeconds and retry back-off are older than that.
MIN_KFP_BACKEND = (2, 15)


def kfp_credentials(args):
    """kfp.Client's keyword arguments for how this user signs in to the KFP API (multi-user Kubeflow): one of a
    bearer token, a service-account token file read again for each request (kfp's
    ServiceAccountTokenVolumeCredentials), the dashboard's session cookie; and the endpoint's CA."""
    token = args.token or os.environ.get("KF_PIPELINES_TOKEN")
    if sum(bool(x) for x in (token, args.token_file, args.cookies)) > 1:
        raise ConfigError("give one of --token (or $KF_PIPELINES_TOKEN), --token-file, --cookies")
    for flag, path in (("--token-file", args.token_file), ("--ssl-ca-cert", args.ssl_ca_cert)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    given = dict(existing_token=token, cookies=args.cookies, ssl_ca_cert=args.ssl_ca_cert)
    if args.token_file:
        from kfp.client import ServiceAccountTokenVolumeCredentials

        given["credentials"] = ServiceAccountTokenVolumeCredentials(path=args.token_file)
    return {k: v for k, v in given.items() if v}


def _http_error(host: str, code: int, body: str) -> FedMedClipError:
    detail = " ".join(body.split())[:200]
    if code in (401, 403):
        return FedMedClipError(
            f"the Kubeflow Pipelines API at {host} refused the request (HTTP {code}: {detail or 'no reason'}): "
            "sign in with --token, --token-file or --cookies (multi-user Kubeflow), and --namespace your profile"
        )
    return FedMedClipError(
        f"the Kubeflow Pipelines API at {host} answered HTTP {code} ({detail or 'no body'})"
    )


def check_kfp_endpoint(host: str, kwargs: dict, token_file: str | None) -> dict:
    """GET the KFP API's healthz with this user's credentials; returns its JSON. One line (FedMedClipError)
    for what goes wrong: unreachable, refused credentials, another HTTP error, a backend older than
    MIN_KFP_BACKEND."""
    import json
    import ssl
    import urllib.error
    import urllib.request

    url = f"{host.rstrip('/')}/apis/v2beta1/healthz"
    token = Path(token_file).read_text().strip() if token_file else kwargs.get("existing_token")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if kwargs.get("cookies"):
        headers["Cookie"] = kwargs["cookies"]
    try:  # used for https only; a file that holds no CA is the user's mistake whatever the scheme
        context = ssl.create_default_context(cafile=kwargs.get("ssl_ca_cert"))
    except ssl.SSLError as e:
        raise ConfigError(f"--ssl-ca-cert {kwargs['ssl_ca_cert']}: holds no CA ({e.reason})") from None
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=10.0, context=context) as r:
            raw = r.read(1 << 20)
    except urllib.error.HTTPError as e:
        raise _http_error(host, e.code, e.read(2000).decode(errors="replace")) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise FedMedClipError(
            f"cannot reach the Kubeflow Pipelines API at {host} ({getattr(e, 'reason', e)}); check --host "
            "(e.g. `kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80`, then --host http://localhost:8080)"
        ) from None
    try:  # what answers may be anything: not JSON, not UTF-8, JSON that is not an object
        health = json.loads(raw)
        tag = str(health.get("tag_name") or health.get("tagName") or "")
    except (ValueError, AttributeError):
        raise FedMedClipError(f"{url} did not answer a JSON object: is {host} the KFP API?") from None
    # A version's numbers only: a longer run of digits is no version (and int() refuses over 4,300 digits).
    version = re.match(r"v?(\d{1,9})\.(\d{1,9})(?!\d)", tag)
    if version and (int(version[1]), int(version[2])) < MIN_KFP_BACKEND:
        raise FedMedClipError(
            f"the Kubeflow Pipelines backend at {host} is {tag}; this pipeline needs "
            f"{'.'.join(map(str, MIN_KFP_BACKEND))} or newer (pipelines/README.md, 'Backend version')"
        )
    return health


def cmd_submit(args) -> int:
    cfg = validated_config(args)  # before anything is compiled or submitted
    check_yaml(args)
    if not args.yaml and not args.base_image:
        raise ConfigError(
            "pass --base-image REGISTRY/fedmedclip-train:TAG (the training image you built and pushed: "
            "`docker build --target train ...`, infra/README.md), or --yaml of a pipeline compiled with it: "
            "the default image is a placeholder no registry serves"
        )
    if not re.match(r"https?://", args.host):  # urllib: "unknown url type"; kfp would guess a scheme
        raise ConfigError(f"--host {args.host}: give the scheme, e.g. http://{args.host} or https://...")
    credentials = kfp_credentials(args)
    check_kfp_endpoint(args.host, credentials, args.token_file)  # one clear line before kfp's retries
    params = pipeline_arguments(args, cfg)
    yaml_path = args.yaml or _compile(
        args, Path(tempfile.mkdtemp(prefix="fedmedclip-kfp-")) / "pipeline.yaml"
    )
    import kfp
    import urllib3
    from kfp_server_api.exceptions import ApiException

    warnings.filterwarnings("ignore", message="This client only works with", category=FutureWarning)
    logging.disable(logging.ERROR)  # kfp logs a traceback per retry; the one line below says it all
    try:
        client = kfp.Client(host=args.host, namespace=args.namespace, **credentials)
        result = client.create_run_from_pipeline_package(
            str(yaml_path),
            arguments=params,
            run_name=args.run_name,
            experiment_name=args.experiment_name,
            namespace=args.namespace,
            enable_caching=not args.no_cache,
        )
    except ApiException as e:
        raise _http_error(args.host, e.status or 0, str(e.body or e.reason or "")) from None
    except (urllib3.exceptions.HTTPError, OSError, TimeoutError) as e:
        raise FedMedClipError(
            f"submitting to the Kubeflow Pipelines API at {args.host} failed: {e}"
        ) from None
    finally:
        logging.disable(logging.NOTSET)
    print(f"submitted run {result.run_id}: {args.host.rstrip('/')}/#/runs/details/{result.run_id}")
    return 0


def cmd_demo(args) -> int:
    """The newcomer path: local stack, data in its S3 one prefix per site, the pipeline on this machine with
    each task holding only its own role's key, a live MLflow run, a registered and promoted model."""
    from devstack.stack import start_stack
    from fedmedclip.tracking_server import recorded_stack_dir
    from mlops.policies import default_site_names

    cfg = validated_config(args)
    check_yaml(args)  # before the stack starts
    args.stack_dir = args.stack_dir or recorded_stack_dir()
    check_folder_flag("--stack-dir", args.stack_dir)  # before the stack starts
    names = default_site_names(cfg.sites or 3) if cfg.partition != "natural" else None
    # The running stack when it is already up; else started, on free ports when the defaults are taken.
    info = start_stack(args.stack_dir, args.s3_port, args.mlflow_port, site_names=names)
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
    run = _run_local(args, cfg, info.data_dir, "fedmedclip-demo-")
    print(f"\nMLflow UI:  {_ui_link(info.tracking_uri, args.experiment)}")
    print(f"model URI:  {run.model_uri or '(registration failed)'}")
    if run.model_uri and "@" not in run.model_uri:
        print(
            f"(registered but not promoted; `fedmedclip promote {args.model_name} --version "
            f"{run.model_uri.rsplit('/', 1)[-1]} --alias {args.promote_alias} --allow-worse` overrides)"
        )
    return 0


def _ui_link(tracking_uri: str, experiment: str) -> str:
    """The experiment's page in the UI's model-training view (MLflow 3 opens on its GenAI pages otherwise)."""
    try:
        from mlops.tracking import _client, experiment_ui_url

        exp = _client(tracking_uri)[0].get_experiment_by_name(experiment)
        return experiment_ui_url(tracking_uri, exp.experiment_id) if exp is not None else tracking_uri
    except Exception:  # a link is a courtesy: the address alone still works
        return tracking_uri


def _publish_for_demo(cfg, info, quiet: bool) -> str:
    """Publish the demo's data to the local stack's S3, one prefix per site, with the publisher role's client
    (the tasks take their own roles' keys); one bucket per (source, partition), so a later demo reuses it and
    another data set never collides."""
    from devstack.stack import add_data_root
    from fedmedclip.features import canonical_digest
    from mlops.site_data import partition_settings, publish
    from pipelines.local import absolute_location

    # A local folder by its absolute path: the same relative path from another directory is other data.
    key = {"data": absolute_location(cfg.data), "synthetic": cfg.synthetic, **partition_settings(cfg)}
    bucket = f"fedmedclip-demo-{canonical_digest(key)[:12]}"
    add_data_root(info.data_dir, bucket)  # the bucket, and every role's policy on it (as the admin)
    summary = publish(cfg, bucket, client=info.s3_client("publisher"), progress=not quiet)
    per_site = ", ".join(f"{s} {n}" for s, n in summary["sites"].items())
    print(
        f"data published to s3://{bucket}: sites/<k>/ per site ({per_site}), server/ {summary['server']} images"
    )
    return f"s3://{bucket}"


# ------------------------------------------------------------------------------------------- registration
def register(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="the Kubeflow pipeline: compile, run locally, submit")
    sub = p.add_subparsers(dest="pipeline_command", metavar="{compile,run,submit}")
    p.set_defaults(func=lambda a: (p.print_help(sys.stderr), 2)[1])

    c = sub.add_parser("compile", help="compile the pipeline to IR YAML (the same for any sites and rounds)")
    add_config_arguments(c, COMPILE, CompileOptions)
    c.add_argument("--out", default=DEFAULT_YAML, help="output YAML (default: the committed %(default)s)")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser(
        "run", help="run the compiled pipeline on this machine (kfp.local, every worker at once)"
    )
    r.add_argument(
        "--local",
        action="store_true",
        help="run with kfp.local's SubprocessRunner (required: a cluster's is `pipeline submit --host URL`)",
    )
    r.add_argument(
        "--local-stack",
        help="local stack directory whose per-role S3 keys the tasks take (default: the recorded stack, for "
        "s3:// data or mailbox, when the environment holds no S3 key)",
    )
    _run_flags(r, cmd_run, {"join_timeout": LOCAL_JOIN_TIMEOUT})

    backend = ".".join(map(str, MIN_KFP_BACKEND))
    s = sub.add_parser(
        "submit", help=f"submit to a Kubeflow Pipelines endpoint (kfp.Client; backend {backend} or newer)"
    )
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    s.add_argument("--namespace", help="Kubeflow profile namespace (multi-user installs)")
    a = s.add_argument_group("signing in (multi-user Kubeflow; one of the first three)")
    a.add_argument("--token", help="an existing bearer token (default: $KF_PIPELINES_TOKEN, if set)")
    a.add_argument(
        "--token-file",
        metavar="PATH",
        help="a service-account token file, read for every request (kfp's ServiceAccountTokenVolumeCredentials; "
        "in a pod: a projected token with audience pipelines.kubeflow.org)",
    )
    a.add_argument(
        "--cookies",
        help="the Kubeflow dashboard's session cookie, e.g. 'authservice_session=...' (from your browser)",
    )
    a.add_argument("--ssl-ca-cert", metavar="PATH", help="CA bundle of an https endpoint")
    s.add_argument("--run-name", help="the KFP run's name (default: kfp's)")
    s.add_argument("--experiment-name", default="fedmedclip", help="KFP experiment")
    s.add_argument("--no-cache", action="store_true", help="disable KFP step caching for this run")
    _run_flags(s, cmd_submit, {"cache_dir": POD_CACHE_DIR}, local=False)

    try:  # the demo starts the local development stack, which the images do not ship
        from devstack.cli import add_port_options
    except ImportError:
        return
    d = subparsers.add_parser(
        "demo",
        help="start the local stack, run the pipeline locally on its S3, register and promote the model",
    )
    d.add_argument(
        "--stack-dir", help="local stack data directory (default: $FEDMEDCLIP_STACK_DIR, else .stack)"
    )
    add_port_options(d)  # used when the stack starts; a running stack keeps its ports
    d.add_argument(
        "--local-data",
        action="store_true",
        help="tasks read --data from this machine's disk instead of from the stack's S3 (one prefix per site)",
    )
    _run_flags(d, cmd_demo, {"rounds": DEMO_ROUNDS, "join_timeout": LOCAL_JOIN_TIMEOUT})

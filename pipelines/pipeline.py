"""The fedmedclip Kubeflow pipeline: one graph for any number of sites and rounds (both are run-time settings).

    prepare ──► ParallelFor over [server, site_0, ...] (every iteration at once): worker (extract features,
                then the federation worker; GPU, the party's own Secret; retried, resumes)
            ──► report ──► export ONNX ──► register + promote (MLflow)

pipelines/README.md says why each party is one task, how the run id (the KFP run id) lets a retried worker
resume, and why the report waits for the loop with `.after` (kfp 2.17 does not compile `dsl.Collected` there).
"""

# No `from __future__ import annotations`: KFP reads the pipeline signature's annotations as types.
import inspect
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import NamedTuple

from components.kfp_components import DEFAULT_BASE_IMAGE
from components.run_parameters import RunParameters
from fedmedclip.errors import ConfigError
from fedmedclip.flags import declared, parse_pairs, setting
from mlops.sites import ENDPOINTS_CONFIGMAP, SECRET_KEYS, SERVER_SECRET_NAME

PIPELINE_NAME = "fedmedclip"
DEFAULT_YAML = Path(__file__).with_name("fedmedclip_pipeline.yaml")
GPU_RESOURCE = "nvidia.com/gpu"
S3_ENDPOINT_KEYS = {k: k for k in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")}


@dataclass(frozen=True)
class Resources:
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str


# Per kind of task: its resources (a worker, a party's extraction then its federation worker, is sized for the
# extraction, its heaviest part, and alone asks for a GPU), the seconds before Kubernetes stops it
# (activeDeadlineSeconds: a worker lives as long as the federation) and its retries (a retried worker fetches
# the features it published and continues from its last checkpoint in storage).
_TASKS = {
    "prepare": (Resources("500m", "2", "1Gi", "4Gi"), 3600, 2),
    "worker": (Resources("2", "8", "8Gi", "16Gi"), 72 * 3600, 5),
    "report": (Resources("250m", "1", "512Mi", "2Gi"), 1800, 3),
    "export": (Resources("2", "4", "8Gi", "16Gi"), 2 * 3600, 1),
    "register": (Resources("500m", "2", "2Gi", "4Gi"), 3600, 3),
}
RETRY_BACKOFF = ("30s", 2.0, "10m")  # kfp's set_retry: the first back-off, its factor, the longest
DEFAULT_RESOURCES = {kind: task[0] for kind, task in _TASKS.items()}
DEFAULT_TIMEOUTS = {kind: task[1] for kind, task in _TASKS.items()}
DEFAULT_RETRIES = {kind: task[2] for kind, task in _TASKS.items()}


def parse_node_selector(items: list[str]) -> dict[str, str]:
    return parse_pairs(items, "--gpu-node-selector")


TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")  # Kubernetes' (core/v1 Taint)


def parse_tolerations(items: list[str]) -> tuple[dict, ...]:
    """KEY[=VALUE][:EFFECT] items as Kubernetes tolerations (no VALUE: the key's existence tolerates)."""
    tolerations = []
    for item in items:
        key_value, _, effect = (part.strip() for part in item.partition(":"))
        key, sep, value = (part.strip() for part in key_value.partition("="))
        if not key or (effect and effect not in TAINT_EFFECTS):
            raise ConfigError(
                f"--gpu-toleration {item!r} must look like KEY[=VALUE][:EFFECT], EFFECT one of "
                f"{', '.join(TAINT_EFFECTS)}"
            )
        operator = "Equal" if sep else "Exists"
        tolerations.append(
            {"key": key, "operator": operator, "value": value if sep else None, "effect": effect or None}
        )
    return tuple(tolerations)


# The quantities kfp accepts for a task's CPU and memory (PipelineTask.set_cpu_limit, set_memory_limit): checked
# here so that a wrong one is a ConfigError naming the flag, not kfp's ValueError while compiling.
_CPU = re.compile(r"([0-9]*[.])?[0-9]+m?")
_MEMORY = re.compile(r"[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?")


def parse_resources(items: list[str]) -> dict[str, Resources]:
    """The default resources, with those of each KIND=CPU_REQ,CPU_LIM,MEM_REQ,MEM_LIM item."""
    resources = dict(DEFAULT_RESOURCES)
    for kind, spec in parse_pairs(items, "--resources").items():
        values = [v.strip() for v in spec.split(",")]
        if kind not in resources or len(values) != 4:
            raise ConfigError(
                f"--resources {kind}={spec}: give one of {', '.join(resources)} and four values "
                "CPU_REQ,CPU_LIM,MEM_REQ,MEM_LIM"
            )
        for i, value in enumerate(values):
            pattern, what = (_CPU, "CPU") if i < 2 else (_MEMORY, "memory")
            if not pattern.fullmatch(value):
                raise ConfigError(
                    f"--resources {kind}={spec}: {value!r} is not a {what} quantity (CPU: a number, or whole "
                    "millicores like 500m; memory: whole bytes, optionally with K, M, G, T, P, E or Ki, Mi, Gi, "
                    "Ti, Pi, Ei)"
                )
        for what, (request, limit) in (("CPU", values[:2]), ("memory", values[2:])):
            if quantity(request) > quantity(limit):  # Kubernetes refuses such a pod
                raise ConfigError(
                    f"--resources {kind}={spec}: the {what} request {request} is above its limit {limit}; "
                    "a request must not exceed its limit"
                )
        resources[kind] = Resources(*values)
    return resources


# Kubernetes' suffixes of the quantities above (kfp writes "K" for its decimal kilo, Kubernetes "k").
_SUFFIXES = {
    "m": Fraction(1, 1000),
    **{s: 1000**i for i, s in enumerate(("K", "M", "G", "T", "P", "E"), start=1)},
    **{f"{s}i": 1024**i for i, s in enumerate(("K", "M", "G", "T", "P", "E"), start=1)},
}


def quantity(value: str) -> Fraction:
    """The exact amount a CPU or memory quantity (as `_CPU` and `_MEMORY` accept them) stands for: cores, or
    bytes; "500m" is 1/2, "8Gi" 8 * 2**30, "4G" 4 * 10**9."""
    number = value.rstrip("KMGTPEim")
    suffix = value[len(number) :]
    return Fraction(number) * _SUFFIXES.get(suffix, 1)


# A task's time limit is Kubernetes' activeDeadlineSeconds, which kfp writes as a 32-bit integer: 0 would mean
# no limit at all (not the zero seconds it says), and above 2^31 - 1 (68 years) kfp refuses the value.
MAX_TIMEOUT = 2**31 - 1
# Retries of a failed worker: each resumes the federation from its last checkpoint; kfp stores the count as a
# 32-bit integer (10**12 was a protobuf ParseError while compiling), and a hundred is already days of retrying.
MAX_RETRIES = 100


def parse_timeouts(items: list[str]) -> dict[str, int]:
    """The default time limits, with those of each KIND=SECONDS item (once per kind: parse_pairs)."""
    timeouts = dict(DEFAULT_TIMEOUTS)
    for kind, seconds in parse_pairs(items, "--timeout").items():
        # ASCII digits only: str.isdigit() also takes '²' (int() then fails), and a text of 5000 digits
        # is beyond int()'s limit; the length check keeps int() to what can be in range.
        whole = seconds.isascii() and seconds.isdigit() and len(seconds) <= len(str(MAX_TIMEOUT))
        if kind not in timeouts or not whole or not 1 <= int(seconds) <= MAX_TIMEOUT:
            text = seconds if len(seconds) <= 24 else f"{seconds[:21]}..."
            raise ConfigError(
                f"--timeout {kind}={text}: give one of {', '.join(timeouts)} and whole seconds "
                f"from 1 to {MAX_TIMEOUT}"
            )
        timeouts[kind] = int(seconds)
    return timeouts


_compile = partial(setting, group="compile")


@dataclass(frozen=True)
class CompileOptions:
    """Cluster settings fixed in the graph (everything about the run itself is a run-time parameter), each
    declared once: `pipeline compile`'s flags and those `pipeline run|submit|demo` compile with."""

    base_image: str | None = _compile(
        None,
        metavar="IMAGE",
        help="the components' image: the training image you built and pushed (`docker build --target train -t "
        "REGISTRY/fedmedclip-train:TAG . && docker push ...`; infra/README.md); `submit` needs it (or --yaml) "
        f"because the default, {DEFAULT_BASE_IMAGE}, is a placeholder nothing publishes",
    )
    gpu: bool = _compile(
        True, flags=("--no-gpu",), help="request no GPU for the parties' tasks (their feature extraction)"
    )
    gpu_node_selector: dict = _compile(
        default_factory=dict,
        parse=parse_node_selector,
        repeatable=True,
        metavar="LABEL=VALUE",
        help="node selector of the parties' tasks (repeatable), e.g. nvidia.com/gpu.present=true",
    )
    gpu_tolerations: tuple = _compile(
        (),
        flags=("--gpu-toleration",),
        parse=parse_tolerations,
        repeatable=True,
        metavar="KEY[=VALUE][:EFFECT]",
        help="toleration of the parties' tasks (repeatable), e.g. nvidia.com/gpu:NoSchedule",
    )
    resources: dict = _compile(
        default_factory=lambda: dict(DEFAULT_RESOURCES),
        parse=parse_resources,
        repeatable=True,
        metavar="KIND=CPU_REQ,CPU_LIM,MEM_REQ,MEM_LIM",
        help="requests and limits of a kind of task (prepare, worker, report, export, register), e.g. "
        "worker=2,4,8Gi,16Gi",
    )
    timeouts: dict = _compile(
        default_factory=lambda: dict(DEFAULT_TIMEOUTS),
        flags=("--timeout",),
        parse=parse_timeouts,
        repeatable=True,
        metavar="KIND=SECONDS",
        help=f"a kind of task's time limit in seconds, 1 to {MAX_TIMEOUT} (repeatable, once per kind)",
    )
    worker_retries: int | None = _compile(
        None,
        minimum=0,
        maximum=MAX_RETRIES,
        metavar="N",
        help=f"retries of a failed worker, at most {MAX_RETRIES} (default: 5, with backoff)",
    )

    @property
    def retries(self) -> dict[str, int]:
        worker = {} if self.worker_retries is None else {"worker": self.worker_retries}
        return {**DEFAULT_RETRIES, **worker}


def parameter(name: str, annotation, default=inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation
    )


def build_pipeline(options: CompileOptions | None = None):
    """The pipeline function (the run's settings, sites and rounds included, are run-time parameters)."""
    # kfp's task setters (set_cpu_request and the like) each call inspect.stack(), which reads the source of
    # every frame above them: under a deep caller (a test runner, a notebook) that is 27 ms a setter, most of a
    # compile's CPU. Built in a thread of its own, the stack holds only this module's and kfp's frames.
    with ThreadPoolExecutor(1, thread_name_prefix="build-pipeline") as pool:
        return pool.submit(_build_pipeline, options).result()


def _build_pipeline(options: CompileOptions | None):
    from kfp import dsl, kubernetes

    from components.kfp_components import (
        MLFLOW_SECRET_KEYS,
        MLFLOW_SECRET_NAME,
        WORKER_TRACKING_ENV,
        components_for,
        documented,
    )

    opt = options or CompileOptions()
    c = components_for(opt.base_image or DEFAULT_BASE_IMAGE)
    secret_keys = {k: k for k in SECRET_KEYS}

    def task(kind: str, values: dict, display: str, secret, cache: bool = True, **given):
        """The `kind` component's task, each input `given`, else the value of the same name in `values`; its
        resources, retries, time limit and caching; the S3 key of the party it acts as (`secret`) and where the
        bucket is (optional, so a cluster without the ConfigMap still runs path data)."""
        component, values, r = getattr(c, kind), {**values, **given}, opt.resources[kind]
        task = component(**{name: values[name] for name in component.component_spec.inputs})
        task.set_display_name(display)
        task.set_cpu_request(r.cpu_request).set_cpu_limit(r.cpu_limit)
        task.set_memory_request(r.memory_request).set_memory_limit(r.memory_limit)
        if opt.retries[kind] > 0:
            task.set_retry(opt.retries[kind], *RETRY_BACKOFF)
        kubernetes.set_timeout(task, int(opt.timeouts[kind]))
        task.set_caching_options(cache)
        if secret is not None:
            kubernetes.use_secret_as_env(task, secret, secret_keys)
            kubernetes.use_config_map_as_env(task, ENDPOINTS_CONFIGMAP, S3_ENDPOINT_KEYS, optional=True)
        return task

    def mlflow_access(task, secret: str, uri_env: str):
        """The MLflow user from `secret` and the tracking server from the endpoints ConfigMap (both optional)."""
        kubernetes.use_secret_as_env(task, secret, MLFLOW_SECRET_KEYS, optional=True)
        uri = {"MLFLOW_TRACKING_URI": uri_env}
        kubernetes.use_config_map_as_env(task, ENDPOINTS_CONFIGMAP, uri, optional=True)

    def pipeline(name: str, summary: str, signature: inspect.Signature, body, returns: str = ""):
        """`body` (a dict of the parameters to the pipeline's outputs) as the pipeline `name` of `signature`,
        which KFP reads (inspect.signature), passing the parameters in its order."""

        def func(*values):
            return body(dict(zip(signature.parameters, values, strict=True)))

        func.__signature__ = signature
        return dsl.pipeline(name=name, description=summary)(documented(func, summary, returns))

    def party(p: dict) -> str:
        # A sub-pipeline, not tasks in the loop body: kfp 2.17 compiles a Secret name taken from a field of a
        # loop item over a task's output only when it reaches the tasks as an input of their own DAG.
        display = f"extract features{' (GPU)' if opt.gpu else ''}, then the federation worker"
        worker = task("worker", p, display, p["secret"], cache=False)
        if opt.gpu:
            worker.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
            for label, value in sorted(opt.gpu_node_selector.items()):
                kubernetes.add_node_selector(worker, label, value)
            for t in opt.gpu_tolerations:
                kubernetes.add_toleration(worker, **t)
        # Only the server's item names the MLflow Secret; a site's names its own S3 Secret, which has no such
        # keys (optional: nothing is set), so no site pod holds the central MLflow's credentials.
        mlflow_access(worker, p["tracking_secret"], WORKER_TRACKING_ENV)
        return worker.output

    # The party pipeline's inputs: the worker's, and the Secrets its task mounts.
    secrets = [parameter(name, str) for name in ("secret", "tracking_secret")]
    worker_inputs = inspect.signature(c.worker.python_func).parameters.values()
    party_signature = inspect.Signature([*secrets, *worker_inputs], return_annotation=str)
    party_summary = (
        "One party of the federation (the server or a site): its feature extraction, then its long-lived "
        "worker, in one task with that party's own S3 Secret."
    )
    party_returns = "The worker's output: the MLflow run id of the server's run."
    party_pipeline = pipeline("federation-party", party_summary, party_signature, party, party_returns)

    class Outputs(NamedTuple):
        run_dir: dsl.Artifact
        model_uri: str
        promotion: str

    def federation(params: dict) -> Outputs:
        # The server's credentials: s3:// data's server/published.json (no site's prefix).
        prep = task("prepare", params, "prepare: validate, partition, parties", SERVER_SECRET_NAME)
        params["run_id"] = run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER  # the federation's: the KFP run's

        with dsl.ParallelFor(prep.output) as item:
            given = {name: params[name] for name in ("run_id", "experiment", "tracking_uri", "local_stack")}
            # The party pipeline's other inputs are fields of the loop's items (components/prepare: prepare_step).
            fields = {name: getattr(item, name) for name in party_signature.parameters if name not in given}
            worker = party_pipeline(**fields, **given)
            worker.set_display_name("party: its features, then its federation worker")

        report = task("report", params, "report: the server's run directory", SERVER_SECRET_NAME, cache=False)
        report.after(worker)
        run_dir = report.outputs["run_dir"]
        # The server's credentials: the global model's OOD score is fitted on the server's images.
        export = task("export", params, "export ONNX", SERVER_SECRET_NAME, run_dir=run_dir)
        reg = task(
            "register",
            params,
            "register + promote (MLflow)",
            None,
            cache=False,
            run_dir=run_dir,
            onnx=export.outputs["onnx"],
            mlflow_run_id=report.outputs["Output"],
            kfp_run_id=run_id,
        )
        mlflow_access(reg, MLFLOW_SECRET_NAME, "MLFLOW_TRACKING_URI")  # the pipeline's user (infra/training)
        return Outputs(run_dir, reg.outputs["model_uri"], reg.outputs["promotion"])

    # The pipeline's parameters: `settings`, the run's settings as one structured parameter (keys the fields
    # declared for the pipeline, fedmedclip/flags.py, each left out taking its declared default), then
    # RunParameters' fields with their declared types and defaults (the same declaration gives their flags and
    # descriptions), then `local_stack`. The settings' default is empty: KFP writes a structured default into
    # the YAML's header in hash order, so any other would make the compiled YAML differ between compiles.
    signature = inspect.Signature(
        [
            parameter("settings", dict, {}),
            *(parameter(d.name, d.type, d.default) for d in declared(RunParameters)),
            parameter("local_stack", str, ""),
        ],
        return_annotation=Outputs,
    )
    summary = (
        "Federated adaptation of a frozen CLIP (FedMedCLIP, FACMIC and baselines) as a federation runtime: a "
        "server and one long-lived worker per site, exchanging module updates through an object store (any "
        "number of sites and rounds)."
    )
    return pipeline(PIPELINE_NAME, summary, signature, federation)


def compile_pipeline(out: str | Path = DEFAULT_YAML, options: CompileOptions | None = None) -> Path:
    """Compile to IR YAML (what `kfp.Client` uploads and what `pipeline run --local` executes)."""
    from kfp import compiler

    out = Path(out)
    # kfp raises a ValueError for any other name (also for .json, which cannot hold the Kubernetes settings).
    if out.suffix not in (".yaml", ".yml"):
        raise ConfigError(
            f"--out {str(out)!r}: the compiled pipeline is a YAML file; give a path ending in .yaml"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(options), str(out))
    return out

"""The fedmedclip Kubeflow pipeline: sites and rounds unrolled at compile time, so the graph shows every
round (one training task per site, then the round's aggregation), and each site's tasks get only that
site's features and that site's S3 secret. With `data = s3://BUCKET` (published by `fedmedclip data
publish`), each holder's extraction task downloads only its own prefix with that secret.

    prepare (server secret) ─┬─ site_k: extract features (GPU, site secret)   ─┐
                             └─ server: extract features + initial module     ─┤
    round r:    site_k: train (GPU, site secret)  ×N  ──►  aggregate (server)
    end:        site_k: evaluate last round       ×N  ──►  evaluate (run dir) ──► export (ONNX) ──► register (MLflow)
"""

# No `from __future__ import annotations`: KFP reads the pipeline signature's annotations as types.
from pathlib import Path
from typing import NamedTuple

from components.sites import ENDPOINTS_CONFIGMAP, SECRET_KEYS, SERVER_SECRET_NAME, site_secret_name
from fedmedclip.errors import ConfigError
from fedmedclip.features import DEFAULT_PROMPT

PIPELINE_NAME = "fedmedclip"
DEFAULT_SITES = 3
DEFAULT_ROUNDS = 3
DEFAULT_YAML = Path(__file__).with_name("fedmedclip_pipeline.yaml")
GPU_RESOURCE = "nvidia.com/gpu"
S3_ENDPOINT_KEYS = {k: k for k in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")}


def default_site_names(sites: int) -> list[str]:
    return [f"site_{k}" for k in range(sites)]  # fedmedclip.partition's names for iid/dirichlet


def build_pipeline(
    sites: int = DEFAULT_SITES,
    rounds: int = DEFAULT_ROUNDS,
    site_names: list[str] | None = None,
    base_image: str | None = None,
    gpu: bool = True,
):
    """The pipeline function for `sites` sites and `rounds` rounds (compile-time options)."""
    from kfp import dsl, kubernetes

    from components.kfp_components import DEFAULT_BASE_IMAGE, MAX_SITES, components_for

    names = list(site_names) if site_names else default_site_names(sites)
    if len(names) != sites or len(set(names)) != sites:
        raise ConfigError(f"--site-names must name {sites} distinct sites, got {names}")
    if not 1 <= sites <= MAX_SITES:
        raise ConfigError(f"the pipeline supports 1 to {MAX_SITES} sites, got {sites}")
    if rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {rounds}")
    c = components_for(base_image or DEFAULT_BASE_IMAGE)

    keys = {k: k for k in SECRET_KEYS}

    def s3_endpoint(task):
        # Where the data bucket is (s3:// data); optional, so a path-data cluster needs no ConfigMap.
        return kubernetes.use_config_map_as_env(task, ENDPOINTS_CONFIGMAP, S3_ENDPOINT_KEYS, optional=True)

    def site_task(task, index: int, accelerate: bool):
        # Only site k's S3 credentials reach its pods (Secret fedmedclip-site-<k>-s3, infra/training): with
        # s3:// data they can download sites/<k>/ and nothing else.
        kubernetes.use_secret_as_env(task, secret_name=site_secret_name(index), secret_key_to_env=keys)
        s3_endpoint(task)
        if accelerate:
            gpu_task(task)
        return task

    def server_task(task):
        # The aggregator's credentials: the server/ prefix only (catalog, global test), never a site's.
        kubernetes.use_secret_as_env(task, secret_name=SERVER_SECRET_NAME, secret_key_to_env=keys)
        return s3_endpoint(task)

    def gpu_task(task):
        if gpu:
            task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
        return task

    class Outputs(NamedTuple):
        run_dir: dsl.Artifact
        model_uri: str

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=f"Federated adaptation of a frozen CLIP: {sites} sites ({', '.join(names)}), {rounds} rounds.",
    )
    def fedmedclip_pipeline(
        data: str = "synthetic",
        method: str = "fedmedclip",
        partition: str = "iid",
        alpha: float = 0.0,
        seed: int = 0,
        batch_size: int = 32,
        codec: str = "fp16-zlib",
        backbone: str = "tiny",
        preprocessing: str = "",
        method_options: str = "{}",
        synthetic: str = "{}",
        split_ratio: str = "[0.8, 0.1, 0.1]",
        reference_fraction: float = 0.1,
        transductive: bool = False,
        prompt_template: str = DEFAULT_PROMPT,
        skip_bad_images: bool = False,
        cache_dir: str = "/tmp/fedmedclip-cache",
        export_site: str = "global",
        tracking_uri: str = "",
        experiment: str = "fedmedclip",
        model_name: str = "fedmedclip",
        promote_alias: str = "champion",
        allow_worse: bool = False,
    ) -> Outputs:
        prep = c.prepare(
            data=data,
            method=method,
            partition_scheme=partition,
            alpha=alpha,
            seed=seed,
            batch_size=batch_size,
            codec=codec,
            backbone=backbone,
            preprocessing=preprocessing,
            method_options=method_options,
            synthetic=synthetic,
            split_ratio=split_ratio,
            reference_fraction=reference_fraction,
            transductive=transductive,
            prompt_template=prompt_template,
            skip_bad_images=skip_bad_images,
            cache_dir=cache_dir,
            sites=sites,
            rounds=rounds,
            site_names=names,
        ).set_display_name("prepare: configuration + partition")
        server_task(prep)
        cfg, part = prep.outputs["Output"], prep.outputs["partition"]

        server = server_task(gpu_task(c.extract_server(config=cfg, partition=part))).set_display_name(
            "server: extract features (global test + reference)"
        )
        shared, server_features = server.outputs["shared"], server.outputs["features"]
        features = {}
        for k, s in enumerate(names):
            t = c.extract_site(config=cfg, partition=part, site=s).set_display_name(f"{s}: extract features")
            features[s] = site_task(t, k, accelerate=True).outputs["features"]

        payload, server_state = server.outputs["payload"], server.outputs["server_state"]
        site_state: dict = {s: None for s in names}
        for r in range(1, rounds + 1):
            updates = {}
            for k, s in enumerate(names):
                extra = {"previous_state": site_state[s]} if site_state[s] is not None else {}
                t = c.site_train(
                    config=cfg,
                    partition=part,
                    site=s,
                    site_index=k,
                    round_index=r,
                    features=features[s],
                    shared=shared,
                    payload=payload,
                    **extra,
                ).set_display_name(f"round {r}: {s} train")
                site_task(t, k, accelerate=True)
                updates[f"update_{k}"] = t.outputs["update"]
                site_state[s] = t.outputs["site_state"]
            agg = c.aggregate(
                config=cfg,
                partition=part,
                round_index=r,
                server_features=server_features,
                shared=shared,
                previous_state=server_state,
                **updates,
            ).set_display_name(f"round {r}: aggregate (server)")
            server_task(agg)
            payload, server_state = agg.outputs["payload"], agg.outputs["server_state"]

        finals = {}
        for k, s in enumerate(names):
            t = c.site_final(
                config=cfg,
                partition=part,
                site=s,
                site_index=k,
                rounds=rounds,
                features=features[s],
                shared=shared,
                payload=payload,
                previous_state=site_state[s],
            ).set_display_name(f"{s}: evaluate round {rounds}")
            finals[f"site_{k}"] = site_task(t, k, accelerate=False).outputs["site_state"]
        ev = c.evaluate(
            config=cfg,
            partition=part,
            shared=shared,
            server_features=server_features,
            server_state=server_state,
            **finals,
        ).set_display_name("evaluate: select round, write run directory")
        export = c.export(run_dir=ev.outputs["run_dir"], site=export_site).set_display_name("export ONNX")
        reg = c.register(
            run_dir=ev.outputs["run_dir"],
            onnx=export.outputs["onnx"],
            tracking_uri=tracking_uri,
            experiment=experiment,
            model_name=model_name,
            alias=promote_alias,
            allow_worse=allow_worse,
        ).set_display_name("register + promote (MLflow)")
        reg.set_caching_options(False)  # the registry changes between runs: never reuse a registration
        # In the cluster the tracking URI comes from the endpoints ConfigMap (MLFLOW_TRACKING_URI) unless the
        # tracking_uri parameter is set; optional, so a cluster without MLflow skips registration.
        kubernetes.use_config_map_as_env(
            reg, ENDPOINTS_CONFIGMAP, {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"}, optional=True
        )
        return Outputs(run_dir=ev.outputs["run_dir"], model_uri=reg.outputs["Output"])

    return fedmedclip_pipeline


def compile_pipeline(
    out: str | Path = DEFAULT_YAML,
    sites: int = DEFAULT_SITES,
    rounds: int = DEFAULT_ROUNDS,
    site_names: list[str] | None = None,
    base_image: str | None = None,
    gpu: bool = True,
) -> Path:
    """Compile to IR YAML (what `kfp.Client` uploads and what the local test executes)."""
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(sites, rounds, site_names, base_image, gpu), str(out))
    return out

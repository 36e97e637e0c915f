"""prepare: validate the run's configuration, draw the partition (as the server's holder would) and list the
federation's parties, each loop item carrying what its extraction and its worker need.

No `from __future__ import annotations`: KFP reads the component's annotations as types.
"""

import json

from components.kfp_components import (
    EXTRACTION_FIELDS,
    MLFLOW_SECRET_NAME,
    SERVER_ROLE,
    SITE_ROLE,
    config_from_parameters,
    resolve_mailbox,
)


def prepare_step(params: dict, site_names: str, mailbox: str) -> list:
    """The parties [server, site_0, ...] of the federation (kfp.local iterates only over a task's single
    `Output`, so the loop's items carry the resolved configuration too)."""
    from fedmedclip.errors import ConfigError
    from fedmedclip.methods import METHODS
    from fedmedclip.preparation import load_image_set, partition_for
    from fedmedclip.sources import is_remote, remote_source
    from mlops.sites import SERVER_SECRET_NAME, site_secret_name

    cfg = config_from_parameters(params)
    image_set = load_image_set(cfg)
    part = partition_for(cfg, image_set)
    if is_remote(cfg.data):
        remote_source(cfg.data).check_partition(cfg, part)
    names = [s.strip() for s in site_names.split(",") if s.strip()]
    if names and names != part.site_names:
        raise ConfigError(
            f"site_names {names} are not the partition's sites {part.site_names} (the data's site column for "
            "--partition natural, site_0, site_1, ... otherwise)"
        )
    mailbox = resolve_mailbox(mailbox, cfg.data)
    resolved = cfg.to_json()
    resolved["preprocessing"] = cfg.preprocessing or METHODS[cfg.method].default_preprocessing
    extraction = {k: resolved[k] for k in EXTRACTION_FIELDS}
    parties = [{"role": SERVER_ROLE, "party": SERVER_ROLE, "index": -1, "secret": SERVER_SECRET_NAME}] + [
        {"role": SITE_ROLE, "party": s, "index": k, "secret": site_secret_name(k)}
        for k, s in enumerate(part.site_names)
    ]
    config, extraction = json.dumps(resolved, sort_keys=True), json.dumps(extraction, sort_keys=True)
    for p in parties:
        # A site reads no MLflow credentials: its "tracking secret" is its own S3 Secret, which holds no
        # username/password keys (mounted optional: the variables stay unset). Only the server logs centrally.
        p["tracking_secret"] = MLFLOW_SECRET_NAME if p["role"] == SERVER_ROLE else p["secret"]
        p.update(config=config, extraction=extraction, mailbox=mailbox)
    return parties


def prepare_component(
    data: str,
    method: str,
    partition: str,
    alpha: float,
    sites: int,
    rounds: int,
    backbone: str,
    preprocessing: str,
    seed: int,
    batch_size: int,
    codec_up: str,
    codec_down: str,
    split: str,
    reference_fraction: float,
    transductive: bool,
    prompt_template: str,
    cache_dir: str,
    skip_bad_images: bool,
    classes: str,
    min_class_images: int,
    allow_outside_root: bool,
    threads: int,
    method_options: str,
    synthetic: str,
    privacy: str,
    secure_aggregation: bool,
    secagg_threshold: int,
    site_names: str,
    mailbox: str,
    local_stack: str,
) -> list:
    # KFP ships only this function's source into the pod: it imports its step (the image has the package).
    from components.kfp_components import CONFIG_PARAMETERS, SERVER_ROLE, act_as
    from components.prepare.component import prepare_step

    act_as(SERVER_ROLE, local_stack)  # s3:// data: the server reads server/published.json
    values = locals()
    return prepare_step({name: values[name] for name, _, _ in CONFIG_PARAMETERS}, site_names, mailbox)

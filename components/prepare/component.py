"""prepare: validate the run's configuration, draw the partition (as the server's holder would) and list the
federation's parties, each loop item carrying what its extraction and its worker need."""

import json

from components.kfp_components import (
    MLFLOW_SECRET_NAME,
    SERVER_ROLE,
    SITE_ROLE,
    resolve_mailbox,
    resolved_config,
    settings_from_parameters,
)


def prepare_step(settings: dict, site_names: str, mailbox: str) -> list:
    """The parties [server, site_0, ...] of the federation (kfp.local iterates only over a task's single
    `Output`, so the loop's items carry the resolved configuration, the server's options and each party's
    extraction settings: `resolved_config`)."""
    from dataclasses import asdict

    from fedmedclip.errors import ConfigError
    from fedmedclip.preparation import checked_partition
    from mlops.sites import SERVER_SECRET_NAME, site_secret_name

    cfg, options = settings_from_parameters(settings)
    _, part = checked_partition(cfg)
    names = [s.strip() for s in site_names.split(",") if s.strip()]
    if names and names != part.site_names:
        raise ConfigError(
            f"site_names {names} are not the partition's sites {part.site_names} (the data's site column for "
            "--partition natural, site_0, site_1, ... otherwise)"
        )
    mailbox = resolve_mailbox(mailbox, cfg.data)
    resolved, extraction = resolved_config(cfg)
    parties = [{"role": SERVER_ROLE, "party": SERVER_ROLE, "index": -1, "secret": SERVER_SECRET_NAME}] + [
        {"role": SITE_ROLE, "party": s, "index": k, "secret": site_secret_name(k)}
        for k, s in enumerate(part.site_names)
    ]
    config, extraction = json.dumps(resolved, sort_keys=True), json.dumps(extraction, sort_keys=True)
    server = json.dumps(asdict(options), sort_keys=True)
    for p in parties:
        # A site reads no MLflow credentials: its "tracking secret" is its own S3 Secret, which holds no
        # username/password keys (mounted optional: the variables stay unset). Only the server logs centrally.
        p["tracking_secret"] = MLFLOW_SECRET_NAME if p["role"] == SERVER_ROLE else p["secret"]
        p.update(config=config, server=server, extraction=extraction, mailbox=mailbox)
    return parties


def prepare_component(settings: dict, site_names: str, mailbox: str, local_stack: str) -> list:
    # KFP ships only this function's source into the pod: it imports its step (the image has the package).
    from components.kfp_components import SERVER_ROLE, act_as
    from components.prepare.component import prepare_step

    act_as(SERVER_ROLE, local_stack)  # s3:// data: the server reads server/published.json
    return prepare_step(settings, site_names, mailbox)

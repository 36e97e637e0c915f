"""Starting the federation's parties from what each one holds: `fedmedclip server run` and `fedmedclip site run`
(and the Kubeflow pipeline's workers) call `run_server` and `run_site`; `fedmedclip train` builds the same
setups from one process's preparation.

The server prepares only its own holder (the global test and reference sets); a site prepares only its own
images, taking every setting from the run's manifest, and refuses to join a run whose backbone, preprocessing,
classes or partition differ from what its own data and weights give.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbone import Backbone, load_backbone, make_preprocessing
from ..config import TrainConfig
from ..errors import ConfigError
from ..flags import MAX_THREADS, declared, setting
from ..methods import METHODS, resolved_preprocessing
from ..observer import RunObserver
from ..preparation import (
    SERVER,
    Prepared,
    _rows,
    build_method,
    extract_features,
    holder_image_ids,
    load_image_set,
    load_pixels,
    partition_for,
    prepare,
    reference_features,
    split_data,
)
from ..sources import is_published_layout, is_remote, remote_source
from .mailbox import Mailbox, Poller, ProtocolError, check_name, wait_until
from .records import only_writer
from .server import FederationError, FederationServer, ServerOptions, ServerSetup, read_manifest
from .site import DEFAULT_SILENCE_TIMEOUT, SiteSetup, SiteWorker
from .storage import open_store

log = logging.getLogger("fedmedclip.federation")

STATE_ROOT = ".fedmedclip-state"  # a site's states on its own disk: STATE_ROOT/RUN_ID/SITE
DEFAULT_IDENTITY = f"{STATE_ROOT}/identity.pem"  # its long-term identity key (`fedmedclip site keygen`)


def method_for(cfg: TrainConfig, p: Prepared):
    return build_method(
        cfg, p.stores[SERVER].text_features, p.backbone, p.preprocessing, p.image_set.class_names
    )


def dataset_summary(image_set) -> dict | None:
    """What the data preparation changed, for results.json and provenance.json: the exact duplicates it
    found (None when there were none, so that a run on data without any reads as before)."""
    dup = image_set.duplicates
    return {"duplicates": dup} if dup and dup["groups"] else None


def server_setup(cfg: TrainConfig, p: Prepared, method) -> ServerSetup:
    server = p.stores[SERVER]
    gx, gy = _rows(server, p.partition.global_test, (p.pixels or {}).get(SERVER))
    return ServerSetup(
        cfg=cfg,
        method=method,
        partition=p.partition,
        global_x=gx,
        global_y=gy,
        text_features=server.text_features,
        reference_x=reference_features(p.partition, server, cfg.transductive),
        class_names=p.image_set.class_names,
        backbone=p.backbone.identity(),
        preprocessing=p.preprocessing.describe(),
        provenance=server.provenance,
        feature_seconds=p.feature_seconds,
        dataset=dataset_summary(p.image_set),
    )


def run_server(
    cfg: TrainConfig,
    mailbox_url: str,
    run_id: str,
    out: str | Path,
    state_url: str | None = None,
    options: ServerOptions | None = None,
    observer: RunObserver | None = None,
    progress: bool = True,
    site_keys: dict[str, str] | str | None = None,
) -> dict:
    """Prepare the server's holder, then aggregate until the run ends; returns results.json's content.
    Started again with the same arguments after a crash, it continues from its last completed step; started
    while another server writes `out`, it is refused (ConfigError) before it touches the run.
    `site_keys` (secure aggregation): the sites' public identity keys {site: "ed25519:..."}, or "mailbox" to
    take the keys the sites register there themselves (`run_site(register_identity=True)`)."""
    cfg.validate()
    if cfg.federation != "federated":
        raise ConfigError(
            "the federation runtime runs federated training; --federation local|centralized run in `fedmedclip train`"
        )
    mailbox = Mailbox(open_store(mailbox_url), run_id)
    # One server per run directory: a second one (a restart while the first still runs) is refused in one
    # line, before it resumes the run and deletes the first one's temporary files as a crash's leftovers.
    with only_writer(out):
        prepared = prepare(cfg, progress, holders=[SERVER])
        torch.set_num_threads(cfg.threads)
        method = method_for(cfg, prepared)
        state = open_store(state_url) if state_url else mailbox.server_private()
        identities = site_keys
        if cfg.secure_aggregation and site_keys == "mailbox":
            from .secure import registered_identities

            log.info("server of run %s: waiting for the sites to register their identity keys", run_id)
            timeout = (options or ServerOptions()).join_timeout
            identities = registered_identities(mailbox, list(prepared.partition.site_names), timeout)
        server = FederationServer(
            mailbox, server_setup(cfg, prepared, method), state, out, options, observer, identities=identities
        )
        log.info(
            "server of run %s: %d sites (%s), %d rounds, quorum %d; mailbox %s",
            run_id,
            len(server.sites),
            ", ".join(server.sites),
            cfg.rounds,
            server.quorum,
            mailbox.store.url,
        )
        try:
            server.start()
        except FederationError:
            raise  # a refused configuration: the run in the mailbox (maybe another's) is left as it is
        except Exception as exc:
            server.fail(f"the server could not resume: {type(exc).__name__}: {exc}")
            raise
        return server.run()


def _shared_tensors(mailbox: Mailbox) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    raw = mailbox.store.get(mailbox.shared_key)
    if raw is None:
        raise ProtocolError(
            f"{mailbox.where(mailbox.shared_key)} is missing: the server did not start this run"
        )
    try:
        return load(raw)
    except Exception as exc:
        raise ProtocolError(f"{mailbox.where(mailbox.shared_key)} is not readable: {exc}") from None


def site_config(manifest: dict, data: str | None, cache_dir: str, threads: int) -> TrainConfig:
    """The run's settings from the manifest, with this site's own data location, cache and threads."""
    settings = dict(manifest["settings"])
    settings.update(out="", cache_dir=cache_dir, threads=threads)
    if data:
        settings["data"] = data
    return TrainConfig.from_json(settings).validate()


def site_images(cfg: TrainConfig, site: str, index: int):
    """A site's own images, its split ({"train"|"val"|"test": [ids]} in the partition's order) and the partition
    digest: from its own published prefix (S3, or a local folder in that layout), with its own credentials and
    nothing else; or from a local source, drawing the run's partition from it."""
    if is_remote(cfg.data) or is_published_layout(cfg.data):
        return remote_source(cfg.data).site_holder(cfg, site, index)
    image_set = load_image_set(cfg)
    partition = partition_for(cfg, image_set)
    if site not in partition.sites:
        raise ConfigError(
            f"--data {cfg.data}: its partition has no site {site!r} (it has {', '.join(partition.site_names)})"
        )
    return image_set, partition.sites[site], partition.digest


def site_index(manifest: dict, site: str) -> int:
    """The site's place in the run's manifest, or ConfigError when the run has no such site."""
    names = [s["name"] for s in manifest["sites"]]
    if site not in names:
        raise ConfigError(
            f"site {site!r} is not part of run {manifest['run_id']}: its sites are {', '.join(names)}"
        )
    return names.index(site)


def prepare_site(
    cfg: TrainConfig,
    site: str,
    manifest: dict,
    shared: dict,
    progress: bool = True,
    backbone: Backbone | None = None,
) -> SiteSetup:
    """This site's setup from its own data only, checked against the run's manifest. `backbone`: cfg.backbone
    already loaded (an export that checked it first), else it is loaded here."""
    index = site_index(manifest, site)
    backbone = backbone or load_backbone(cfg.backbone, cache_dir=cfg.cache_dir)
    prep = make_preprocessing(resolved_preprocessing(cfg), backbone)
    mismatch = []
    if backbone.identity().get("weights_sha256") != manifest["backbone"].get("weights_sha256"):
        mismatch.append(
            f"backbone weights {backbone.identity().get('weights_sha256', '')[:12]}... vs the run's "
            f"{manifest['backbone'].get('weights_sha256', '')[:12]}..."
        )
    if json.loads(json.dumps(prep.describe())) != manifest["preprocessing"]:
        mismatch.append(f"preprocessing {prep.describe()} vs the run's {manifest['preprocessing']}")
    images, split, digest = site_images(cfg, site, index)
    if digest != manifest["partition_digest"]:
        mismatch.append(
            f"partition {str(digest)[:12]}... vs the run's {manifest['partition_digest'][:12]}..."
        )
    if images.class_names != manifest["class_names"]:
        mismatch.append(f"classes {images.class_names} vs the run's {manifest['class_names']}")
    if mismatch:
        raise ConfigError(f"site {site} cannot join run {manifest['run_id']}: " + "; ".join(mismatch))
    ids = split["train"] + split["val"] + split["test"]
    store = extract_features(images, ids, backbone, prep, cfg, site, progress)
    pixels = (
        load_pixels(images, store.image_ids, prep, progress, f"decoding {site}")
        if METHODS[cfg.method].needs_images
        else None
    )
    method = build_method(cfg, shared["text_features"], backbone, prep, images.class_names)
    data = split_data(site, split, store, shared["reference_x"], pixels)
    return SiteSetup(site, index, method, data, store.provenance)


@dataclass
class SiteOptions:
    """A site's own options, each declared once (fedmedclip/flags.py): the flags of `fedmedclip site run` and
    `run_site`'s keywords; a site the pipeline starts takes the run's values of the same names (`of_run`)."""

    data: str | None = setting(
        None,
        group="site",
        help="this site's images: s3://BUCKET (its own prefix, its own credentials) or a local source "
        "(default: the run's --data)",
    )
    cache_dir: str = setting(
        TrainConfig.cache_dir, group="site", help="feature stores (default: %(default)s)"
    )
    threads: int = setting(
        TrainConfig.threads,
        group="site",
        minimum=1,
        maximum=MAX_THREADS,
        help=f"torch threads for training, at most {MAX_THREADS} (default: %(default)s)",
    )
    join_timeout: float = setting(
        ServerOptions.join_timeout,
        group="site",
        minimum=0,
        help="seconds to wait for the run to appear (default: %(default)s)",
    )
    silence_timeout: float = setting(
        DEFAULT_SILENCE_TIMEOUT,
        group="site",
        minimum=0,
        help="give up after this many seconds without progress and without a heartbeat of the server (its "
        "status, rewritten every 10 s while it waits); a silence of a minute is logged (default: %(default)s)",
    )

    @classmethod
    def of_run(cls, cfg: TrainConfig, options: ServerOptions) -> SiteOptions:
        """A site that the pipeline starts with the run's settings: each option as the run's configuration or
        the server's options declare a field of its name (its data, cache, threads, join timeout), else its
        default."""
        run = {
            d.name: getattr(obj, d.name) for obj in (options, cfg) for d in declared(type(obj), nested=False)
        }
        return cls(**{d.name: run[d.name] for d in declared(cls) if d.name in run})


def run_site(
    mailbox_url: str,
    run_id: str,
    site: str,
    data: str | None = SiteOptions.data,
    cache_dir: str = SiteOptions.cache_dir,
    state_url: str | None = None,
    threads: int = SiteOptions.threads,
    join_timeout: float = SiteOptions.join_timeout,
    silence_timeout: float = SiteOptions.silence_timeout,
    progress: bool = True,
    identity: str | None = None,
    register_identity: bool = False,
) -> None:
    """Join the run as `site`: wait for its manifest, encode this site's own images once, then train until
    the server ends the run. Started again with the same arguments after a crash, it continues.
    `identity`: where this site's identity key is (a PEM file, or an object of its private store), used when
    the run has secure aggregation; with `register_identity` it is created there if missing and its public
    key registered through the mailbox (sites created by the system: the pipeline's)."""
    check_name("site name", site)
    mailbox = Mailbox(open_store(mailbox_url), run_id)
    t0 = time.monotonic()
    key = None
    if register_identity:
        from ..secagg.identity import site_identity
        from .secure import register_identity as register

        key, _ = site_identity(identity or DEFAULT_IDENTITY, create=True)
        register(mailbox, site, key)
    log.info("%s: waiting for run %s in %s", site, run_id, mailbox.store.url)
    manifest = wait_until(
        lambda: read_manifest(mailbox),
        f"the manifest of run {run_id} at {mailbox.where(mailbox.manifest_key)}",
        join_timeout,
        Poller(first=min(0.1, mailbox.poll_cap(2.0)), cap=mailbox.poll_cap(2.0)),
    )
    site_index(manifest, site)  # before its key is read and its images encoded: the run may not have it
    cfg = site_config(manifest, data, cache_dir, threads)
    if manifest.get("secure_aggregation") and key is None:
        from ..secagg.identity import site_identity

        key, _ = site_identity(identity or DEFAULT_IDENTITY)
    state = open_store(state_url or Path(STATE_ROOT) / run_id / site)
    mailbox.put_status(site, "preparing", 0, "encoding its images")
    try:
        setup = prepare_site(cfg, site, manifest, _shared_tensors(mailbox), progress)
    except Exception as exc:  # the server's stall lines then say why this site never sends anything
        mailbox.put_status(site, "failed", 0, f"{type(exc).__name__}: {exc}")
        raise
    torch.set_num_threads(threads)
    log.info(
        "%s: %d training images, %d validation, %d test (ready in %.1f s); state in %s",
        site,
        setup.data.n_train,
        len(setup.data.val_y),
        len(setup.data.test_y),
        time.monotonic() - t0,
        state.url,
    )
    worker = SiteWorker(mailbox, manifest, setup, state, identity=key)
    try:
        worker.run(timeout=silence_timeout)
    except Exception as exc:
        mailbox.put_status(site, "failed", worker.trained, f"{type(exc).__name__}: {exc}")
        raise


__all__ = [
    "SiteOptions",
    "holder_image_ids",
    "method_for",
    "prepare_site",
    "run_server",
    "run_site",
    "server_setup",
]

"""extract: encode one party's own images once with the frozen CLIP into a feature store (the server: the
global test and reference sets; a site: its train/val/test), exactly as the worker's preparation would.

No `from __future__ import annotations`: KFP reads the component's annotations as types.
"""

import json
import shutil
from pathlib import Path

from kfp.dsl import Artifact, Output

from components.kfp_components import SERVER_ROLE


def extract_step(extraction_json: str, role: str, holder: str, index: int, features_dir: str) -> dict:
    """The holder's feature store in `features_dir`; returns its provenance."""
    from fedmedclip.backbone import load_backbone, make_preprocessing
    from fedmedclip.config import TrainConfig
    from fedmedclip.federation.runner import site_images
    from fedmedclip.preparation import SERVER, extract_features, prepare

    # A published backbone (s3://, models:/) is fetched into the cache and hash-checked by load_backbone,
    # before any image is read: a missing or mismatching one fails here, saying how to publish it.
    cfg = TrainConfig(**json.loads(extraction_json), out="").validate()
    if role == SERVER_ROLE:
        store = prepare(cfg, progress=False, holders=[SERVER]).stores[SERVER]
    else:
        # The site's own images only (its own prefix with its own credentials, for published data).
        images, split, _ = site_images(cfg, holder, index)
        backbone = load_backbone(cfg.backbone, cache_dir=cfg.cache_dir)
        prep = make_preprocessing(cfg.preprocessing, backbone)
        ids = split["train"] + split["val"] + split["test"]
        store = extract_features(images, ids, backbone, prep, cfg, holder, progress=False)
    shutil.copytree(store.path, Path(features_dir), dirs_exist_ok=True)
    return store.provenance


def extract_component(
    extraction: str, role: str, party: str, index: int, local_stack: str, features: Output[Artifact]
):
    from components.extract.component import extract_step
    from components.kfp_components import act_as

    act_as(party, local_stack)
    prov = extract_step(extraction, role, party, index, features.path)
    features.metadata.update({"holder": party, "digest": prov["digest"], "images": prov["n_images"]})

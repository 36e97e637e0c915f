"""Kubeflow Pipelines v2 lightweight components: the engine's steps (fedmedclip.engine) as pipeline tasks.

Two halves, in one module so that the image needs only this package:
- `*_step` functions: the work, plain Python on local paths (artifact folders/files). They call the core's
  step functions (load_image_set, make_partition, holder_image_ids + extract_features, site_data,
  reference_features, build_method, site_round, aggregate_round, ...) in the engine's order, so a pipeline
  run gives the engine's metrics bit for bit (tests/test_pipeline.py checks it).
- `*_component` functions: the KFP signatures. KFP ships only a component function's own source into the
  pod, so each body imports its step from this module inside the function (the image has the package).
  `components_for(base_image)` wraps them with `@dsl.component(base_image=..., install_kfp_package=False)`:
  no pip install at pod start, which air-gapped hospital clusters need.

Artifacts (all folders unless noted):
  partition      partition.json (the manifest: image ids only, no pixels)
  features       one holder's feature store (FeatureStore.save layout); a site's never leaves that site
  shared         what the server broadcasts: shared.safetensors {reference_x, text_features}, meta.json
  payload        file: codec bytes of the global module (the broadcast of the next round)
  update         file: codec bytes of one site's update; metadata n_train (the aggregation weight)
  site state     the site's private state: trainer.pt (modules + optimiser), stats.json (per round),
                 evals.json (per round val/test reports), candidates/round_NNN.safetensors (its model part)
  server state   state.pt (full-precision global state), states/, rounds/global_round_NNN.bin, history.json
  run_dir        the run directory of docs/contracts.md (what `fedmedclip train --out` writes)

No `from __future__ import annotations` here: KFP reads the component signatures' annotations as types."""

import functools
import json
import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Output

log = logging.getLogger("fedmedclip.pipeline")

DEFAULT_BASE_IMAGE = "ghcr.io/fedmedclip/train:0.1.0"
# Aggregation and evaluation take one optional input per site: KFP has no list-of-artifacts input fed by
# separately named tasks (only dsl.Collected from a ParallelFor), and sites are unrolled at compile time.
MAX_SITES = 8


# ------------------------------------------------------------------------------------------- helpers
def _config(config_json: str):
    from fedmedclip.config import TrainConfig

    return TrainConfig.from_json(json.loads(config_json)).validate()


def _partition(path: str):
    from fedmedclip.partition import Partition

    return Partition.load(Path(path) / "partition.json")


def _shared(path: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "shared.safetensors")), json.loads(
        (Path(path) / "meta.json").read_text()
    )


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


def _copy_dir(src: str | None, dst: str) -> Path:
    out = Path(dst)
    if src:
        shutil.copytree(src, out, dirs_exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _backbone(cfg):
    from fedmedclip.backbone import load_backbone, make_preprocessing
    from fedmedclip.methods import METHODS

    backbone = load_backbone(cfg.backbone)
    return backbone, make_preprocessing(
        cfg.preprocessing or METHODS[cfg.method].default_preprocessing, backbone
    )


def _method(cfg, shared: dict, meta: dict):
    """build_method as the engine calls it; methods that fine-tune CLIP (needs_images) also get the
    backbone and preprocessing. Returns (method, preprocessing or None)."""
    from fedmedclip.engine import build_method
    from fedmedclip.methods import METHODS

    if not METHODS[cfg.method].needs_images:
        return build_method(cfg, shared["text_features"]), None
    backbone, prep = _backbone(cfg)
    return build_method(cfg, shared["text_features"], backbone, prep, meta["class_names"]), prep


def _image_set(cfg, part, holder: str):
    """The images of `holder`: the data source, or for `s3://BUCKET` data only the holder's own prefix,
    downloaded with the task's credentials."""
    from components.site_data import is_s3, stage_holder
    from fedmedclip.engine import load_image_set

    if not is_s3(cfg.data):
        return load_image_set(cfg)
    return stage_holder(cfg, part, holder)


def _pixels(cfg, part, holder: str, store, prep):
    """A holder's preprocessed pixels (rows as in its store), for needs_images methods; else None."""
    if prep is None:
        return None
    from fedmedclip.engine import load_pixels

    return load_pixels(_image_set(cfg, part, holder), store.image_ids, prep, progress=False)


# ------------------------------------------------------------------------------------------- steps
def prepare_step(params: dict, sites: int, rounds: int, site_names: list, partition_dir: str) -> str:
    """Validate the configuration, draw the partition; returns the resolved TrainConfig as JSON."""
    from components.site_data import catalog_image_set, check_published_partition, is_s3, parse_bucket
    from fedmedclip.config import TrainConfig
    from fedmedclip.engine import load_image_set, partition_for
    from fedmedclip.errors import ConfigError

    p = dict(params)
    p["alpha"] = p.get("alpha") or None  # 0 means "not set": KFP parameters cannot be None
    p["preprocessing"] = p.get("preprocessing") or None
    for key in ("method_options", "synthetic", "split_ratio"):
        if isinstance(p.get(key), str):
            p[key] = json.loads(p[key] or "null") or ({} if key != "split_ratio" else [0.8, 0.1, 0.1])
    cfg = TrainConfig(**p, sites=sites, rounds=rounds, out="").validate()
    if getattr(cfg, "federation", "federated") != "federated":
        raise ConfigError(
            "the pipeline runs federated training; the local/centralized references run in-process"
        )
    if is_s3(cfg.data):
        image_set, catalog = catalog_image_set(parse_bucket(cfg.data))
        part = partition_for(cfg, image_set)
        check_published_partition(cfg, part, catalog)
    else:
        part = partition_for(cfg, load_image_set(cfg))
    if part.site_names != list(site_names):
        # Sites are unrolled at compile time: the graph's site tasks must be the data's sites.
        raise ConfigError(
            f"the pipeline was compiled for sites {list(site_names)} but the partition has "
            f"{part.site_names}: recompile with `fedmedclip pipeline compile --site-names ...`"
        )
    out = _copy_dir(None, partition_dir)
    part.save(out / "partition.json")
    return json.dumps(cfg.to_json())


def _extract(cfg, part, holder: str):
    from fedmedclip.engine import extract_features, holder_image_ids

    image_set = _image_set(cfg, part, holder)
    backbone, prep = _backbone(cfg)
    # Same function, same holder image order as the engine: identical batches, identical features.
    store = extract_features(
        image_set, holder_image_ids(part, holder), backbone, prep, cfg, holder, progress=False
    )
    return store, image_set, backbone, prep


def extract_site_step(config_json: str, partition_dir: str, site: str, features_dir: str) -> None:
    cfg, part = _config(config_json), _partition(partition_dir)
    store, *_ = _extract(cfg, part, site)
    _copy_dir(str(store.path), features_dir)


def extract_server_step(
    config_json: str,
    partition_dir: str,
    features_dir: str,
    shared_dir: str,
    payload_path: str,
    state_dir: str,
) -> None:
    """The server's holder (global test + reference sets), the broadcast, and the initial global module."""
    import torch
    from safetensors.torch import save_file

    from fedmedclip.codec import encode_state
    from fedmedclip.engine import SERVER, reference_features

    cfg, part = _config(config_json), _partition(partition_dir)
    store, image_set, backbone, prep = _extract(cfg, part, SERVER)
    _copy_dir(str(store.path), features_dir)

    shared = _copy_dir(None, shared_dir)
    ref = reference_features(part, store, cfg.transductive)
    save_file(
        {"reference_x": ref.contiguous(), "text_features": store.text_features.contiguous()},
        str(shared / "shared.safetensors"),
    )
    meta = {
        "class_names": image_set.class_names,
        "backbone": backbone.identity(),
        "preprocessing": prep.describe(),
        "feature_dim": backbone.feature_dim,
    }
    (shared / "meta.json").write_text(json.dumps(meta, indent=1))

    method, _ = _method(cfg, {"text_features": store.text_features}, meta)
    state = method.shared_state(method.new_global())
    Path(payload_path).write_bytes(encode_state(state, cfg.codec))
    out = _copy_dir(None, state_dir)
    torch.save(state, out / "state.pt")
    (out / "history.json").write_text("[]")


def site_step(
    config_json: str,
    partition_dir: str,
    site: str,
    site_index: int,
    round_index: int,
    features_dir: str,
    shared_dir: str,
    payload_path: str,
    previous_state_dir: str | None,
    state_dir: str,
    update_path: str | None,
) -> int:
    """A site's task. With a previous state: restore it, take the broadcast global module and evaluate
    the previous round (what the engine does right after aggregating). Then, with `update_path`, train
    round `round_index` and write the update payload. Returns the site's training-sample count."""
    import torch
    from safetensors.torch import save_file

    from fedmedclip.codec import decode_state
    from fedmedclip.engine import site_data, site_model_tensors, site_round
    from fedmedclip.features import FeatureStore
    from fedmedclip.metrics import classification_report

    t0 = time.perf_counter()
    cfg, part = _config(config_json), _partition(partition_dir)
    store = FeatureStore.load(Path(features_dir))
    shared, meta = _shared(shared_dir)
    method, prep = _method(cfg, shared, meta)
    data = site_data(part, site, store, shared["reference_x"], _pixels(cfg, part, site, store, prep))
    trainer = method.new_site(data, site_index)
    down = Path(payload_path).read_bytes()

    out = _copy_dir(previous_state_dir, state_dir)
    evals = _read_json(out / "evals.json", {})
    stats = _read_json(out / "stats.json", [])
    if previous_state_dir:
        trainer.load_state_dict(torch.load(Path(previous_state_dir) / "trainer.pt", weights_only=True))
        trainer.load_shared(decode_state(down))
        done = round_index - 1 if update_path else round_index
        report = lambda x, y: classification_report(trainer.probs(x).numpy(), y.numpy()) if len(y) else None  # noqa: E731
        evals[str(done)] = {"val": report(data.val_x, data.val_y), "test": report(data.test_x, data.test_y)}
        tensors = site_model_tensors(trainer)
        if tensors:
            (out / "candidates").mkdir(exist_ok=True)
            save_file(tensors, str(out / "candidates" / f"round_{done:03d}.safetensors"))
    if update_path:
        up, st = site_round(trainer, down, round_index, cfg.codec)
        Path(update_path).write_bytes(up)
        torch.save(trainer.state_dict(), out / "trainer.pt")
        stats.append(
            {
                "round": round_index,
                "loss": st["loss"],
                "bytes_up": len(up),
                "bytes_down": len(down),
                "seconds": time.perf_counter() - t0,
            }
        )
    else:
        (out / "provenance.json").write_text(json.dumps(store.provenance, indent=1))
    (out / "evals.json").write_text(json.dumps(evals))
    (out / "stats.json").write_text(json.dumps(stats))
    return data.n_train


def aggregate_step(
    config_json: str,
    partition_dir: str,
    round_index: int,
    server_features_dir: str,
    shared_dir: str,
    previous_state_dir: str,
    updates: list,
    payload_path: str,
    state_dir: str,
) -> None:
    """The server: aggregate the sites' update payloads ([(path, n_train)] in site order), broadcast the
    result, and evaluate the global module on the global test set."""
    import torch

    from fedmedclip.codec import decode_state, encode_state
    from fedmedclip.engine import SERVER, _rows, aggregate_round
    from fedmedclip.features import FeatureStore
    from fedmedclip.metrics import classification_report, reliability_bins

    t0 = time.perf_counter()
    cfg, part = _config(config_json), _partition(partition_dir)
    shared, meta = _shared(shared_dir)
    method, prep = _method(cfg, shared, meta)
    previous = torch.load(Path(previous_state_dir) / "state.pt", weights_only=True)
    payloads = [Path(p).read_bytes() for p, _ in updates]
    state = aggregate_round(method, previous, payloads, [int(n) for _, n in updates])
    payload = encode_state(state, cfg.codec)
    Path(payload_path).write_bytes(payload)

    out = _copy_dir(previous_state_dir, state_dir)
    torch.save(state, out / "state.pt")
    (out / "rounds").mkdir(exist_ok=True)
    (out / "rounds" / f"global_round_{round_index:03d}.bin").write_bytes(payload)

    # Evaluate what the sites receive: the codec-rounded module, loaded over a fresh (seeded) global module.
    module = method.new_global()
    module.load_state_dict(decode_state(payload), strict=False)
    server_store = FeatureStore.load(Path(server_features_dir))
    gx, gy = _rows(server_store, part.global_test, _pixels(cfg, part, SERVER, server_store, prep))
    probs = method.global_probs(module, gx).numpy()
    history = _read_json(out / "history.json", [])
    history.append(
        {
            "round": round_index,
            "global": classification_report(probs, gy.numpy()),
            "reliability": reliability_bins(probs, gy.numpy()),
            "bytes_up": [len(p) for p in payloads],
            "seconds": time.perf_counter() - t0,
        }
    )
    (out / "history.json").write_text(json.dumps(history))


def evaluate_step(
    config_json: str,
    partition_dir: str,
    shared_dir: str,
    server_features_dir: str,
    server_state_dir: str,
    site_state_dirs: list,
    run_dir: str,
) -> dict:
    """Select the round (best client-mean validation accuracy, as the engine does), write the run
    directory (results.json, model/, rounds/, plots/ ...) and return results.json."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    from fedmedclip.codec import decode_state
    from fedmedclip.engine import SERVER, _site_mean
    from fedmedclip.plots import plot_accuracy, plot_reliability

    cfg, part = _config(config_json), _partition(partition_dir)
    shared, meta = _shared(shared_dir)
    method, _ = _method(cfg, shared, meta)
    server = Path(server_state_dir)
    ghist = json.loads((server / "history.json").read_text())
    sites = [Path(d) for d in site_state_dirs]
    names = part.site_names
    evals = [json.loads((d / "evals.json").read_text()) for d in sites]
    stats = [json.loads((d / "stats.json").read_text()) for d in sites]

    history = []
    for g in ghist:
        r = g["round"]
        ev = [e[str(r)] for e in evals]
        st = [s[r - 1] for s in stats]
        val = [e["val"]["acc"] for e in ev if e["val"]]
        val_mean = float(np.mean(val)) if val else float(np.mean([e["test"]["acc"] for e in ev]))
        history.append(
            {
                "round": r,
                "global": {k: g["global"][k] for k in ("acc", "bacc")},
                "sites": [
                    {
                        "site": n,
                        "acc": e["test"]["acc"] if e["test"] else None,
                        "bacc": e["test"]["bacc"] if e["test"] else None,
                        "val_acc": e["val"]["acc"] if e["val"] else None,
                    }
                    for n, e in zip(names, ev, strict=True)
                ],
                "val_acc_mean": val_mean,
                "train_loss": float(np.mean([s["loss"] for s in st])),
                "bytes_up": [s["bytes_up"] for s in st],
                "bytes_down": [s["bytes_down"] for s in st],
                # Sites train in parallel: the round's critical path is the slowest site plus aggregation.
                "seconds": max(s["seconds"] for s in st) + g["seconds"],
            }
        )
    best = max(history, key=lambda h: h["val_acc_mean"])["round"]  # first maximum, as the engine
    last = history[-1]["round"]

    def site_rows(r):
        rows = [{"site": n, **(e[str(r)]["test"] or {"n": 0})} for n, e in zip(names, evals, strict=True)]
        return {"sites": rows, "site_mean": _site_mean(rows)}

    out = _copy_dir(None, run_dir)
    (out / "rounds").mkdir(exist_ok=True)
    for f in sorted((server / "rounds").iterdir()):
        shutil.copy2(f, out / "rounds" / f.name)
    (out / "config.json").write_text(json.dumps(cfg.to_json(), indent=2))
    part.save(out / "partition.json")
    provenance = {
        n: json.loads((d / "provenance.json").read_text()) for n, d in zip(names, sites, strict=True)
    }
    provenance[SERVER] = json.loads((Path(server_features_dir) / "provenance.json").read_text())
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1))

    model = out / "model"
    model.mkdir(exist_ok=True)
    received = decode_state((server / "rounds" / f"global_round_{best:03d}.bin").read_bytes())
    save_file({k: v.contiguous() for k, v in received.items()}, str(model / "global.safetensors"))
    save_file({"text_features": shared["text_features"]}, str(model / "text_features.safetensors"))
    for n, d in zip(names, sites, strict=True):
        cand = d / "candidates" / f"round_{best:03d}.safetensors"
        if cand.exists():
            save_file(load_file(str(cand)), str(model / f"site_{n}.safetensors"))
    model_meta = {
        "format_version": 1,
        "method": cfg.method,
        "method_options": method.opt,
        "federation": "federated",
        "class_names": meta["class_names"],
        "prompt_template": cfg.prompt_template,
        "backbone": meta["backbone"],
        "preprocessing": meta["preprocessing"],
        "feature_dim": meta["feature_dim"],
        "sites": names,
        "best_round": best,
        "partition_digest": part.digest,
    }
    (model / "model.json").write_text(json.dumps(model_meta, indent=2))

    g_best, g_last = ghist[best - 1], ghist[last - 1]
    h = history
    results = {
        "method": cfg.method,
        "federation": "federated",
        "partition": {"scheme": cfg.partition, "alpha": cfg.alpha, "seed": cfg.seed, "digest": part.digest},
        "sites": len(names),
        "site_names": names,
        "rounds": cfg.rounds,
        "backbone": meta["backbone"],
        "preprocessing": meta["preprocessing"],
        "method_options": method.opt,
        "metrics": {
            "selection": "best client-mean validation accuracy",
            "best_round": best,
            "global": g_best["global"],
            **site_rows(best),
            "last_round": {"round": last, "global": g_last["global"], **site_rows(last)},
        },
        "reliability": g_best["reliability"],
        "history": h,
        "comm": {
            "codec": cfg.codec,
            "bytes_up_per_site_per_round": float(np.mean([b for r in h for b in r["bytes_up"]])),
            "bytes_down_per_site_per_round": float(np.mean([b for r in h for b in r["bytes_down"]])),
            "total_bytes": int(sum(sum(r["bytes_up"]) + sum(r["bytes_down"]) for r in h)),
        },
        "timing": {
            "seconds_per_round": float(np.mean([r["seconds"] for r in h])),
            "total_seconds": float(sum(r["seconds"] for r in h)),
            "feature_seconds": None,  # measured per task by the orchestrator, not in one process
        },
        "features": {holder: p["digest"] for holder, p in provenance.items()},
        "orchestrator": "kubeflow-pipelines",
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "plots").mkdir(exist_ok=True)
    plot_accuracy(
        h,
        out / "plots" / "accuracy.png",
        title=f"{cfg.method} (federated) · {cfg.partition} · {len(names)} sites",
    )
    plot_reliability(
        results["reliability"],
        out / "plots" / "reliability.png",
        title=f"{cfg.method}: global test (round {best})",
    )
    return results


def export_step(run_dir: str, site: str, onnx_dir: str) -> str:
    """ONNX export of `site` ("global" or a site name) of the run; '' skips. Returns the file or ''."""
    out = _copy_dir(None, onnx_dir)
    if not site:
        log.info("export skipped: export_site is empty")
        return ""
    try:
        from fedmedclip.export import export_onnx
    except ImportError as e:  # the export module ships separately; the pipeline still runs without it
        log.warning("export skipped: fedmedclip.export is not importable (%s)", e)
        return ""
    path = export_onnx(run_dir, site, out / "model.onnx")
    return str(path)


def register_step(
    run_dir: str,
    onnx_dir: str,
    tracking_uri: str,
    experiment: str,
    model_name: str,
    alias: str,
    allow_worse: bool,
) -> str:
    """Log the run to MLflow, register a model version (the ONNX file when there is one) and promote it.
    Returns the model URI, or '' when no tracking server is configured (registration skipped)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        log.warning("registration skipped: no tracking_uri parameter and no MLFLOW_TRACKING_URI")
        return ""
    from components.tracking import PromotionRefused, log_run_dir, promote, register_model

    run_id = log_run_dir(run_dir, experiment, tracking_uri=uri, tags={"orchestrator": "kubeflow-pipelines"})
    onnx = Path(onnx_dir) / "model.onnx"
    version = register_model(run_id, model_name, onnx if onnx.exists() else None, tracking_uri=uri)
    if not alias:
        return version.uri
    try:
        log.info(promote(model_name, version.version, alias, allow_worse, tracking_uri=uri).describe())
    except PromotionRefused as e:
        # The version stays registered; promoting a worse model is a human decision (--allow-worse).
        log.warning("promotion refused: %s", e)
        return version.uri
    return f"models:/{model_name}@{alias}"


# ------------------------------------------------------------------------------------------- KFP components
# Bodies import their step: KFP serialises only the function's source into the pod.
def prepare_component(
    data: str,
    method: str,
    partition_scheme: str,
    alpha: float,
    seed: int,
    batch_size: int,
    codec: str,
    backbone: str,
    preprocessing: str,
    method_options: str,
    synthetic: str,
    split_ratio: str,
    reference_fraction: float,
    transductive: bool,
    prompt_template: str,
    skip_bad_images: bool,
    cache_dir: str,
    sites: int,
    rounds: int,
    site_names: list,
    partition: Output[Artifact],
) -> str:
    from components.kfp_components import prepare_step

    params = dict(
        data=data,
        method=method,
        partition=partition_scheme,
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
    )
    return prepare_step(params, sites, rounds, site_names, partition.path)


def extract_site_component(config: str, partition: Input[Artifact], site: str, features: Output[Artifact]):
    from components.kfp_components import extract_site_step

    extract_site_step(config, partition.path, site, features.path)


def extract_server_component(
    config: str,
    partition: Input[Artifact],
    features: Output[Artifact],
    shared: Output[Artifact],
    payload: Output[Artifact],
    server_state: Output[Artifact],
):
    from components.kfp_components import extract_server_step

    extract_server_step(config, partition.path, features.path, shared.path, payload.path, server_state.path)


def site_train_component(
    config: str,
    partition: Input[Artifact],
    site: str,
    site_index: int,
    round_index: int,
    features: Input[Artifact],
    shared: Input[Artifact],
    payload: Input[Artifact],
    update: Output[Artifact],
    site_state: Output[Artifact],
    previous_state: Optional[Input[Artifact]] = None,  # noqa: UP045 (KFP parses typing.Optional)
):
    from components.kfp_components import site_step

    n_train = site_step(
        config,
        partition.path,
        site,
        site_index,
        round_index,
        features.path,
        shared.path,
        payload.path,
        previous_state.path if previous_state is not None else None,
        site_state.path,
        update.path,
    )
    update.metadata["n_train"] = n_train
    update.metadata["site"] = site


def site_final_component(
    config: str,
    partition: Input[Artifact],
    site: str,
    site_index: int,
    rounds: int,
    features: Input[Artifact],
    shared: Input[Artifact],
    payload: Input[Artifact],
    previous_state: Input[Artifact],
    site_state: Output[Artifact],
):
    from components.kfp_components import site_step

    site_step(
        config,
        partition.path,
        site,
        site_index,
        rounds,
        features.path,
        shared.path,
        payload.path,
        previous_state.path,
        site_state.path,
        None,
    )


def aggregate_component(
    config: str,
    partition: Input[Artifact],
    round_index: int,
    server_features: Input[Artifact],
    shared: Input[Artifact],
    previous_state: Input[Artifact],
    payload: Output[Artifact],
    server_state: Output[Artifact],
    update_0: Optional[Input[Artifact]] = None,  # noqa: UP045
    update_1: Optional[Input[Artifact]] = None,  # noqa: UP045
    update_2: Optional[Input[Artifact]] = None,  # noqa: UP045
    update_3: Optional[Input[Artifact]] = None,  # noqa: UP045
    update_4: Optional[Input[Artifact]] = None,  # noqa: UP045
    update_5: Optional[Input[Artifact]] = None,  # noqa: UP045
    update_6: Optional[Input[Artifact]] = None,  # noqa: UP045
    update_7: Optional[Input[Artifact]] = None,  # noqa: UP045
):
    from components.kfp_components import aggregate_step

    ups = [update_0, update_1, update_2, update_3, update_4, update_5, update_6, update_7]
    aggregate_step(
        config,
        partition.path,
        round_index,
        server_features.path,
        shared.path,
        previous_state.path,
        [(u.path, u.metadata["n_train"]) for u in ups if u is not None],
        payload.path,
        server_state.path,
    )


def evaluate_component(
    config: str,
    partition: Input[Artifact],
    shared: Input[Artifact],
    server_features: Input[Artifact],
    server_state: Input[Artifact],
    run_dir: Output[Artifact],
    metrics: Output[Metrics],
    site_0: Optional[Input[Artifact]] = None,  # noqa: UP045
    site_1: Optional[Input[Artifact]] = None,  # noqa: UP045
    site_2: Optional[Input[Artifact]] = None,  # noqa: UP045
    site_3: Optional[Input[Artifact]] = None,  # noqa: UP045
    site_4: Optional[Input[Artifact]] = None,  # noqa: UP045
    site_5: Optional[Input[Artifact]] = None,  # noqa: UP045
    site_6: Optional[Input[Artifact]] = None,  # noqa: UP045
    site_7: Optional[Input[Artifact]] = None,  # noqa: UP045
):
    from components.kfp_components import evaluate_step

    sites = [site_0, site_1, site_2, site_3, site_4, site_5, site_6, site_7]
    results = evaluate_step(
        config,
        partition.path,
        shared.path,
        server_features.path,
        server_state.path,
        [s.path for s in sites if s is not None],
        run_dir.path,
    )
    m = results["metrics"]
    metrics.log_metric("best_round", m["best_round"])
    for k in ("acc", "bacc", "f1", "ece"):
        metrics.log_metric(f"global_{k}", m["global"][k])
        metrics.log_metric(f"site_mean_{k}", m["site_mean"][k])


def export_component(run_dir: Input[Artifact], site: str, onnx: Output[Artifact]) -> str:
    from components.kfp_components import export_step

    return export_step(run_dir.path, site, onnx.path)


def register_component(
    run_dir: Input[Artifact],
    onnx: Input[Artifact],
    tracking_uri: str,
    experiment: str,
    model_name: str,
    alias: str,
    allow_worse: bool,
) -> str:
    from components.kfp_components import register_step

    return register_step(run_dir.path, onnx.path, tracking_uri, experiment, model_name, alias, allow_worse)


_COMPONENT_FUNCS = {
    "prepare": prepare_component,
    "extract_site": extract_site_component,
    "extract_server": extract_server_component,
    "site_train": site_train_component,
    "site_final": site_final_component,
    "aggregate": aggregate_component,
    "evaluate": evaluate_component,
    "export": export_component,
    "register": register_component,
}


@functools.cache
def components_for(base_image: str = DEFAULT_BASE_IMAGE) -> SimpleNamespace:
    """The components built on `base_image` (our training image; compile option --base-image)."""
    return SimpleNamespace(
        **{
            name: dsl.component(fn, base_image=base_image, install_kfp_package=False)
            for name, fn in _COMPONENT_FUNCS.items()
        }
    )

"""Federated training in one process, built from the same steps the Kubeflow pipeline runs as pods:
prepare (data, partition, per-holder features) -> per round: site_round for every site, then
aggregate_round on the server, then evaluation -> report. Sites and server exchange only codec
payloads (bytes); features, labels and images never leave their holder."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .aggregation import aggregation_weights
from .backbone import Backbone, load_backbone, make_preprocessing
from .codec import decode_state, encode_state
from .config import SYNTHETIC, TrainConfig
from .data import ImageSet, load_image, open_source
from .errors import CheckpointError, ConfigError, DataError
from .features import FeatureStore, build_feature_store, canonical_digest
from .methods import METHODS, Method, MethodContext, SiteData, SiteTrainer
from .metrics import classification_report, reliability_bins
from .partition import Partition, make_partition
from .preprocess import Preprocessing

log = logging.getLogger(__name__)

SERVER = "server"


# ---------------------------------------------------------------- preparation
def load_image_set(cfg: TrainConfig) -> ImageSet:
    """The configured source; `synthetic` is generated once into the cache (deterministic)."""
    if cfg.data.startswith("s3://"):
        raise DataError(
            f"--data {cfg.data}: data published per site to S3 is read by the pipeline's tasks "
            "(`fedmedclip pipeline run --local --data s3://...`); in-process training reads a local folder, "
            "a .csv manifest or 'synthetic'"
        )
    if cfg.data != SYNTHETIC:
        return open_source(cfg.data)
    from . import synthetic

    args = {"sites": cfg.sites or 3, **cfg.synthetic}
    folder = Path(cfg.cache_dir) / "synthetic" / canonical_digest(args)[:16]
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        synthetic.generate(tmp, **args)
        os.replace(tmp, folder)
    return open_source(manifest)


@dataclass
class Prepared:
    cfg: TrainConfig
    image_set: ImageSet
    partition: Partition
    backbone: Backbone
    preprocessing: Preprocessing
    stores: dict[str, FeatureStore]  # holder (site name or "server") -> store
    feature_seconds: float
    # Only for methods with `needs_images`: holder -> uint8 pixels [N, S, S, 3], rows as in its store.
    pixels: dict[str, torch.Tensor] | None = None


def holder_image_ids(partition: Partition, holder: str) -> list[str]:
    """The images a holder encodes: a site its own train/val/test, the server the global test and
    reference sets. The order is fixed, so every runner encodes identical batches."""
    if holder == SERVER:
        return partition.global_test + partition.reference
    s = partition.sites[holder]
    return s["train"] + s["val"] + s["test"]


def extract_features(
    image_set: ImageSet,
    image_ids: list[str],
    backbone: Backbone,
    preprocessing: Preprocessing,
    cfg: TrainConfig,
    holder: str,
    progress: bool = True,
) -> FeatureStore:
    by_id = image_set.by_id()
    records = [by_id[i] for i in image_ids]
    return build_feature_store(
        records,
        image_set.class_names,
        backbone,
        preprocessing,
        cache_root=Path(cfg.cache_dir) / "features",
        prompt_template=cfg.prompt_template,
        skip_bad=cfg.skip_bad_images,
        progress=progress,
        desc=f"encoding {holder}",
    )


# Decoded pixels per (recipe, image path), kept for the life of the process: a comparison grid runs many
# fine-tuning cells over the same images, and decoding + resizing dominates their set-up otherwise.
# About S*S*3 bytes per image (150 kB at 224 px: ~0.5 GB for the 3,264 brain-MRI images).
_PIXEL_CACHE: dict[tuple[str, str], np.ndarray] = {}


def load_pixels(
    image_set: ImageSet,
    image_ids: list[str],
    preprocessing: Preprocessing,
    progress: bool = True,
    desc: str = "decoding",
) -> torch.Tensor:
    """The preprocessed uint8 pixels [N, S, S, 3] of the given images, for methods that train the image
    encoder. Nothing augments, so the geometry is computed once; normalisation runs at every step."""
    by_id = image_set.by_id()
    recipe = json.dumps(preprocessing.describe(), sort_keys=True)
    paths = [by_id[i].path for i in image_ids]
    missing = [p for p in dict.fromkeys(paths) if (recipe, p) not in _PIXEL_CACHE]
    if missing:
        with ThreadPoolExecutor(min(8, (os.cpu_count() or 2) * 2)) as pool:
            arrays = pool.map(lambda p: preprocessing.to_uint8(load_image(p)), missing)
            for p, a in tqdm(
                zip(missing, arrays, strict=True),
                total=len(missing),
                desc=desc,
                unit="img",
                disable=not progress,
                leave=False,
            ):
                _PIXEL_CACHE[(recipe, p)] = a
    if not paths:
        return torch.zeros(0, preprocessing.size, preprocessing.size, 3, dtype=torch.uint8)
    return torch.from_numpy(np.stack([_PIXEL_CACHE[(recipe, p)] for p in paths]))


def partition_for(cfg: TrainConfig, image_set: ImageSet) -> Partition:
    """The configured partition of the image set (the pipeline's prepare task calls this too)."""
    return make_partition(
        image_set,
        cfg.partition,
        cfg.sites if cfg.partition != "natural" else None,
        cfg.alpha,
        cfg.seed,
        cfg.split_ratio,
        cfg.reference_fraction,
    )


def prepare(cfg: TrainConfig, progress: bool = True) -> Prepared:
    cfg.validate()
    image_set = load_image_set(cfg)
    partition = partition_for(cfg, image_set)
    backbone = load_backbone(cfg.backbone)
    prep = make_preprocessing(cfg.preprocessing or METHODS[cfg.method].default_preprocessing, backbone)
    t0 = time.perf_counter()
    stores = {
        h: extract_features(image_set, holder_image_ids(partition, h), backbone, prep, cfg, h, progress)
        for h in [*partition.site_names, SERVER]
    }
    pixels = None
    if METHODS[cfg.method].needs_images:
        # The stores still give the text features and provenance; training reads these pixels.
        pixels = {
            h: load_pixels(image_set, s.image_ids, prep, progress, f"decoding {h}") for h, s in stores.items()
        }
    return Prepared(cfg, image_set, partition, backbone, prep, stores, time.perf_counter() - t0, pixels)


def _rows(
    store: FeatureStore, ids: list[str], pixels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.from_numpy(store.rows(ids))
    return (store.features if pixels is None else pixels)[r], store.labels[r]


def site_data(
    partition: Partition,
    site: str,
    store: FeatureStore,
    reference_x: torch.Tensor | None,
    pixels: torch.Tensor | None = None,
) -> SiteData:
    """A site's train/val/test: cached features, or with `pixels` (rows as in `store`) the images."""
    split = partition.sites[site]
    (trx, tr_y), (vx, vy), (tex, tey) = (_rows(store, split[s], pixels) for s in ("train", "val", "test"))
    return SiteData(site, trx, tr_y, vx, vy, tex, tey, reference_x)


def pooled_data(datas: list[SiteData], name: str = "pooled") -> SiteData:
    """Every site's data in one holder: the centralized reference (an upper bound no hospital can run)."""
    cat = lambda attr: torch.cat([getattr(d, attr) for d in datas])  # noqa: E731
    parts = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    return SiteData(name, *(cat(a) for a in parts), datas[0].reference_x)


def reference_features(partition: Partition, server_store: FeatureStore, transductive: bool) -> torch.Tensor:
    """FACMIC's unlabelled target set: held-out training images, or the global test set itself."""
    ids = partition.global_test if transductive else partition.reference
    return _rows(server_store, ids)[0]


def build_method(
    cfg: TrainConfig,
    text_features: torch.Tensor,
    backbone: Backbone | None = None,
    preprocessing: Preprocessing | None = None,
    class_names: list[str] | None = None,
) -> Method:
    """The configured method. Methods that fine-tune CLIP (`needs_images`) also need the backbone, the
    preprocessing recipe and the class names (for their prompts)."""
    ctx = MethodContext(
        feature_dim=text_features.shape[1],
        num_classes=text_features.shape[0],
        text_features=text_features,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        options=dict(cfg.method_options),
    )
    if METHODS[cfg.method].needs_images:
        if backbone is None or preprocessing is None or class_names is None:
            raise ConfigError(
                f"{cfg.method} fine-tunes CLIP: build_method needs backbone, preprocessing, class_names"
            )
        ctx.backbone, ctx.preprocessing = backbone, preprocessing
        ctx.prompts = [cfg.prompt_template.format(c) for c in class_names]
    return METHODS[cfg.method](ctx)


# ---------------------------------------------------------------- the round steps
def site_round(trainer: SiteTrainer, payload_down: bytes, round_index: int, codec: str) -> tuple[bytes, dict]:
    """A site: decode the global module, train locally, encode the update. Only bytes go in and out."""
    trainer.load_shared(decode_state(payload_down))
    stats = trainer.train_round(round_index)
    return encode_state(trainer.shared_update(), codec), stats


def aggregate_round(
    method: Method, previous: dict, payloads: list[bytes], sample_counts: list[int]
) -> dict[str, torch.Tensor]:
    """The server: decode the site updates and average them by the method's rule."""
    weights = aggregation_weights(method.aggregation_counts(sample_counts), method.weighting)
    return method.aggregate(previous, [decode_state(p) for p in payloads], weights)


def evaluate(
    method: Method,
    global_module,
    trainers: list[SiteTrainer],
    datas: list[SiteData],
    gx,
    gy,
    global_predictions: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict:
    """Global test with the global rule; each site's val and test with its local rule.
    `global_predictions` (probabilities, labels) replaces the global rule where there is no global
    model (local-only training)."""
    probs, labels = global_predictions or (method.global_probs(global_module, gx), gy)
    out = {
        "global": classification_report(probs.numpy(), labels.numpy()),
        "sites": [],
    }
    for t, d in zip(trainers, datas, strict=True):
        val = classification_report(t.probs(d.val_x).numpy(), d.val_y.numpy()) if len(d.val_y) else None
        test = classification_report(t.probs(d.test_x).numpy(), d.test_y.numpy()) if len(d.test_y) else None
        out["sites"].append({"site": d.name, "val": val, "test": test})
    return out


def _site_mean(rows: list[dict]) -> dict:
    keys = ("acc", "bacc", "f1", "ece")
    valid = [r for r in rows if r.get("n")]
    return {k: float(np.mean([r[k] for r in valid])) if valid else float("nan") for k in keys}


# ---------------------------------------------------------------- the in-process federation
class Federation:
    """Holds the server and the sites of one run, and its on-disk checkpoint.

    `cfg.federation` picks how the sites learn: `federated` (the method as published), `local` (each
    site trains alone, nothing travels, no aggregation: the lower reference) or `centralized` (every
    site's training data pooled in one holder: the upper reference). All three are evaluated the same
    way: every site's local test with the model that site would hold, and the global test."""

    def __init__(self, cfg: TrainConfig, prepared: Prepared):
        self.cfg, self.p = cfg, prepared
        self.mode = cfg.federation
        server = prepared.stores[SERVER]
        part = prepared.partition
        if self.mode != "federated" and cfg.method in ("fedprox", "moon"):
            raise ConfigError(
                f"{cfg.method} regularises toward a global model, which --federation {self.mode} does not "
                "have; use fedavg for the local/centralized reference of the fine-tuning baselines"
            )
        self.method = build_method(
            cfg,
            server.text_features,
            prepared.backbone,
            prepared.preprocessing,
            prepared.image_set.class_names,
        )
        pixels = prepared.pixels or {}
        ref = reference_features(part, server, cfg.transductive)
        self.datas = [site_data(part, s, prepared.stores[s], ref, pixels.get(s)) for s in part.site_names]
        # The training units: one per site, or a single holder of all sites' data (centralized).
        self.unit_datas = [pooled_data(self.datas)] if self.mode == "centralized" else self.datas
        self.units = [self.method.new_site(d, k) for k, d in enumerate(self.unit_datas)]
        # What each site predicts with: its own trainer, or in the centralized case the pooled one.
        self.trainers = self.units * len(self.datas) if self.mode == "centralized" else self.units
        self.global_module = self.method.new_global()
        self.global_state = self.method.shared_state(self.global_module)
        if self.mode == "centralized":
            self.units[0].load_shared(self.global_state)  # starts where a federation would
        self.gx, self.gy = _rows(server, part.global_test, pixels.get(SERVER))
        self.round = 0
        self.history: list[dict] = []
        self.best: dict | None = None  # {"round", "val", "global", "sites"}

    def global_predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities and labels on the global test. Local-only training has no global model: every
        site's own module predicts every global test image (the metrics are then over sites x images)."""
        if self.mode != "local":
            return self.method.global_probs(self.global_module, self.gx), self.gy
        scratch = copy.deepcopy(self.global_module)
        probs = []
        for t in self.units:
            scratch.load_state_dict(t.shared_update(), strict=False)
            probs.append(self.method.global_probs(scratch, self.gx))
        return torch.cat(probs), self.gy.repeat(len(self.units))

    def _evaluate(self) -> dict:
        pred = self.global_predictions() if self.mode == "local" else None
        return evaluate(self.method, self.global_module, self.trainers, self.datas, self.gx, self.gy, pred)

    # -- one round
    def _train_units(self, r: int) -> tuple[list[int], list[int], list[float]]:
        """Local and centralized training: nothing crosses a network, so the ledger records 0 bytes."""
        losses = [t.train_round(r)["loss"] for t in self.units]
        if self.mode == "centralized":
            self.global_state = self.units[0].shared_update()
            self.global_module.load_state_dict(self.global_state, strict=False)
        return [0] * len(self.datas), [0] * len(self.datas), losses

    def step(self) -> dict:
        r = self.round + 1
        t0 = time.perf_counter()
        if self.mode != "federated":
            bytes_up, bytes_down, losses = self._train_units(r)
            ev = self._evaluate()
        else:
            down = encode_state(self.global_state, self.cfg.codec)
            ups, losses = [], []
            for t in self.trainers:
                up, stats = site_round(t, down, r, self.cfg.codec)
                ups.append(up)
                losses.append(stats["loss"])
            self.global_state = aggregate_round(
                self.method, self.global_state, ups, [d.n_train for d in self.datas]
            )
            # Evaluate what the sites will actually hold: the codec-rounded global module.
            received = decode_state(encode_state(self.global_state, self.cfg.codec))
            self.global_module.load_state_dict(received, strict=False)
            for t in self.trainers:
                t.load_shared(received)
            ev = evaluate(self.method, self.global_module, self.trainers, self.datas, self.gx, self.gy)
            bytes_up, bytes_down = [len(u) for u in ups], [len(down)] * len(ups)
        val = [s["val"]["acc"] for s in ev["sites"] if s["val"]]
        val_mean = float(np.mean(val)) if val else float(np.mean([s["test"]["acc"] for s in ev["sites"]]))
        record = {
            "round": r,
            "global": {k: ev["global"][k] for k in ("acc", "bacc")},
            "sites": [
                {
                    "site": s["site"],
                    "acc": s["test"]["acc"] if s["test"] else None,
                    "bacc": s["test"]["bacc"] if s["test"] else None,
                    "val_acc": s["val"]["acc"] if s["val"] else None,
                }
                for s in ev["sites"]
            ],
            "val_acc_mean": val_mean,
            "train_loss": float(np.mean(losses)),
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "seconds": time.perf_counter() - t0,
        }
        self.round = r
        self.history.append(record)
        if self.best is None or val_mean > self.best["val"]:
            self.best = self._snapshot(r, val_mean)
        self.last_eval = ev
        return record

    def _snapshot(self, r: int, val: float) -> dict:
        return {
            "round": r,
            "val": val,
            "global": {k: v.clone() for k, v in self.global_state.items()},
            "sites": [copy.deepcopy(t.state_dict()) for t in self.units],
        }

    def _receive(self, state: dict) -> None:
        """Load a global state into the global module and, where one is shared, into the trainers."""
        if self.mode == "federated":
            state = decode_state(encode_state(state, self.cfg.codec))
        self.global_module.load_state_dict(state, strict=False)
        if self.mode == "federated":
            for t in self.units:
                t.load_shared(state)

    def restore(self, snap: dict) -> None:
        for t, s in zip(self.units, snap["sites"], strict=True):
            t.load_state_dict(s)
        self._receive(snap["global"])

    # -- checkpointing: every round, atomically; private site state in per-site files
    def save_checkpoint(self, directory: Path) -> None:
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "best").mkdir(parents=True)
        torch.save(self.global_state, tmp / "server.pt")
        for d, t in zip(self.unit_datas, self.units, strict=True):
            torch.save(t.state_dict(), tmp / f"site_{d.name}.pt")
        torch.save(self.best["global"], tmp / "best" / "server.pt")
        for d, s in zip(self.unit_datas, self.best["sites"], strict=True):
            torch.save(s, tmp / "best" / f"site_{d.name}.pt")
        state = {
            "round": self.round,
            "history": self.history,
            "best_round": self.best["round"],
            "best_val": self.best["val"],
            "config": self.cfg.resume_key(),
        }
        (tmp / "state.json").write_text(json.dumps(state))
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)  # a leftover of an interrupted swap
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, directory: Path) -> None:
        recover_checkpoint(directory)
        try:
            state = json.loads((directory / "state.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"no usable checkpoint in {directory}: {exc}") from None
        if state["config"] != self.cfg.resume_key():
            diff = [k for k in state["config"] if state["config"][k] != self.cfg.resume_key().get(k)]
            raise CheckpointError(
                f"cannot resume {directory}: the configuration differs in {', '.join(diff)}"
            )
        load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
        self.global_state = load(directory / "server.pt")
        for d, t in zip(self.unit_datas, self.units, strict=True):
            t.load_state_dict(load(directory / f"site_{d.name}.pt"))
        if self.mode == "federated":
            received = decode_state(encode_state(self.global_state, self.cfg.codec))
            self.global_module.load_state_dict(received, strict=False)
        else:
            self.global_module.load_state_dict(self.global_state, strict=False)
        self.round, self.history = state["round"], state["history"]
        self.best = {
            "round": state["best_round"],
            "val": state["best_val"],
            "global": load(directory / "best" / "server.pt"),
            "sites": [load(directory / "best" / f"site_{d.name}.pt") for d in self.unit_datas],
        }


def recover_checkpoint(directory: Path) -> bool:
    """Finish a checkpoint swap a kill interrupted. save_checkpoint writes `.tmp` (state.json last),
    moves the live one to `.old`, then `.tmp` into place: with no live checkpoint, a complete `.tmp` is
    the newest round and `.old` the one before. True when a usable checkpoint is in place."""
    if (directory / "state.json").exists():
        return True
    for candidate in (
        directory.with_name(directory.name + ".tmp"),
        directory.with_name(directory.name + ".old"),
    ):
        try:
            json.loads((candidate / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(candidate, directory)
        log.warning("recovered the checkpoint of an interrupted save from %s", candidate.name)
        return True
    return False


# ---------------------------------------------------------------- reporting
def _report(fed: Federation) -> tuple[dict, dict, list]:
    probs, labels = fed.global_predictions()
    ev = evaluate(fed.method, fed.global_module, fed.trainers, fed.datas, fed.gx, fed.gy, (probs, labels))
    sites = [{"site": s["site"], **(s["test"] or {"n": 0})} for s in ev["sites"]]
    return (
        ev["global"],
        {"sites": sites, "site_mean": _site_mean(sites)},
        reliability_bins(probs.numpy(), labels.numpy()),
    )


def site_model_tensors(trainer: SiteTrainer, own_shared: bool = False) -> dict[str, torch.Tensor]:
    """A site's part of the exported model: its private modules and FedMedCLIP's FAM; with `own_shared`
    (local-only training, where the site's shared module never reached the global file) that module too."""
    tensors = {
        f"{name}.{k}": v.detach().clone().contiguous()
        for name, m in trainer.private_modules().items()
        for k, v in m.state_dict().items()
    }
    if hasattr(trainer, "fam"):
        tensors.update(
            {f"fam.{k}": v.detach().clone().contiguous() for k, v in trainer.fam.state_dict().items()}
        )
    elif own_shared:
        tensors.update({f"attention.{k}": v.contiguous() for k, v in trainer.shared_update().items()})
    return tensors


def write_model(fed: Federation, directory: Path) -> None:
    """The selected model in framework-neutral files: what export and serving load."""
    directory.mkdir(parents=True, exist_ok=True)
    p = fed.p
    received = fed.best["global"]
    if fed.mode == "federated":
        received = decode_state(encode_state(received, fed.cfg.codec))
    save_file({k: v.contiguous() for k, v in received.items()}, str(directory / "global.safetensors"))
    save_file({"text_features": p.stores[SERVER].text_features}, str(directory / "text_features.safetensors"))
    for d, t in zip(fed.datas, fed.trainers, strict=True):
        tensors = site_model_tensors(t, own_shared=fed.mode == "local")
        if tensors:
            save_file(tensors, str(directory / f"site_{d.name}.safetensors"))
    meta = {
        "format_version": 1,
        "method": fed.cfg.method,
        "method_options": fed.method.opt,
        "federation": fed.mode,
        "class_names": p.image_set.class_names,
        "prompt_template": fed.cfg.prompt_template,
        "backbone": p.backbone.identity(),
        "preprocessing": p.preprocessing.describe(),
        "feature_dim": p.backbone.feature_dim,
        "sites": p.partition.site_names,
        "best_round": fed.best["round"],
        "partition_digest": p.partition.digest,
    }
    (directory / "model.json").write_text(json.dumps(meta, indent=2))


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a federated training; writes the run directory and returns results."""
    cfg.validate()
    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    if not resume and out.exists() and any(out.iterdir()):
        raise ConfigError(
            f"output directory {str(out)!r} is not empty: pass --resume to continue it, or another --out"
        )
    if resume and not recover_checkpoint(ckpt):
        raise CheckpointError(f"nothing to resume in {str(out)!r}: no checkpoint/state.json")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    prepared = prepare(cfg, progress)
    fed = Federation(cfg, prepared)
    if resume:
        fed.load_checkpoint(ckpt)
        log.info("resuming %s after round %d", out, fed.round)
    (out / "config.json").write_text(json.dumps(cfg.to_json(), indent=2))
    prepared.partition.save(out / "partition.json")
    (out / "provenance.json").write_text(
        json.dumps({h: s.provenance for h, s in prepared.stores.items()}, indent=1)
    )
    (out / "rounds").mkdir(exist_ok=True)

    bar = tqdm(
        total=cfg.rounds, initial=fed.round, desc=f"{cfg.method} rounds", unit="round", disable=not progress
    )
    while fed.round < cfg.rounds:
        rec = fed.step()
        (out / "rounds" / f"global_round_{rec['round']:03d}.bin").write_bytes(
            encode_state(fed.global_state, cfg.codec)
        )
        fed.save_checkpoint(ckpt)
        bar.set_postfix(global_acc=f"{rec['global']['acc']:.3f}", val=f"{rec['val_acc_mean']:.3f}")
        bar.update(1)
    bar.close()

    # Last round first (the live state), then the selected round.
    last_global, last_sites, _ = _report(fed)
    fed.restore(fed.best)
    best_global, best_sites, bins = _report(fed)
    write_model(fed, out / "model")

    h = fed.history
    results = {
        "method": cfg.method,
        "federation": cfg.federation,
        "partition": {
            "scheme": cfg.partition,
            "alpha": cfg.alpha,
            "seed": cfg.seed,
            "digest": prepared.partition.digest,
        },
        "sites": len(fed.datas),
        "site_names": prepared.partition.site_names,
        "rounds": cfg.rounds,
        "backbone": prepared.backbone.identity(),
        "preprocessing": prepared.preprocessing.describe(),
        "method_options": fed.method.opt,
        "metrics": {
            "selection": "best client-mean validation accuracy",
            "best_round": fed.best["round"],
            "global": best_global,
            **best_sites,
            "last_round": {"round": fed.round, "global": last_global, **last_sites},
        },
        "reliability": bins,
        "history": h,
        "comm": {
            "codec": cfg.codec,
            "bytes_up_per_site_per_round": float(np.mean([b for r in h for b in r["bytes_up"]])),
            "bytes_down_per_site_per_round": float(np.mean([b for r in h for b in r["bytes_down"]])),
            "total_bytes": int(sum(sum(r["bytes_up"]) + sum(r["bytes_down"]) for r in h)),
        },
        "timing": {
            "seconds_per_round": float(np.mean([r["seconds"] for r in h])),
            "total_seconds": time.perf_counter() - t_start,
            "feature_seconds": prepared.feature_seconds,
        },
        "features": {holder: s.provenance["digest"] for holder, s in prepared.stores.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    from .plots import plot_accuracy, plot_reliability

    (out / "plots").mkdir(exist_ok=True)
    plot_accuracy(
        h,
        out / "plots" / "accuracy.png",
        title=f"{cfg.method} ({cfg.federation}) · {cfg.partition} · {len(fed.datas)} sites",
    )
    plot_reliability(
        bins,
        out / "plots" / "reliability.png",
        title=f"{cfg.method}: global test (round {fed.best['round']})",
    )
    return results

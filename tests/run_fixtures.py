"""A small fake run directory in the format of docs/contracts.md ("Run directory"), for tests of the
MLOps layers that must not wait for real training. `fedmedclip train --out RUN` writes the same layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedmedclip.digests import canonical_digest, model_digest

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
BACKBONE_SHA = "0" * 64  # matches onnx_fixtures.make_tiny_onnx's default backbone_sha256


def model_files(seed: int = 0) -> dict[str, bytes]:
    """The shared model files (model/global.safetensors, text_features.safetensors) of
    `make_run_dir(seed=...)`: another seed, another run's model."""
    from safetensors.numpy import save

    rng = np.random.default_rng([seed, 1])
    return {
        "text_features.safetensors": save({"text_features": rng.standard_normal((4, 16)).astype(np.float32)}),
        "global.safetensors": save({"w": rng.standard_normal((16, 16)).astype(np.float32)}),
    }


def run_model_digest(seed: int = 0) -> str:
    """The model digest (`fedmedclip.model_digest`) of `make_run_dir(seed=...)`'s model."""
    return model_digest(model_files(seed))


def make_run_dir(
    path: str | Path,
    bacc: float = 0.80,
    acc: float | None = None,
    method: str = "fedmedclip",
    rounds: int = 3,
    sites: tuple[str, ...] = ("site_0", "site_1", "site_2"),
    seed: int = 0,
) -> Path:
    """Write a run directory whose final global balanced accuracy is `bacc`; returns its path."""
    from safetensors.numpy import save_file

    run = Path(path)
    (run / "plots").mkdir(parents=True, exist_ok=True)
    (run / "rounds").mkdir(exist_ok=True)
    (run / "model").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    acc = bacc + 0.02 if acc is None else acc

    config = {
        "method": method,
        "rounds": rounds,
        "seed": seed,
        "backbone": "tiny",
        "optim": {"lr": 0.001, "local_epochs": 1, "batch_size": 32},
        "partition": {"scheme": "dirichlet", "alpha": 0.5, "sites": len(sites)},
        "codec": "fp16",
    }
    body = {
        "scheme": "dirichlet",
        "alpha": 0.5,
        "seed": seed,
        "split_ratio": [0.8, 0.1, 0.1],
        "reference_fraction": 0.0,
        "class_names": CLASSES,
        "sites": {s: {"train": [f"{s}/img{i}" for i in range(4)], "val": [], "test": []} for s in sites},
        "reference": [],
        "global_test": ["test/img0", "test/img1"],
        "counts": {s: {"train": dict.fromkeys(CLASSES, 1)} for s in sites},
    }
    partition = {**body, "digest": canonical_digest(body)}
    backbone = {
        "name": "tiny-random-clip",
        "weights_sha256": BACKBONE_SHA,
        "feature_dim": 16,
        "image_size": 32,
    }
    provenance = {}
    for holder in (*sites, "server"):
        prov = {"backbone": backbone, "n_images": 4, "image_list_sha256": canonical_digest([holder, seed])}
        provenance[holder] = {**prov, "digest": canonical_digest(prov)}

    history = []
    for r in range(1, rounds + 1):
        frac = r / rounds  # metrics climb to the final value at the last round
        history.append(
            {
                "round": r,
                "global": {"acc": acc * frac, "bacc": bacc * frac},
                "sites": [
                    {
                        "site": s,
                        "acc": acc * frac - 0.01 * k,
                        "bacc": bacc * frac - 0.01 * k,
                        "val_acc": 0.5 + 0.1 * frac,
                    }
                    for k, s in enumerate(sites)
                ],
                "val_acc_mean": 0.5 + 0.1 * frac,
                "train_loss": 1.0 / r,
                "bytes_up": [1000] * len(sites),
                "bytes_down": [2000] * len(sites),
                "seconds": 0.5,
            }
        )
        (run / "rounds" / f"global_round_{r:03d}.bin").write_bytes(rng.bytes(256))
    site_metrics = [
        {"site": s, "acc": acc - 0.01 * k, "bacc": bacc - 0.01 * k, "f1": bacc, "ece": 0.05, "n": 20}
        for k, s in enumerate(sites)
    ]
    results = {
        "method": method,
        "partition": {"scheme": "dirichlet", "alpha": 0.5, "seed": seed, "digest": partition["digest"]},
        "sites": len(sites),
        "site_names": list(sites),
        "rounds": rounds,
        "backbone": backbone,
        "preprocessing": {"name": "clip", "size": 32},
        "metrics": {
            "selection": "val_acc_mean",
            "best_round": rounds,
            "global": {"acc": acc, "bacc": bacc, "f1": bacc, "ece": 0.04, "n": 40},
            "sites": site_metrics,
            "site_mean": {"acc": acc, "bacc": bacc, "f1": bacc, "ece": 0.05},
            "last_round": {"round": rounds, "global": {"acc": acc, "bacc": bacc}, "sites": site_metrics},
        },
        "history": history,
        "comm": {
            "codec": "fp16",
            "bytes_up_per_site_per_round": 1000,
            "bytes_down_per_site_per_round": 2000,
            "total_bytes": 9000 * rounds,
        },
        "timing": {"seconds_per_round": 0.5, "total_seconds": 0.5 * rounds, "feature_seconds": 1.0},
    }
    model_json = {
        "method": method,
        "class_names": CLASSES,
        "prompt_template": "a brain MRI showing {}",
        "backbone": backbone,
        "preprocessing": {"name": "clip", "size": 32},
        "feature_dim": 16,
        "site_names": list(sites),
        "best_round": rounds,
    }
    for name, obj in (
        ("config.json", config),
        ("results.json", results),
        ("partition.json", partition),
        ("provenance.json", provenance),
        ("model/model.json", model_json),
    ):
        (run / name).write_text(json.dumps(obj, indent=1))
    for file_name, content in model_files(seed).items():
        (run / "model" / file_name).write_bytes(content)
    for s in sites:
        save_file(
            {"w": rng.standard_normal((16, 4)).astype(np.float32)},
            str(run / "model" / f"site_{s}.safetensors"),
        )
    # Tiny valid PNGs are not needed by MLflow; any bytes under the right names do.
    (run / "plots" / "accuracy.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(64))
    (run / "plots" / "reliability.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(64))
    (run / "checkpoint").mkdir(exist_ok=True)  # internal resume state: must not be logged
    (run / "checkpoint" / "state.bin").write_bytes(b"x")
    return run

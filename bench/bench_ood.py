"""Does the exported OOD score know a scan it was never trained on? (issue 17, measured on unseen data)

Two federated runs (FedMedCLIP, 3 sites, iid): one on the brain MRI set, one on the built-in synthetic
scans. Each run's global model (fitted on the server's images) and site_0's own model (fitted on site_0's)
are exported with `fedmedclip.export` at the stated false-alarm rate, and their ONNX graphs (what the server
runs) score
  - in-distribution images the exporting party never saw: the sites' training images for the global
    model, the other sites' for site_0 -> the measured false-alarm rate (goal: about the stated one);
  - the other data set's images -> the detection rate at that false-alarm rate.
The drift test runs on windows of recent-request embeddings (in-distribution, out-of-distribution, and a
mix) against the exported reference: serving/monitor.py's permutation test and alibi-detect's MMDDrift
(the anchor; pytorch backend, same reference, its own median-heuristic bandwidth) on the same windows.

    # alibi-detect cannot join the project's environment (it needs transformers < 5): the anchor runs from
    # its own folder, without its dependencies (the MMD detector needs none beyond ours; numba is stubbed).
    .venv/bin/pip install --no-deps --target /tmp/alibi-anchor alibi-detect==0.13.0 dill toml catalogue
    nice -n 10 .venv/bin/python bench/bench_ood.py --mri ../shared/datasets/brain-tumor-mri --alibi /tmp/alibi-anchor
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_run(data: str, out: Path, backbone: str, rounds: int, cache: str):
    from fedmedclip.config import TrainConfig
    from fedmedclip.engine import train

    cfg = TrainConfig(data=data, backbone=backbone, rounds=rounds, sites=3, cache_dir=cache, out=str(out))
    if not (out / "results.json").exists():
        train(cfg, progress=False)
    return cfg


def pixels(paths: list[str], pre) -> np.ndarray:
    from concurrent.futures import ThreadPoolExecutor

    from fedmedclip.data import load_preprocessed

    with ThreadPoolExecutor(4) as pool:
        return np.stack(list(pool.map(lambda p: load_preprocessed(p, pre), paths)))


def graph_outputs(onnx_path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    scores, embeddings = [], []
    for start in range(0, len(images), 64):
        s, e = session.run(["ood_score", "drift_embedding"], {"images": images[start : start + 64]})
        scores.append(s)
        embeddings.append(e)
    return (
        np.concatenate(scores),
        np.concatenate(embeddings),
        dict(session.get_modelmeta().custom_metadata_map),
    )


def holder_images(cfg, holder: str, exclude_site: str | None = None) -> list[str]:
    """Image paths of what `holder` never saw: for "server" the sites' training images, for a site the
    other sites' training images."""
    from fedmedclip.preparation import load_image_set, partition_for

    image_set = load_image_set(cfg)
    partition = partition_for(cfg, image_set)
    by_id = image_set.by_id()
    sites = [s for s in partition.site_names if s != exclude_site]
    return [by_id[i].path for s in sites for i in partition.sites[s]["train"]]


def alibi_detector(path: str | None):
    if not path:
        return None
    sys.path.insert(0, path)
    numba = types.ModuleType("numba")  # alibi_detect.cd imports it for detectors this bench does not use

    def njit(*args, **_kwargs):
        return args[0] if args and callable(args[0]) else (lambda f: f)

    numba.njit = numba.jit = njit
    numba.prange = range
    sys.modules.setdefault("numba", numba)
    from alibi_detect.cd import MMDDrift

    return MMDDrift


def drift(reference, sigma, windows: dict[str, list[np.ndarray]], mmd_drift, permutations: int) -> dict:
    from serving.monitor import mmd2_permutation_test

    out = {}
    detector = (
        mmd_drift(
            reference.astype(np.float32),
            backend="pytorch",
            p_val=0.05,
            n_permutations=permutations,
            device="cpu",
        )
        if mmd_drift
        else None
    )
    for kind, batches in windows.items():
        ours, theirs = [], []
        for k, window in enumerate(batches):
            ours.append(mmd2_permutation_test(reference, window, sigma, permutations, 0.05, seed=k)[1])
            if detector is not None:
                theirs.append(float(detector.predict(window.astype(np.float32))["data"]["p_val"]))
        out[kind] = {
            "windows": len(batches),
            "ours_detected": float(np.mean(np.array(ours) < 0.05)),
            "ours_p_median": float(np.median(ours)),
            **(
                {
                    "alibi_detected": float(np.mean(np.array(theirs) < 0.05)),
                    "alibi_p_median": float(np.median(theirs)),
                    "same_decision": float(np.mean((np.array(ours) < 0.05) == (np.array(theirs) < 0.05))),
                }
                if theirs
                else {}
            ),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mri", default=str(ROOT.parent / "shared" / "datasets" / "brain-tumor-mri"))
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rate", type=float, default=0.05, help="stated false-alarm rate")
    parser.add_argument("--ood-images", type=int, default=600, help="images of the other set scored")
    parser.add_argument("--window", type=int, default=200, help="drift window (images)")
    parser.add_argument("--windows", type=int, default=10, help="windows per kind")
    parser.add_argument("--permutations", type=int, default=100)
    parser.add_argument("--alibi", help="folder with alibi-detect (pip install --no-deps --target ...)")
    parser.add_argument("--work", help="keep runs and exports here (default: a temporary folder)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import torch

    from fedmedclip.export import export_onnx
    from fedmedclip.inference import read_model_json
    from fedmedclip.preparation import load_image_set
    from fedmedclip.preprocess import Preprocessing

    torch.set_num_threads(2)
    mmd_drift = alibi_detector(args.alibi)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-ood-"))
    cache = str(work / "cache")
    runs = {
        "mri": train_run(args.mri, work / "run-mri", args.backbone, args.rounds, cache),
        "synthetic": train_run("synthetic", work / "run-synthetic", args.backbone, args.rounds, cache),
    }
    rng = np.random.default_rng(0)
    foreign = {}  # data set -> paths of its images (the other run's OOD set)
    for name, cfg in runs.items():
        records = load_image_set(cfg).records
        foreign[name] = [records[i].path for i in rng.permutation(len(records))[: args.ood_images]]

    results = {"rate": args.rate, "backbone": args.backbone, "models": {}}
    for name, cfg in runs.items():
        other = "synthetic" if name == "mri" else "mri"
        pre = Preprocessing.from_dict(read_model_json(cfg.out)["preprocessing"])
        ood_images = pixels(foreign[other], pre)
        for holder, site in (("server", "global"), ("site_0", "site_0")):
            t0 = time.perf_counter()
            onnx_path = export_onnx(
                cfg.out, site, work / f"{name}-{site}.onnx", ood="require", false_alarm_rate=args.rate
            )
            seen_not = holder_images(cfg, holder, exclude_site=None if holder == "server" else "site_0")
            ids = [seen_not[i] for i in rng.permutation(len(seen_not))[: args.ood_images]]
            id_scores, id_emb, meta = graph_outputs(onnx_path, pixels(ids, pre))
            ood_scores, ood_emb, _ = graph_outputs(onnx_path, ood_images)
            threshold = float(meta["fedmedclip.ood.threshold"])
            reference = (
                np.frombuffer(__import__("base64").b64decode(meta["fedmedclip.drift.reference"]), "<f4")
                .reshape([int(x) for x in meta["fedmedclip.drift.reference_shape"].split(",")])
                .astype(np.float64)
            )
            sigma = float(meta["fedmedclip.drift.sigma"])
            w = args.window
            windows = {
                "in-distribution": [id_emb[rng.permutation(len(id_emb))[:w]] for _ in range(args.windows)],
                "out-of-distribution": [
                    ood_emb[rng.permutation(len(ood_emb))[:w]] for _ in range(args.windows)
                ],
                "25 % OOD": [
                    np.concatenate(
                        [
                            id_emb[rng.permutation(len(id_emb))[: w - w // 4]],
                            ood_emb[rng.permutation(len(ood_emb))[: w // 4]],
                        ]
                    )
                    for _ in range(args.windows)
                ],
            }
            key = f"{name} model, {site}"
            results["models"][key] = {
                "calibration": json.loads(meta["fedmedclip.ood.calibration"]),
                "threshold": threshold,
                "false_alarm_rate_unseen_in_distribution": float((id_scores > threshold).mean()),
                "in_distribution_images": len(id_scores),
                f"detection_rate_{other}": float((ood_scores > threshold).mean()),
                "ood_images": len(ood_scores),
                "drift": drift(reference, sigma, windows, mmd_drift, args.permutations),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            r = results["models"][key]
            print(
                f"{key}: threshold {threshold:.4g}; false alarms on {r['in_distribution_images']} unseen in-distribution "
                f"images {r['false_alarm_rate_unseen_in_distribution']:.1%} (stated {args.rate:.0%}); detection of "
                f"{r['ood_images']} {other} images {r[f'detection_rate_{other}']:.1%}",
                flush=True,
            )
            for kind, d in r["drift"].items():
                print(f"    drift, {kind}: {json.dumps(d)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

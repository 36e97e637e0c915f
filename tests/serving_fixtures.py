"""Small ONNX models that follow the exported-model contract (docs/contracts.md), for the serving tests
and the benchmark. Not a CLIP: a seeded conv net with the same interface (uint8 NHWC in, normalisation
inside the graph, `probabilities` float32 [N, C] and `class_index` int64 [N] out, the metadata_props), with
the sha256 sidecar that `fedmedclip export` writes next to it, and by default the OOD outputs
(`ood_score`: squared distance of the pooled features to their mean on uniform-noise images, calibrated on
other noise images to a 5 % false-alarm rate; `embedding`: the pooled features).

Importing this module needs torch (tests and bench only; the server never imports it).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from fedmedclip.digests import onnx_metadata, ood_metadata, write_sha256_sidecar
from fedmedclip.preprocess import CLIP_MEAN, CLIP_STD, Preprocessing

CLASS_NAMES = ("glioma", "meningioma", "notumor", "pituitary")


def wait_ready(proc, http: str, model: str, log_path: Path, timeout: float = 60.0) -> None:
    """Until the server process `proc` answers that `model` is ready on `http` (host:port); a failed test,
    with the end of the server's log, when it exits first or takes longer than `timeout`."""
    import time

    import pytest
    import requests

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"http://{http}/v2/models/{model}/ready", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"server not ready after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)


def contract_preprocessing(image_size: int) -> Preprocessing:
    """The `clip` recipe at `image_size`: short-side resize + centre crop, so the server's decode path matters."""
    return Preprocessing(
        name="clip", size=image_size, resample="bicubic", center_crop=True, mean=CLIP_MEAN, std=CLIP_STD
    )


def make_contract_onnx(
    path: str | Path,
    *,
    image_size: int = 64,
    class_names: tuple[str, ...] = CLASS_NAMES,
    width: int = 8,
    depth: int = 1,
    seed: int = 0,
    run_id: str = "test-run",
    non_finite: bool = False,
    nan_for_pixel: int | None = None,
    ood: bool = True,
) -> Path:
    """Export a seeded conv classifier to `path` (and its sha256 sidecar) and return it.

    `width`/`depth` scale the compute: the tests use the default (about 1 ms per image), the benchmark a
    heavier net so ONNX Runtime dominates like the real CLIP encoder does. `non_finite`: one weight of the
    head is NaN, as after a diverged training, so every probability is NaN. `nan_for_pixel`: the model is
    fine except for images whose every pixel is this value, which get NaN probabilities (a model that only
    breaks on some inputs, which a warm-up batch cannot see).
    """
    import onnx
    import torch
    from torch import nn

    pre = contract_preprocessing(image_size)
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = [nn.Conv2d(3, width, kernel_size=4, stride=4), nn.GELU()]
            for _ in range(depth - 1):
                layers += [nn.Conv2d(width, width, kernel_size=3, padding=1), nn.GELU()]
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(width, len(class_names))
            self.register_buffer("centre", torch.zeros(width))

        def pooled(self, images: torch.Tensor) -> torch.Tensor:
            return self.features(pre.normalise(images)).mean(dim=(2, 3))

        def forward(self, images: torch.Tensor):
            x = self.pooled(images)
            # Scaled logits so the probabilities are far from uniform and differ between images.
            probs = torch.softmax(self.head(x) * 4.0, dim=-1)
            index = torch.argmax(probs, dim=-1)
            if nan_for_pixel is not None:
                trap = (images == nan_for_pixel).flatten(1).all(dim=1)
                probs = torch.where(trap[:, None], torch.full_like(probs, float("nan")), probs)
            if not ood:
                return probs, index
            return probs, index, ((x - self.centre) ** 2).sum(dim=1), x

    net = Net().eval()
    noise = torch.from_numpy(
        np.random.default_rng(seed + 1).integers(0, 256, (3, 64, image_size, image_size, 3), dtype=np.uint8)
    )
    with torch.no_grad():
        net.centre.copy_(net.pooled(noise[0]).mean(0))
        if non_finite:
            net.head.weight[0, 0] = float("nan")
    example = torch.randint(0, 256, (2, image_size, image_size, 3), dtype=torch.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs = ["probabilities", "class_index", *(["ood_score", "embedding"] if ood else [])]
    # The legacy TorchScript exporter: about 1 s, against several for dynamo, for the same contract graph.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=["images"],
            output_names=outputs,
            dynamic_axes={"images": {0: "N"}, **{name: {0: "N"} for name in outputs}},
            opset_version=17,
            dynamo=False,
        )
    model = onnx.load(str(path))
    meta = onnx_metadata(
        class_names=class_names,
        image_size=image_size,
        preprocessing=pre.describe(),
        backbone="test/tiny-conv",
        backbone_sha256="0" * 64,
        method="fixture",
        site="global",
        run_id=run_id,
    )
    if ood:
        meta.update(_calibrate(path, noise))
    del model.metadata_props[:]
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))
    write_sha256_sidecar(path)
    return path


def _calibrate(path: Path, noise) -> dict[str, str]:
    """The fixture's OOD metadata, as `fedmedclip export` computes it: the conformal threshold on held-out
    in-distribution (noise) images, their embeddings as the drift reference, the median-heuristic bandwidth."""
    import onnxruntime as ort

    from fedmedclip.ood import conformal_threshold, median_bandwidth

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores = session.run(["ood_score"], {"images": noise[1].numpy()})[0]
    reference = session.run(["embedding"], {"images": noise[2].numpy()})[0].astype(np.float32)
    return ood_metadata(
        method="fixture-squared-distance",
        threshold=conformal_threshold(scores.astype(np.float64), 0.05),
        false_alarm_rate=0.05,
        calibration={"holder": "fixture", "calibration_images": len(scores)},
        reference=reference.astype("<f4").tobytes(),
        reference_shape=reference.shape,
        sigma=median_bandwidth(reference.astype(np.float64)),
    )

"""A tiny ONNX model that follows the export contract (docs/contracts.md, "Exported model"), for tests of
tracking, registry and serving that must not depend on the real exporter or a CLIP backbone.

Contract: input `images` uint8 [N, S, S, 3] (NHWC, dynamic N), normalisation inside the graph; outputs
`probabilities` float32 [N, C] (rows sum to 1) and `class_index` int64 [N]; `metadata_props` strings.
The "model" is deterministic: per-channel means of the normalised image, a fixed linear map, softmax.
Its predictions are easy to steer: a pure red / green / blue image is class 0 / 1 / 2, a black one is
class 3 (with the default four classes). Like `fedmedclip export`, it writes the sha256 sidecar next to the
file. By default it claims to hold the model of run_fixtures.make_run_dir's default run (its backbone and its
model digest), so that it registers against that run; `restamp_onnx` makes another run's file of it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from fedmedclip.digests import onnx_metadata, write_sha256_sidecar

DEFAULT = object()  # make_tiny_onnx's model_digest: make_run_dir's default run's

DEFAULT_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def make_tiny_onnx(
    path: str | Path,
    class_names: tuple[str, ...] | list[str] = DEFAULT_CLASSES,
    image_size: int = 32,
    method: str = "fedmedclip",
    site: str = "global",
    run_id: str = "test-run",
    backbone: str = "tiny-random-clip",
    backbone_sha256: str = "0" * 64,
    seed: int = 0,
    extra_metadata: dict[str, str] | None = None,
    model_digest: str = DEFAULT,
) -> Path:
    """Write the model to `path` and return it. About 1-2 s (torch.onnx.export)."""
    import onnx
    import torch
    from run_fixtures import run_model_digest

    from fedmedclip.preprocess import CLIP_MEAN, CLIP_STD, Preprocessing

    pre = Preprocessing(
        name="clip", size=image_size, resample="bicubic", center_crop=True, mean=CLIP_MEAN, std=CLIP_STD
    )
    n_classes = len(class_names)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            weight = torch.randn(3, n_classes, generator=g) * 0.1
            for c in range(n_classes):
                # class c < 3 follows colour channel c; class 3 prefers dark images
                weight[:, c] += 5.0 * torch.eye(3)[c] if c < 3 else (-5.0 if c == 3 else 0.0)
            self.weight = torch.nn.Parameter(weight)
            self.bias = torch.nn.Parameter(torch.zeros(n_classes))

        def forward(self, images):
            x = pre.normalise(images)  # uint8 NHWC -> float NCHW, as the real export does
            pooled = x.mean(dim=(2, 3))
            probabilities = torch.softmax(pooled @ self.weight + self.bias, dim=-1)
            return probabilities, torch.argmax(probabilities, dim=-1)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    # The legacy (TorchScript) exporter: 1 s here against 4 s for dynamo, and the graph is the same contract.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Tiny().eval(),
            (example,),
            str(path),
            input_names=["images"],
            output_names=["probabilities", "class_index"],
            dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}, "class_index": {0: "batch"}},
            external_data=False,
            dynamo=False,
            verbose=False,
        )
    model = onnx.load(str(path))
    metadata = {
        **onnx_metadata(
            class_names=class_names,
            image_size=image_size,
            preprocessing=pre.describe(),
            backbone=backbone,
            backbone_sha256=backbone_sha256,
            method=method,
            site=site,
            run_id=run_id,
            model_digest=run_model_digest() if model_digest is DEFAULT else model_digest,
        ),
        **(extra_metadata or {}),
    }
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    write_sha256_sidecar(path)
    return path


def restamp_onnx(src: str | Path, path: str | Path, metadata: dict[str, str | None]) -> Path:
    """A copy of `src` at `path` with these metadata_props set (None: removed), and its sidecar: another
    run's file, or a file from before a key existed, in milliseconds instead of an export."""
    import onnx

    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    props.update(metadata)
    del model.metadata_props[:]
    for key, value in props.items():
        if value is not None:
            model.metadata_props.add(key=key, value=value)
    onnx.save_model(model, str(path))
    write_sha256_sidecar(path)
    return Path(path)

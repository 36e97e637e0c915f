"""The two preprocessing recipes of the reference code, free of torch at import time.

Split in two so that the served ONNX graph and training agree exactly: `Preprocessing.to_uint8`
(decode-side geometry, PIL) gives an HxWx3 uint8 array; `Preprocessing.normalise` (torch ops,
exported into the ONNX graph) turns a uint8 NHWC batch into the float NCHW tensor the encoder takes.
The server imports this module without torch installed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

PREPROCESSING_NAMES = ("clip", "squash")


@dataclass(frozen=True)
class Preprocessing:
    """One preprocessing recipe. `clip`: resize short side + centre crop + CLIP mean/std (FACMIC code).
    `squash`: plain SxS resize + ImageNet mean/std (FedMedCLIP code)."""

    name: str
    size: int
    resample: str
    center_crop: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """Geometry only: RGB, resized (and cropped) to size x size, as uint8 HxWx3."""
        image = image.convert("RGB")
        resample = _RESAMPLE[self.resample]
        if self.center_crop:
            w, h = image.size
            scale = self.size / min(w, h)
            new_w, new_h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
            image = image.resize((new_w, new_h), resample)
            left = (new_w - self.size) // 2
            top = (new_h - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        else:
            image = image.resize((self.size, self.size), resample)
        return np.array(image, dtype=np.uint8)

    def normalise(self, images_uint8):
        """uint8 NHWC torch tensor -> float32 NCHW, scaled to [0,1] and standardised."""
        import torch

        x = images_uint8.to(torch.float32).permute(0, 3, 1, 2) / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return (x - mean) / std

    def describe(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            name=d["name"],
            size=int(d["size"]),
            resample=d["resample"],
            center_crop=bool(d["center_crop"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )

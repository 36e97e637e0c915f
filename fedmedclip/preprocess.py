"""The two preprocessing recipes of the reference code, free of torch at import time.

Split in two so that the served ONNX graph and training agree exactly: `Preprocessing.to_uint8`
(decode-side geometry, PIL) gives an HxWx3 uint8 array; `Preprocessing.normalise` (torch ops,
exported into the ONNX graph) turns a uint8 NHWC batch into the float NCHW tensor the encoder takes.
The server imports this module without torch installed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .errors import shown

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

PREPROCESSING_NAMES = ("clip", "squash")

# The largest image side a recipe may have: the largest a backbone's config may declare (backbone._SIZE_BOUNDS),
# whose image size every recipe takes. Here, not there, so that the torch-free server reads it too.
MAX_IMAGE_SIZE = 2048

# Pillow modes holding more than 8 bits per grey value: exported MRI/CT slices are often 16-bit PNGs (I;16).
# Pillow's own convert("RGB") clips them at 255 instead of scaling them.
_HIGH_BIT_GREY = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def to_rgb8(image: Image.Image) -> Image.Image:
    """An image as 8-bit RGB with its full bit depth kept in range: 16-bit grey (`I;16`, and `I` as some
    Pillow versions open 16-bit PNGs) by its high byte, value >> 8, exactly as Pillow reads a 16-bit-per-channel
    RGB PNG; every other mode as Pillow converts it. Training (`fedmedclip.data.load_image`) and serving
    (`Preprocessing.to_uint8`) both go through this one function."""
    if image.mode == "RGB":
        return image  # convert would copy it: load_image's RGB is converted again in to_uint8
    if image.mode not in _HIGH_BIT_GREY:
        return image.convert("RGB")
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"grey values {values.min()}..{values.max()} are outside 16 bits: no scale for them")
    return Image.fromarray((values >> 8).astype(np.uint8), mode="L").convert("RGB")


def channel_values_problem(name: str, values) -> str | None:
    """Why `values` cannot be an image mean (or, `name` ending in std, an image std), None when they can: three
    finite numbers, a std's above 0 (it divides)."""
    std = name.endswith("std")
    numbers = isinstance(values, list | tuple) and len(values) == 3
    if (
        numbers
        and all(type(v) in (int, float) and math.isfinite(v) for v in values)
        and not (std and min(values) <= 0)
    ):
        return None
    return f"{name} is {shown(values)}, not three finite numbers" + (" above 0" if std else "")


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

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """What `to_uint8` resizes an image of `size` (width, height) to before its centre crop: the short side
        to `size`, the long one in proportion; a squash, straight to size x size. The server bounds it from an
        image's header before decoding (a thin strip is scaled up on both sides)."""
        if not self.center_crop:
            return self.size, self.size
        w, h = size
        scale = self.size / min(w, h)
        return max(self.size, round(w * scale)), max(self.size, round(h * scale))

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """Geometry only: 8-bit RGB (`to_rgb8`), resized (and cropped) to size x size, as uint8 HxWx3."""
        image = to_rgb8(image)
        new_w, new_h = self.resized_size(image.size)
        image = image.resize((new_w, new_h), _RESAMPLE[self.resample])
        if self.center_crop:
            left = (new_w - self.size) // 2
            top = (new_h - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        return np.array(image, dtype=np.uint8)

    def normalise(self, images_uint8):
        """uint8 NHWC torch tensor -> float32 NCHW, scaled to [0,1] and standardised."""
        import torch

        device = images_uint8.device  # the batch's (feature extraction on a GPU): constants go where it is
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        # One contiguous NCHW float tensor, then the same three operations in place: the values are those of
        # `(x / 255 - mean) / std` to the bit, at a quarter of the time on a CPU (a batch of 32 224x224 images:
        # 3 ms instead of 13 ms on one thread), where three fresh 19 MB tensors cost more than the arithmetic.
        x = images_uint8.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        return x.div_(255.0).sub_(mean).div_(std)

    def describe(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """The recipe `describe` wrote. ValueError names a field no recipe has (an exported model's metadata is
        whoever registered it's: a size of 0 or a std of 0 would serve every image standardised to nonsense)."""
        size, resample, center_crop = d["size"], d["resample"], d["center_crop"]
        if type(size) is not int or not 1 <= size <= MAX_IMAGE_SIZE:
            raise ValueError(
                f"preprocessing size is {shown(size)}, not an integer from 1 to {MAX_IMAGE_SIZE}"
            )
        if resample not in _RESAMPLE:  # to_uint8 would fail on every image
            raise ValueError(f"preprocessing resample is {shown(resample)}, not one of {sorted(_RESAMPLE)}")
        if type(center_crop) is not bool:  # bool("false") is True
            raise ValueError(f"preprocessing center_crop is {shown(center_crop)}, not true or false")
        mean, std = d["mean"], d["std"]
        if problem := channel_values_problem("preprocessing mean", mean) or channel_values_problem(
            "preprocessing std", std
        ):
            raise ValueError(problem)
        return cls(
            name=d["name"],
            size=size,
            resample=resample,
            center_crop=center_crop,
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
        )

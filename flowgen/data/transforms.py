"""The per-image pipeline: any source image -> uint8 (C, S, S) tensor of integer levels.

Order: to a uint8 tensor with the wanted channels, geometry (pad / crop / resize to S),
optional random horizontal flip (train split only), then bit reduction. Every step runs on
uint8, so no float rounding can move a pixel to another level.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from flowgen.data.quantize import Quantize


class ToUint8Image:
    """PIL image or uint8 (C, H, W) tensor -> uint8 (channels, H, W) tensor.

    Any PIL mode is converted (RGBA drops alpha, palette and CMYK become RGB, RGB becomes
    grayscale for channels=1), so a folder of mixed images needs no cleaning first.
    """

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(img, Image.Image):
            if img.mode.startswith("I;16"):
                # PIL's own 16 -> 8 bit conversion clips at 255 instead of rescaling.
                img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
            img = img.convert("L" if self.channels == 1 else "RGB")
            return F.pil_to_tensor(img)
        if img.shape[0] == self.channels:
            return img
        return F.rgb_to_grayscale(img) if self.channels == 1 else F.grayscale_to_rgb(img)

    def __repr__(self) -> str:
        return f"ToUint8Image(channels={self.channels})"


def resize_square(native: int, size: int) -> list:
    """Geometry for a source of square ``native`` x ``native`` images."""
    return [] if native == size else [v2.Resize((size, size), antialias=True)]


def pad_or_resize(native: int, size: int) -> list:
    """MNIST-style 28x28 -> 32x32 by zero padding (the digit keeps its pixels); else resize."""
    pad, odd = divmod(size - native, 2)
    if size > native and not odd:
        return [v2.Pad(pad, fill=0)]
    return resize_square(native, size)


def crop_then_resize(crop: int, size: int) -> list:
    """Centre crop of a fixed size, then resize (CelebA: 148 crop -> 64, as in RealNVP)."""
    return [v2.CenterCrop(crop), v2.Resize((size, size), antialias=True)]


def resize_then_crop(size: int) -> list:
    """Arbitrary images: shorter side -> ``size``, then the central ``size`` x ``size``."""
    return [v2.Resize(size, antialias=True), v2.CenterCrop(size)]


def pixel_pipeline(geometry: Sequence, *, channels: int, num_levels: int | None) -> v2.Compose:
    """The deterministic image transform of every split. The random horizontal flip of the train
    split is not here: the training sampler decides it per epoch and image (``data/sampler.py``),
    so that an interrupted epoch resumes with the very same flips. ``num_levels=None``: the source stores
    levels already (``Quantize``)."""
    return v2.Compose([ToUint8Image(channels), *geometry, Quantize(num_levels)])

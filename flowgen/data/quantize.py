"""From 8-bit pixels to the integer levels {0..K-1} the likelihood is defined on.

An 8-bit pixel p becomes one of K levels by

    level = floor(p · K / 256),

which for K = 2**n_bits (Glow's n_bits=5 CelebA-HQ runs: K = 32) keeps the top ``n_bits`` bits,
p >> (8 - n_bits), so level k covers the pixel values [k·256/K, (k+1)·256/K). K itself comes from
the dataset registry (``flowgen.data.registry.num_levels``). Adding the dequantisation noise and
rescaling happen later, in the model (flowgen/dequantization).
"""

from __future__ import annotations

import torch


def pixels_to_levels(pixels: torch.Tensor, num_levels: int) -> torch.Tensor:
    """uint8 pixels 0..255 -> uint8 levels floor(p·K/256) in 0..K-1 (K <= 256)."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"pixels_to_levels expects a uint8 image tensor, got {pixels.dtype}")
    if num_levels == 256:
        return pixels
    return (pixels.to(torch.int32) * num_levels // 256).to(torch.uint8)


class Quantize:
    """Transform: uint8 image tensor of 8-bit pixels -> uint8 tensor of K levels (``pixels_to_levels``).

    ``num_levels=None`` leaves the values untouched, for sources that already store levels
    (sklearn digits: 0..16).
    """

    def __init__(self, num_levels: int | None) -> None:
        self.num_levels = num_levels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_levels is None:
            if x.dtype != torch.uint8:
                raise TypeError(f"Quantize expects a uint8 image tensor, got {x.dtype}")
            return x
        return pixels_to_levels(x, self.num_levels)

    def __repr__(self) -> str:
        return f"Quantize(num_levels={self.num_levels})"

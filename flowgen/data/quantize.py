"""From 8-bit pixels to the integer levels {0..K-1} the likelihood is defined on.

Reducing the bit depth (Glow's n_bits=5 CelebA-HQ runs) keeps the top ``n_bits`` bits:

    level = pixel >> (8 - n_bits),      K = 2 ** n_bits

so level k covers the pixel values [k * 2**(8-n_bits), (k+1) * 2**(8-n_bits)). Adding the
dequantisation noise and rescaling happen later, in the model (flowgen/dequantization).
"""

from __future__ import annotations

import torch


def levels_for_bits(n_bits: int) -> int:
    """K = 2**n_bits levels for an 8-bit source reduced to ``n_bits`` bits."""
    return 2**n_bits


class Quantize:
    """Transform: uint8 image tensor -> uint8 tensor of levels, ``x >> (8 - n_bits)``.

    ``n_bits=None`` leaves the values untouched, for sources that already store levels
    (sklearn digits: 0..16).
    """

    def __init__(self, n_bits: int | None) -> None:
        self.shift = 0 if n_bits is None else 8 - n_bits

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"Quantize expects a uint8 image tensor, got {x.dtype}")
        return x >> self.shift if self.shift else x

    def __repr__(self) -> str:
        return f"Quantize(shift={self.shift})"

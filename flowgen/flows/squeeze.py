"""Squeeze: 2x2 space-to-depth (RealNVP section 3.6, Glow section 3)."""

from __future__ import annotations

from einops import rearrange

from flowgen.errors import InvalidValueError
from flowgen.flows.base import Flow, zero_logdet


class Squeeze(Flow):
    """(B, C, H, W) -> (B, 4C, H/2, W/2); channel c·4 + 2i + j holds pixel (2h+i, 2w+j) of channel c.

    A permutation of the elements, so log|det| = 0.  The channel order matches openai/glow's
    ``squeeze2d``.
    """

    def forward(self, x, cond=None):
        if x.shape[2] % 2 or x.shape[3] % 2:
            raise InvalidValueError(f"Squeeze needs an even height and width, got {tuple(x.shape[2:])}")
        return rearrange(x, "b c (h i) (w j) -> b (c i j) h w", i=2, j=2), zero_logdet(x)

    def inverse(self, z, cond=None):
        return rearrange(z, "b (c i j) h w -> b c (h i) (w j)", i=2, j=2), zero_logdet(z)

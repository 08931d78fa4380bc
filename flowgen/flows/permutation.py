"""Fixed channel permutations (RealNVP's alternation, Glow's 'reverse' and 'shuffle' baselines)."""

from __future__ import annotations

import torch

from flowgen.flows.base import Flow, zero_logdet


class ChannelPermutation(Flow):
    """z[:, c] = x[:, perm[c]]; a permutation is volume preserving: log|det| = 0."""

    def __init__(self, perm: torch.Tensor):
        super().__init__()
        self.register_buffer("perm", perm.long())
        self.register_buffer("inv_perm", torch.argsort(perm).long())

    def forward(self, x, cond=None):
        return x[:, self.perm], zero_logdet(x)

    def inverse(self, z, cond=None):
        return z[:, self.inv_perm], zero_logdet(z)


class ReversePermutation(ChannelPermutation):
    """Reverse the channel order (Glow's 'reverse' option)."""

    def __init__(self, channels: int):
        super().__init__(torch.arange(channels - 1, -1, -1))


class ShufflePermutation(ChannelPermutation):
    """A fixed random shuffle drawn once from ``seed`` and stored as a buffer (Glow's 'shuffle')."""

    def __init__(self, channels: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        super().__init__(torch.randperm(channels, generator=generator))

"""Uniform dequantization (Theis et al. 2016): u ~ U[0,1)^D, log q(u|x) = 0."""

from __future__ import annotations

import torch

from flowgen.dequantization.base import Dequantization, Generators, uniform_noise


class UniformDequantization(Dequantization):
    """u ~ U[0,1)^D independently of x, so log q(u|x) = 0 and the bound is E_u[log p(y)] - D log K."""

    def __init__(self, num_levels: int):
        super().__init__(num_levels)

    def draw_noise(self, x: torch.Tensor, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        u = uniform_noise(x, generator)  # float32, multiples of 2**-24 in [0, 1 - 2**-24]
        return u, torch.zeros(x.shape[0], device=x.device)

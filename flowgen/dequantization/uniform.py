"""Uniform dequantization (Theis et al. 2016): u ~ U[0,1)^D, log q(u|x) = 0; optionally followed by
Gaussian noise augmentation (TarFlow), whose bound is derived in ``flowgen.dequantization.gaussian_noise``."""

from __future__ import annotations

import math

import torch

from flowgen.dequantization.base import Dequantization, uniform_noise
from flowgen.dequantization.gaussian_noise import gaussian_noise, noise_log_normalizer
from flowgen.errors import InvalidValueError
from flowgen.flows.noise import Generators


class UniformDequantization(Dequantization):
    """u ~ U[0,1)^D independently of x, so log q(u|x) = 0 and the bound is E_u[log p(y)] - D log K.

    With ``noise_std`` = σ > 0 (TarFlow's noise augmentation) the model input is
    y = (x + u)/K - 1/2 + σ ε, ε ~ N(0, I), and the returned log_q = Σ_i log[Φ((y_i + 1/2)/σ) - Φ((y_i - 1/2)/σ)]
    makes ``log_likelihood_bound`` a valid bound on log P(x) again (see ``gaussian_noise``).  y then
    leaves x's bin (``quantize(y)`` is not x); ``bin_centres`` stays noise-free.  σ = 0 is plain
    uniform dequantization, draw for draw.
    """

    def __init__(self, num_levels: int, noise_std: float = 0.0):
        super().__init__(num_levels)
        if isinstance(noise_std, bool) or not (math.isfinite(noise_std) and noise_std >= 0):
            raise InvalidValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        self.noise_std = float(noise_std)

    def draw_noise(self, x: torch.Tensor, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        u = uniform_noise(x, generator)  # float32, multiples of 2**-24 in [0, 1 - 2**-24]
        return u, torch.zeros(x.shape[0], device=x.device)

    def forward(self, x: torch.Tensor, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        y, log_q = super().forward(x, generator)
        if self.noise_std == 0:
            return y, log_q
        y = y + self.noise_std * gaussian_noise(x, generator)
        return y, noise_log_normalizer(y, self.noise_std).float()

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}, noise_std={self.noise_std:g}"

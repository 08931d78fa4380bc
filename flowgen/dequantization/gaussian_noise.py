r"""Gaussian noise augmentation (TarFlow) as part of dequantization, with a likelihood bound that stays valid.

TarFlow trains on inputs with Gaussian noise of std σ added (model units: y ∈ [-1/2, 1/2) before
the noise, so σ_here = σ_ml-tarflow / 2, whose data lie in [-1, 1]).  Here the noise is part of
dequantization:

    y = (x + u)/K - 1/2 + σ ε,      u ~ U[0, 1)^D,  ε ~ N(0, I),

so the flow p_Y is fitted to the dequantized data convolved with N(0, σ² I).  Per pixel, given the
level x_i, y_i has the density of U(x_i/K - 1/2, (x_i+1)/K - 1/2) convolved with N(0, σ²):

    q(y_i | x_i) = K [Φ((y_i - x_i/K + 1/2)/σ) - Φ((y_i - (x_i+1)/K + 1/2)/σ)].

Why log p_Y(y) - log q(y|x) is not a bound.  With uniform noise, y stays in x's bin, and the bin
mass P(x) = ∫_bin p_Y is what the bound estimates.  Gaussian noise leaves the bin, and
E_q[log p_Y(y) - log q(y|x)] bounds ∫ p_Y = 1, not P(x): a model may score ~0 bits per dimension
on every image (for large σ, p_Y ≈ q(·|x) for all x at once).  A discrete model is needed.

The discrete model and its bound.  Decode y back to pixels with the posterior of a uniform prior
on the levels through the same noise channel,

    r(x_i | y_i) = q(y_i | x_i) / m(y_i),   m(t) = Σ_{k=0}^{K-1} q(t | k) = K [Φ((t + 1/2)/σ) - Φ((t - 1/2)/σ)]

(the sum telescopes).  P(x) = ∫ p_Y(y) Π_i r(x_i | y_i) dy is a distribution on {0..K-1}^D for any
flow p_Y, and the evidence lower bound with q(y|x) as the encoder is

    log P(x) >= E_q[ log p_Y(y) + log r(x|y) - log q(y|x) ] = E_q[ log p_Y(y) - Σ_i log m(y_i) ]
             = E_q[ log p_Y(y) - log_q ] - D log K,     log_q := Σ_i log[Φ((y_i + 1/2)/σ) - Φ((y_i - 1/2)/σ)],

exactly the form of ``flowgen.likelihood.log_likelihood_bound`` with ``log_q`` in the place of
log q(u|x); ``importance_weighted_bound`` stays valid too (p_Y(y) r(x|y)/q(y|x) = p_Y(y)/m(y)).
``log_q`` <= 0 and does not depend on the model, so training is plain noise-augmented maximum
likelihood; as σ -> 0 it tends to 0 inside (-1/2, 1/2) and the bound to uniform dequantization's.

Which number compares with published bpd: only σ = 0.  The bound at σ > 0 is valid but loose (the
noise destroys information the flow cannot recover), so a noise-augmented TarFlow (trained for
samples) reports a much higher bpd; TarFlow's published likelihoods (2.99 bpd on ImageNet 64x64)
come from a model trained with uniform dequantization only (ml-tarflow README: --noise_type=uniform).

``UniformDequantization(num_levels, noise_std=σ)`` draws y this way and returns log_q (configs: the
dequantizer's ``noise_std`` follows ``model.noise_std``).
"""

from __future__ import annotations

import math

import torch
from torch.special import log_ndtr

from flowgen.flows.noise import Generators, noise_like


def log1mexp(t: torch.Tensor) -> torch.Tensor:
    """log(1 - e^t) for t <= 0, accurate at both ends (Mächler 2012)."""
    return torch.where(t > -math.log(2.0), torch.log(-torch.expm1(t)), torch.log1p(-torch.exp(t)))


def log_normal_cdf_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Φ(a) - Φ(b)) for a > b without cancellation: when the interval lies mostly in the upper
    tail it is reflected, Φ(a) - Φ(b) = Φ(-b) - Φ(-a), so the larger CDF is never close to 1 - tiny."""
    reflect = (a + b) > 0
    high, low = torch.where(reflect, -b, a), torch.where(reflect, -a, b)
    log_high = log_ndtr(high)
    return log_high + log1mexp(log_ndtr(low) - log_high)


def noise_log_normalizer(y: torch.Tensor, noise_std: float) -> torch.Tensor:
    """log_q = Σ_i log[Φ((y_i + 1/2)/σ) - Φ((y_i - 1/2)/σ)], shape (B,): the term the bound subtracts
    from log p_Y(y) (module docstring); 0 for σ = 0 (y then lies in [-1/2, 1/2))."""
    if noise_std == 0:
        return torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
    y = y if y.dtype == torch.float64 else y.float()
    return log_normal_cdf_difference((y + 0.5) / noise_std, (y - 0.5) / noise_std).flatten(1).sum(1)


def gaussian_noise(x: torch.Tensor, generator: Generators = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, 1) noise shaped like x, drawn from ``generator`` (per image when it is a sequence)."""
    return noise_like(torch.randn, x, generator, dtype)

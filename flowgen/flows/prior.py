"""Gaussian priors of a multi-scale flow: the top prior and the conditional priors of the splits.

Every prior is a diagonal Gaussian N(z; μ, σ²) with log σ predicted by a zero-initialised
network (so every prior starts as N(0, I)):

    log N(z; μ, σ) = Σ_i [ -½ log 2π - log σ_i - ½ ((z_i - μ_i) / σ_i)² ]

Sampling at temperature T draws z = μ + T·σ·ε with ε ~ N(0, I), i.e. T scales every
standard deviation (Glow, section 5 / openai/glow).  All of it runs in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flowgen.errors import InvalidValueError
from flowgen.flows.base import logdet_dtype, no_autocast, sum_except_batch
from flowgen.flows.nets import ZeroConv2d

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Σ over all but the batch dimension of log N(z; mean, exp(log_std)²), shape (B,)."""
    dtype = logdet_dtype(z)
    with no_autocast(z):
        z, mean, log_std = z.to(dtype), mean.to(dtype), log_std.to(dtype)
        eps = (z - mean) * (-log_std).exp()
        return sum_except_batch(-0.5 * LOG_2PI - log_std - 0.5 * eps * eps)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """Σ_i log N(z_i; 0, 1), shape (B,), in float32 (float64 for float64 z) with autocast off."""
    zeros = torch.zeros_like(z)
    return gaussian_log_prob(z, zeros, zeros)


def gaussian_sample(mean: torch.Tensor, log_std: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """z = mean + temperature · exp(log_std) · ε,  ε ~ N(0, I)."""
    if temperature < 0:
        raise InvalidValueError(f"temperature must be >= 0, got {temperature}")
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + temperature * log_std.exp() * eps


class ClassEmbedding(nn.Module):
    """Glow's y-conditioning: a zero-initialised linear map one-hot(y) -> per-channel (μ, log σ) shift."""

    def __init__(self, num_classes: int, out_channels: int):
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(num_classes, out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            raise InvalidValueError(f"this model is class-conditional ({self.num_classes} classes): pass labels y")
        y = torch.as_tensor(y, device=self.linear.weight.device).long().flatten()
        onehot = F.one_hot(y, self.num_classes).to(self.linear.weight.dtype)
        return self.linear(onehot)[:, :, None, None]


class TopPrior(nn.Module):
    """Prior of the last level's latent: N(μ, σ) with learned per-element μ and log σ ("learntop").

    With ``num_classes`` a class embedding adds a per-class shift to (μ, log σ).
    ``learn=False`` gives the fixed standard normal of RealNVP.
    """

    def __init__(self, channels: int, height: int, width: int, learn: bool = True, num_classes: int | None = None):
        super().__init__()
        self.shape = (channels, height, width)
        params = torch.zeros(1, 2 * channels, height, width)
        if learn:
            self.params = nn.Parameter(params)
        else:
            self.register_buffer("params", params)
        self.class_embedding = ClassEmbedding(num_classes, 2 * channels) if num_classes else None

    def mean_log_std(self, batch: int, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.params.expand(batch, -1, -1, -1)
        if self.class_embedding is not None:
            h = h + self.class_embedding(y)
        return h.to(logdet_dtype(h)).chunk(2, dim=1)

    def log_prob(self, z: torch.Tensor, y=None) -> torch.Tensor:
        mean, log_std = self.mean_log_std(z.shape[0], y)
        return gaussian_log_prob(z, mean, log_std)

    def sample(self, n: int, temperature: float = 1.0, y=None, generator=None) -> torch.Tensor:
        mean, log_std = self.mean_log_std(n, y)
        return gaussian_sample(mean, log_std, temperature, generator)


class SplitPrior(nn.Module):
    """Conditional prior of a factored-out latent: z ~ N(μ(x_keep), σ(x_keep)) (Glow's split2d).

    (μ, log σ) = ZeroConv3x3(x_keep); ``learn=False`` gives the fixed N(0, I) of RealNVP.
    """

    def __init__(self, keep_channels: int, out_channels: int, learn: bool = True):
        super().__init__()
        self.out_channels = out_channels
        self.net = ZeroConv2d(keep_channels, 2 * out_channels) if learn else None

    def mean_log_std(self, x_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.net is None:
            shape = (x_keep.shape[0], self.out_channels, *x_keep.shape[2:])
            zeros = torch.zeros(shape, device=x_keep.device, dtype=logdet_dtype(x_keep))
            return zeros, zeros
        return self.net(x_keep).to(logdet_dtype(x_keep)).chunk(2, dim=1)

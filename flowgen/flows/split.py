"""Split / factor-out (RealNVP section 3.6, Glow's split2d): half the channels leave the flow early."""

from __future__ import annotations

import torch
from torch import nn

from flowgen.errors import InvalidValueError
from flowgen.flows.prior import SplitPrior, gaussian_log_prob, gaussian_sample


class Split(nn.Module):
    """x -> (x_keep, z) along channels; z is scored by a prior conditioned on x_keep.

        x_keep = x[:, :C - C//2]      continues through the deeper levels
        z      = x[:, C - C//2:]      factored out,  log p(z | x_keep) = log N(z; μ(x_keep), σ(x_keep))

    The split itself is a coordinate projection (log|det| = 0); its contribution to the
    likelihood is the prior term, which ``forward`` returns.  ``inverse`` concatenates the
    two parts back, drawing z from the prior at a temperature when it is not given.
    """

    def __init__(self, channels: int, learn_prior: bool = True):
        super().__init__()
        if channels < 2:
            raise InvalidValueError(f"Split needs at least 2 channels, got {channels}")
        self.keep_channels = channels - channels // 2
        self.prior = SplitPrior(self.keep_channels, channels // 2, learn=learn_prior)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_keep, z = x[:, : self.keep_channels], x[:, self.keep_channels :]
        mean, log_std = self.prior.mean_log_std(x_keep)
        return x_keep, z, gaussian_log_prob(z, mean, log_std)

    def inverse(
        self, x_keep: torch.Tensor, z: torch.Tensor | None = None, temperature: float = 1.0, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if z is None:
            mean, log_std = self.prior.mean_log_std(x_keep)
            z = gaussian_sample(mean, log_std, temperature, generator).to(x_keep.dtype)
        return torch.cat([x_keep, z], dim=1), z

"""Conditioner networks: the non-invertible networks inside coupling layers and priors.

They never need to be inverted, so they may be any network; what matters is that their last
layer starts at zero so every coupling (and every learned prior) starts as a simple map.
They may run in bf16/fp16 under autocast; couplings cast their outputs back to float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowgen.flows.actnorm import ActNorm


def scaled_conv2d(x: torch.Tensor, conv: nn.Conv2d, log_scale: torch.Tensor, shift: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """(conv(x) + shift) · exp(log_scale) per output channel, computed as ONE convolution.

        (W * x + b + shift) · e^s  =  (W · e^s) * x + (b + shift) · e^s

    Scaling the weight (C_out·C_in·k² numbers) instead of the output (B·C_out·H·W numbers)
    saves two full passes over the activations in the forward and two in the backward.
    """
    scale = log_scale.reshape(-1).exp()
    weight = conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)
    bias = conv.bias
    if shift is not None:
        bias = shift.reshape(-1) if bias is None else bias + shift.reshape(-1)
    if bias is not None:
        bias = bias * scale
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def to_channels_last(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """NHWC memory layout for the convolutions of a conditioner (oneDNN and cuDNN run it faster)."""
    return x.contiguous(memory_format=torch.channels_last) if enabled else x


class ZeroConv2d(nn.Module):
    """Zero-initialised convolution with a learned per-channel log-scale (openai/glow).

        out = (conv(x) + b) * exp(3 · logs)       conv, b and logs all start at zero

    The factor 3 lets the output scale move quickly once training starts.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, logscale_factor: float = 3.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_conv2d(x, self.conv, self.logs * self.logscale_factor)


class ActNormConv2d(nn.Module):
    """Convolution without bias followed by ActNorm (openai/glow's hidden conv layers).

        out = (W * x + b) · exp(s)

    ActNorm's data-dependent initialisation needs the statistics of W * x, so the first training
    batch runs the two layers one after the other; after that they run as one convolution
    (``scaled_conv2d``): the same map, fewer passes over the activations.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.normal_(self.conv.weight, std=0.05)
        self.norm = ActNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.norm._is_initialized():
            return self.norm(self.conv(x))[0]
        return scaled_conv2d(x, self.conv, self.norm.log_scale, self.norm.bias)


class GlowConditioner(nn.Module):
    """Glow's coupling network: conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> ZeroConv3x3.

    With ``channels_last`` the wide hidden activations are stored NHWC (the output returns to
    the default layout): the same numbers, faster convolutions on oneDNN and cuDNN.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 512, channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.net = nn.Sequential(
            ActNormConv2d(in_channels, hidden_channels, 3),
            nn.ReLU(inplace=True),
            ActNormConv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(inplace=True),
            ZeroConv2d(hidden_channels, out_channels, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(to_channels_last(x, self.channels_last)).contiguous()


class ResidualBlock(nn.Module):
    """Pre-activation residual block: x + conv3x3(relu(norm(conv3x3(relu(norm(x))))))."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ResNetConditioner(nn.Module):
    """RealNVP's coupling network: conv3x3 -> num_blocks residual blocks -> norm -> ReLU -> ZeroConv3x3.

    The paper normalises with batch normalisation.  Batch statistics make the coupling's
    output depend on the other images of the batch, so a forward in train mode and an
    inverse in eval mode would not be exact inverses.  GroupNorm normalises each image on its
    own, identically in train and eval mode, and keeps the coupling exactly invertible.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 64, num_blocks: int = 8,
                 channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        groups = _num_groups(hidden_channels)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            *[ResidualBlock(hidden_channels, groups) for _ in range(num_blocks)],
            nn.GroupNorm(groups, hidden_channels),
            nn.ReLU(),
            ZeroConv2d(hidden_channels, out_channels, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(to_channels_last(x, self.channels_last)).contiguous()


def _num_groups(channels: int, max_groups: int = 8) -> int:
    """The largest divisor of ``channels`` not above ``max_groups``."""
    return max(g for g in range(1, max_groups + 1) if channels % g == 0)

r"""Velocity fields v(z, t, c) of continuous-time flows (``flowgen.flows.ode``): smooth networks of the state z,
the time t ∈ [0, 1] and an optional class c.

Time enters through sinusoidal features of a few frequencies (``TimeEmbedding``):

    φ(t) = [sin(2π f_k t), cos(2π f_k t)]_k,   f_k geometric from 1/2 to ``max_frequency`` cycles per unit time,

then a two-layer MLP; a class embedding (row ``num_classes`` = the null class ∅, used when c is None) is added to
it.  Low frequencies keep v smooth in t, which is what keeps an adaptive solver's step count (NFE) down.

Every activation is SiLU (smooth: the trace of the Jacobian and its derivatives exist everywhere) and no layer
mixes samples of a batch (GroupNorm, not BatchNorm): the exact trace relies on it.  The last layer is
zero-initialised, so v = 0 and the flow starts as the identity.

``VelocityMLP``  for vectors (B, D): x -> [Linear -> + W_l e(t, c) -> SiLU] x depth -> Linear.
``VelocityUNet`` for images (B, C, H, W): a small U-Net whose residual blocks add the embedding
                 (GroupNorm -> SiLU -> conv3x3 -> + W e -> GroupNorm -> SiLU -> conv3x3, plus the input);
                 ``resolutions`` resolutions (each halves H and W), the skips of the way down joined on the way up.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VELOCITY_NETS = ("unet", "mlp")


class TimeEmbedding(nn.Module):
    """e(t, c) = MLP(φ(t)) + E[c]: (B,) times (and labels) -> (B, width)."""

    def __init__(self, width: int, num_frequencies: int = 8, max_frequency: float = 2.0,
                 num_classes: int | None = None):
        super().__init__()
        self.register_buffer("frequencies", torch.logspace(math.log10(0.5), math.log10(max_frequency),
                                                           num_frequencies), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_frequencies, width), nn.SiLU(), nn.Linear(width, width))
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)

    def forward(self, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        angles = 2 * math.pi * t[:, None] * self.frequencies.to(t.dtype)
        e = self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))
        if self.class_embed is not None:
            if cond is None:
                cond = torch.full((t.shape[0],), self.num_classes, dtype=torch.long, device=t.device)
            e = e + self.class_embed(cond)
        return e


def zero_init(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class VelocityMLP(nn.Module):
    """v(x, t, c) for (B, D) vectors: hidden layers h_{l+1} = SiLU(W_l h_l + b_l + U_l e(t, c)), zero last layer."""

    def __init__(self, dim: int, hidden: int = 64, depth: int = 3, num_classes: int | None = None):
        super().__init__()
        self.embed = TimeEmbedding(hidden, num_classes=num_classes)
        self.layers = nn.ModuleList([nn.Linear(dim if i == 0 else hidden, hidden) for i in range(depth)])
        self.time_layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth)])
        self.out = zero_init(nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        e = self.embed(t, cond)
        h = x
        for layer, time_layer in zip(self.layers, self.time_layers, strict=True):
            h = F.silu(layer(h) + time_layer(e))
        return self.out(h)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResBlock(nn.Module):
    """h + conv(SiLU(GN(conv(SiLU(GN(h))) + W e))), with a 1x1 convolution on the skip when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, embed_width: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embed = nn.Linear(embed_width, out_channels)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.silu(self.norm1(h))) + self.embed(e)[:, :, None, None]
        out = self.conv2(F.silu(self.norm2(out)))
        return self.skip(h) + out


class VelocityUNet(nn.Module):
    """v(x, t, c) for (B, C, H, W) images: a U-Net of ``resolutions`` resolutions (module docstring).

    width: channels at full resolution, doubled at each lower one; blocks: residual blocks per resolution.
    """

    def __init__(self, channels: int, width: int = 32, resolutions: int = 2, blocks: int = 1,
                 num_classes: int | None = None):
        super().__init__()
        widths = [width * 2**r for r in range(resolutions)]
        embed_width = 4 * width
        self.embed = TimeEmbedding(embed_width, num_classes=num_classes)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.ModuleList()
        previous = width
        for w in widths:
            self.down.append(nn.ModuleList([ResBlock(previous if b == 0 else w, w, embed_width)
                                            for b in range(blocks)]))
            previous = w
        self.middle = ResBlock(previous, previous, embed_width)
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(nn.ModuleList([ResBlock(previous + w if b == 0 else w, w, embed_width)
                                          for b in range(blocks)]))
            previous = w
        self.norm_out = group_norm(previous)
        self.conv_out = zero_init(nn.Conv2d(previous, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        e = self.embed(t, cond)
        h = self.conv_in(x)
        skips = []
        for r, blocks in enumerate(self.down):
            if r > 0:
                h = F.avg_pool2d(h, 2)
            for block in blocks:
                h = block(h, e)
            skips.append(h)
        h = self.middle(h, e)
        for r, blocks in enumerate(self.up):
            if r > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, e)
        return self.conv_out(F.silu(self.norm_out(h)))

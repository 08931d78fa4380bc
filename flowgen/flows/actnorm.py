"""Activation normalisation (Kingma & Dhariwal 2018, Glow, section 3.1)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from flowgen.errors import InvalidValueError
from flowgen.flows.base import Flow, logdet_dtype, no_autocast
from flowgen.flows.memory import DataDependentInit

# Below this per-channel standard deviation the data-dependent scale 1/std is meaningless
# (it would overflow or amplify float noise), so initialisation refuses instead of
# silently producing inf/NaN.  Dequantisation noise alone gives std >= 1/(256*sqrt(12)).
MIN_INIT_STD = 1e-6


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over every rank when torch.distributed is running; identity otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class ActNorm(Flow, DataDependentInit):
    """Per-channel affine map with data-dependent initialisation.

        z = (x + b) * exp(s)                       b, s ∈ R^C broadcast over (H, W)
        log|det dz/dx| = H · W · Σ_c s_c

    On the first forward pass b and s are set so that z has zero mean and unit variance per
    channel over the batch (b = -mean, s = -log std).  The statistics are first summed with
    ``reduce_fn`` (an all-reduce over every rank by default), so that under DDP all ranks
    initialise as if they had seen one large batch.  Whether initialisation happened is the
    buffer ``initialized``: it is saved in checkpoints and a loaded model never re-initialises.
    """

    def __init__(self, channels: int, reduce_fn: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.reduce_fn = reduce_fn
        # Python mirror of the buffer, so the hot path does not read a device tensor every step.
        self._known_initialized = False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # read the loaded flag now, once: the hot path (and a compiled graph) never reads the tensor
        self._known_initialized = self.initialized.device.type != "meta" and bool(self.initialized)

    def _is_initialized(self) -> bool:
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set b, s from the per-channel mean and std of ``x`` (reduced over ranks)."""
        x64 = x.detach().to(torch.float64).transpose(0, 1).flatten(1)  # (C, B*H*W)
        count = torch.full((x64.shape[0], 1), float(x64.shape[1]), dtype=torch.float64, device=x.device)
        stats = torch.cat([x64.sum(1, keepdim=True), (x64 * x64).sum(1, keepdim=True), count], dim=1)
        stats = self.reduce_fn(stats)
        mean = stats[:, 0] / stats[:, 2]
        var = (stats[:, 1] / stats[:, 2] - mean * mean).clamp_min(0.0)
        std = var.sqrt()
        if bool((std < MIN_INIT_STD).any()):
            bad = (std < MIN_INIT_STD).nonzero().flatten().tolist()
            raise InvalidValueError(
                f"ActNorm cannot initialise: channel(s) {bad[:8]} of its input have zero variance "
                f"over the first batch (std < {MIN_INIT_STD}); dequantize the data (add noise) or "
                "use a larger first batch"
            )
        self.bias.copy_((-mean).view_as(self.bias).to(self.bias.dtype))
        self.log_scale.copy_((-std.log()).view_as(self.log_scale).to(self.log_scale.dtype))
        self.initialized.fill_(True)
        self._known_initialized = True

    def _logdet(self, x: torch.Tensor) -> torch.Tensor:
        hw = x.shape[2] * x.shape[3]
        ld = hw * self.log_scale.to(logdet_dtype(x)).sum()
        return ld.expand(x.shape[0])

    def forward(self, x, cond=None):
        if self.training and not self._is_initialized():
            self.initialize(x)
        with no_autocast(x):
            z = (x + self.bias.to(x.dtype)) * self.log_scale.to(x.dtype).exp()
            return z, self._logdet(x)

    def inverse(self, z, cond=None):
        with no_autocast(z):
            x = z * (-self.log_scale.to(z.dtype)).exp() - self.bias.to(z.dtype)
            return x, -self._logdet(z)

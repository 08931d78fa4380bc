"""Coupling layers (NICE, RealNVP, Glow): transform one part of x conditioned on the other.

The input is split by a mask into an identity part x_a and a transformed part x_b, and a
conditioner network h = NN(x_a [, cond]) parametrises an elementwise bijection of x_b:

    additive (NICE)       z_b = x_b + t                     log|det| = 0
    affine, Glow          z_b = (x_b + t) · σ(h_s + 2)       log|det| = Σ log σ(h_s + 2)
    affine, RealNVP       z_b = x_b · exp(α·tanh(h_s)) + t  log|det| = Σ α·tanh(h_s)
    spline (NSF)          z_b = RQS_h(x_b)                  log|det| = Σ log RQS_h'(x_b)

where RQS_h is a monotone rational-quadratic spline on [-B, B] with K bins, identity outside
(``flowgen.flows.splines``); h gives each transformed element its 3K - 1 spline parameters.

z_a = x_a, so the Jacobian is triangular and its log-determinant is the sum above over the
transformed elements only.  The inverse needs h = NN(z_a) = NN(x_a) and is exact.
Both scale parametrisations are bounded, which keeps training stable: σ(·+2) ∈ (0, 1)
starts near 0.88, and α·tanh(·) ∈ (-|α|, |α|) starts at 0. The spline's slopes are bounded
below, its tails are the identity, and zero parameters make it the identity map.

Masks:  'channel'       x_a = one half of the channels, x_b = the other half;
        'checkerboard'  x_a = pixels with (i + j) % 2 == parity, x_b = the others (RealNVP).
``parity`` flips which part is transformed, so consecutive couplings alternate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from flowgen.flows.base import Flow, no_autocast, sum_except_batch, zero_logdet
from flowgen.flows.splines import num_spline_params, rational_quadratic_spline

TRANSFORMS = ("additive", "affine", "spline")
SCALES = ("sigmoid", "tanh")
MASKS = ("channel", "checkerboard")

ConditionerFactory = Callable[[int, int], nn.Module]


def checkerboard(height: int, width: int, parity: int, like: torch.Tensor) -> torch.Tensor:
    """(1, 1, H, W) mask, 1 where (i + j) % 2 == parity (the identity part), else 0."""
    i = torch.arange(height, device=like.device).view(-1, 1)
    j = torch.arange(width, device=like.device).view(1, -1)
    return ((i + j) % 2 == parity).to(like.dtype).view(1, 1, height, width)


class Coupling(Flow):
    """Additive, affine or spline coupling with a channel or checkerboard mask (see module docstring).

    ``scale`` picks the affine scale parametrisation; ``spline_bins`` (K) and ``spline_bound`` (B)
    configure the spline transform.
    """

    def __init__(
        self,
        channels: int,
        conditioner: ConditionerFactory,
        transform: str = "affine",
        scale: str = "sigmoid",
        mask: str = "channel",
        parity: int = 0,
        cond_channels: int = 0,
        spline_bins: int = 8,
        spline_bound: float = 3.0,
    ):
        super().__init__()
        if transform not in TRANSFORMS:
            raise ValueError(f"unknown coupling transform {transform!r}; choose one of {TRANSFORMS}")
        if scale not in SCALES:
            raise ValueError(f"unknown coupling scale {scale!r}; choose one of {SCALES}")
        if mask not in MASKS:
            raise ValueError(f"unknown coupling mask {mask!r}; choose one of {MASKS}")
        if transform == "spline" and (not isinstance(spline_bins, int) or spline_bins < 2 or not spline_bound > 0):
            raise ValueError(f"a spline coupling needs spline_bins >= 2 and spline_bound > 0, got {spline_bins} and "
                             f"{spline_bound}")
        if mask == "channel" and channels < 2:
            raise ValueError(f"a channel coupling needs at least 2 channels, got {channels}")
        self.channels, self.transform, self.scale, self.mask, self.parity = channels, transform, scale, mask, parity
        if mask == "channel":
            self.id_channels = channels // 2
            in_ch, out_ch = self.id_channels, channels - self.id_channels
        else:
            in_ch, out_ch = channels, channels
        self.spline_bins, self.spline_bound = spline_bins, float(spline_bound)
        factor = {"additive": 1, "affine": 2, "spline": num_spline_params(spline_bins)}[transform]
        self.net = conditioner(in_ch + cond_channels, factor * out_ch)
        if transform == "affine" and scale == "tanh":
            self.alpha = nn.Parameter(torch.ones(1, out_ch, 1, 1))

    # -- masking ---------------------------------------------------------------------------
    def _split(self, x):
        """Return (conditioner input, part to transform, mask of transformed elements or None)."""
        if self.mask == "channel":
            if self.parity == 0:
                return x[:, : self.id_channels], x[:, self.id_channels :], None
            return x[:, self.channels - self.id_channels :], x[:, : self.channels - self.id_channels], None
        keep = checkerboard(x.shape[2], x.shape[3], self.parity, x)
        return x * keep, x, 1.0 - keep

    def _merge(self, x_a, z_b, x, change):
        if self.mask == "channel":
            return torch.cat([x_a, z_b], 1) if self.parity == 0 else torch.cat([z_b, x_a], 1)
        return torch.where(change > 0, z_b, x)  # identity part untouched (exactly), the rest replaced

    # -- the elementwise bijection ---------------------------------------------------------
    def _params(self, x_a, cond, dtype) -> tuple[torch.Tensor, ...]:
        """The conditioner's parameters of the map: (shift,), (shift, log_scale) or spline (widths, heights, slopes)."""
        inp = x_a if cond is None else torch.cat([x_a, cond.to(x_a.dtype)], 1)
        h = self.net(inp).to(dtype)  # the conditioner may run in bf16; the map runs in float32
        if self.transform == "additive":
            return (h,)
        if self.transform == "spline":
            # channel-major layout: output channel c holds element c's 3K - 1 parameters
            h = rearrange(h, "b (c p) h w -> b c h w p", p=num_spline_params(self.spline_bins))
            k = self.spline_bins
            return h[..., :k], h[..., k : 2 * k], h[..., 2 * k :]
        shift, raw = h.chunk(2, dim=1)
        if self.scale == "sigmoid":
            return shift, F.logsigmoid(raw + 2.0)
        return shift, self.alpha.to(dtype) * torch.tanh(raw)

    def _map(self, x_b, params, inverse: bool, derivative: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The elementwise bijection (or its inverse) and its elementwise log-derivative (None when 0,
        or when ``derivative`` is False: the map alone)."""
        if self.transform == "additive":
            (shift,) = params
            return (x_b - shift if inverse else x_b + shift), None
        if self.transform == "spline":
            return rational_quadratic_spline(x_b, *params, bound=self.spline_bound, inverse=inverse,
                                             derivative=derivative)
        shift, log_scale = params
        if inverse:  # sigmoid: z = (x + t) · e^s;  tanh: z = x · e^s + t
            neg_log_scale = -log_scale  # the inverse's log-derivative, and its scale's exponent
            inverse_scale = neg_log_scale.exp()
            x_b = x_b * inverse_scale - shift if self.scale == "sigmoid" else (x_b - shift) * inverse_scale
            return x_b, (neg_log_scale if derivative else None)
        if self.scale == "sigmoid":
            return (x_b + shift) * log_scale.exp(), log_scale
        return x_b * log_scale.exp() + shift, log_scale

    def _logdet(self, x, log_derivative, change):
        if log_derivative is None:
            return zero_logdet(x)
        if change is not None:  # checkerboard: only the transformed elements count
            log_derivative = log_derivative * change
        return sum_except_batch(log_derivative)

    def log_scales(self, x, cond=None) -> torch.Tensor | None:
        """log |∂z_i/∂x_i| of every element of x the coupling transforms, flat (the affine log-scale s;
        a spline's log-slope at x_i), for diagnostics; None for additive couplings (all 0)."""
        x_a, x_b, change = self._split(x)
        params = self._params(x_a, cond, x.dtype)
        with no_autocast(x):
            _, log_derivative = self._map(x_b, params, inverse=False)
        if log_derivative is None:
            return None
        if change is None:  # channel mask: every element of x_b is transformed
            return log_derivative.flatten()
        return log_derivative.masked_select(change.expand_as(log_derivative) > 0)  # checkerboard: half of them

    def forward(self, x, cond=None):
        x_a, x_b, change = self._split(x)
        params = self._params(x_a, cond, x.dtype)
        with no_autocast(x):
            z_b, log_derivative = self._map(x_b, params, inverse=False)
            return self._merge(x_a, z_b, x, change), self._logdet(x, log_derivative, change)

    def inverse(self, z, cond=None):
        x, log_derivative, change = self._inverse(z, cond, derivative=True)
        with no_autocast(z):
            return x, self._logdet(z, log_derivative, change)

    def invert(self, z, cond=None):
        """x alone: no log-derivative and no sum over the transformed elements (sampling)."""
        return self._inverse(z, cond, derivative=False)[0]

    def _inverse(self, z, cond, derivative: bool):
        z_a, z_b, change = self._split(z)
        params = self._params(z_a, cond, z.dtype)
        with no_autocast(z):
            x_b, log_derivative = self._map(z_b, params, inverse=True, derivative=derivative)
            return self._merge(z_a, x_b, z, change), log_derivative, change

    def reconstruct(self, z, cond=None):
        """For invertible backprop (flowgen.flows.memory): (x, z', logdet') where x = f^{-1}(z) is a
        leaf that requires grad and (z', logdet') = f(x) is recomputed with its graph, running the
        conditioner ONCE instead of once for the inverse and once for the recompute.

        The identity part of z is the identity part of x bit for bit, so the conditioner runs on
        it, with grad, from a leaf that still holds z; the transformed part of x is then written into
        the leaf's other positions (outside autograd: the conditioner never read them).
        """
        x = z.detach().clone().requires_grad_(True)
        x_a, _, change = self._split(x)
        params = self._params(x_a, cond, z.dtype)
        with torch.no_grad(), no_autocast(z):
            z_a, z_b, _ = self._split(z)
            x_b, _ = self._map(z_b, params, inverse=True, derivative=False)
            x.data.copy_(self._merge(z_a, x_b, z, change))
        _, x_b, _ = self._split(x)
        with no_autocast(x):
            z_b, log_derivative = self._map(x_b, params, inverse=False)
            return x, self._merge(x_a, z_b, x, change), self._logdet(x, log_derivative, change)

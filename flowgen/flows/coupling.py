"""Coupling layers (NICE, RealNVP, Glow): transform one part of x conditioned on the other.

The input is split by a mask into an identity part x_a and a transformed part x_b, and a
conditioner network h = NN(x_a [, cond]) parametrises an elementwise bijection of x_b:

    z_b = f_h(x_b)        log|det dz/dx| = Σ_{i ∈ b} log f_h'(x_i)

with f any elementwise transform of ``flowgen.transforms``: additive (NICE), affine with Glow's
σ(h_s + 2) or RealNVP's α·tanh(h_s) scale, or a rational-quadratic spline (NSF); h gives each
transformed element its ``transform.num_params`` numbers.

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
from einops import rearrange
from torch import nn

from flowgen.errors import InvalidValueError
from flowgen.flows.base import Flow, no_autocast, sum_except_batch, zero_logdet
from flowgen.transforms import Spline, TransformOptions, make_transform

MASKS = ("channel", "checkerboard")

ConditionerFactory = Callable[[int, int], nn.Module]


def checkerboard(height: int, width: int, parity: int, like: torch.Tensor) -> torch.Tensor:
    """(1, 1, H, W) mask, 1 where (i + j) % 2 == parity (the identity part), else 0."""
    i = torch.arange(height, device=like.device).view(-1, 1)
    j = torch.arange(width, device=like.device).view(1, -1)
    return ((i + j) % 2 == parity).to(like.dtype).view(1, 1, height, width)


class Coupling(Flow):
    """A coupling with any elementwise transform of ``flowgen.transforms`` and a channel or checkerboard mask.

    ``transform`` names the transform (``TRANSFORMS``); ``scale`` picks the affine scale
    parametrisation; ``spline_bins`` (K) and ``spline_bound`` (B) configure the spline.  The
    conditioner's output holds parameter p of transformed channel c at channel p·C_b + c, except for
    splines, whose 3K - 1 numbers per channel are contiguous (c·P + p): the layout flowgen's spline
    checkpoints have always had, kept so that they load with the same meaning.
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
        if mask not in MASKS:
            raise InvalidValueError(f"unknown coupling mask {mask!r}; choose one of {MASKS}")
        if mask == "channel" and channels < 2:
            raise InvalidValueError(f"a channel coupling needs at least 2 channels, got {channels}")
        self.channels, self.mask, self.parity = channels, mask, parity
        if mask == "channel":
            self.id_channels = channels // 2
            in_ch, out_ch = self.id_channels, channels - self.id_channels
        else:
            in_ch, out_ch = channels, channels
        options = TransformOptions(scale=scale, alpha_shape=(1, out_ch, 1, 1), spline_bins=spline_bins,
                                   spline_bound=spline_bound)
        self.transform = make_transform(transform, options)
        self.net = conditioner(in_ch + cond_channels, self.transform.num_params * out_ch)

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
    def _params(self, x_a, cond, dtype) -> torch.Tensor:
        """The conditioner's parameters of the map, (B, C_b, H, W, num_params), in the map's dtype."""
        inp = x_a if cond is None else torch.cat([x_a, cond.to(x_a.dtype)], 1)
        h = self.net(inp).to(dtype)  # the conditioner may run in bf16; the map runs in float32
        layout = "b (c p) h w -> b c h w p" if isinstance(self.transform, Spline) else "b (p c) h w -> b c h w p"
        return rearrange(h, layout, p=self.transform.num_params)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the transforms were objects keep RealNVP's α at <coupling>.alpha
        if prefix + "alpha" in state_dict and prefix + "transform.alpha" not in state_dict:
            state_dict[prefix + "transform.alpha"] = state_dict.pop(prefix + "alpha")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
            _, log_derivative = self.transform(x_b, params)
        if log_derivative is None:
            return None
        if change is None:  # channel mask: every element of x_b is transformed
            return log_derivative.flatten()
        return log_derivative.masked_select(change.expand_as(log_derivative) > 0)  # checkerboard: half of them

    def forward(self, x, cond=None):
        x_a, x_b, change = self._split(x)
        params = self._params(x_a, cond, x.dtype)
        with no_autocast(x):
            z_b, log_derivative = self.transform(x_b, params)
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
            if derivative:
                x_b, log_derivative = self.transform.inverse(z_b, params)
            else:
                x_b, log_derivative = self.transform.invert(z_b, params), None
            return self._merge(z_a, x_b, z, change), log_derivative, change

    def reconstruct(self, z, cond=None, input_grad: bool = True):
        """For invertible backprop (flowgen.flows.memory): (x, z', logdet') where x = f^{-1}(z) is a
        leaf that requires grad and (z', logdet') = f(x) is recomputed with its graph, running the
        conditioner ONCE instead of once for the inverse and once for the recompute.

        The identity part of z is the identity part of x bit for bit, so the conditioner runs on
        it, with grad, from a leaf that still holds z; the transformed part of x is then written into
        the leaf's other positions (outside autograd: the conditioner never read them).
        """
        x = z.detach().clone().requires_grad_(True)  # with grad always: the conditioner's graph starts here
        x_a, _, change = self._split(x)
        params = self._params(x_a, cond, z.dtype)
        with torch.no_grad(), no_autocast(z):
            z_a, z_b, _ = self._split(z)
            x_b = self.transform.invert(z_b, params)
            x.data.copy_(self._merge(z_a, x_b, z, change))
        _, x_b, _ = self._split(x)
        with no_autocast(x):
            z_b, log_derivative = self.transform(x_b, params)
            return x, self._merge(x_a, z_b, x, change), self._logdet(x, log_derivative, change)

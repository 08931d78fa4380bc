"""Monotone rational-quadratic splines (Durkan et al. 2019, "Neural Spline Flows"), elementwise.

On [-B, B] the map is a piecewise rational-quadratic function through K+1 knots
(x_0, y_0) = (-B, -B), ..., (x_K, y_K) = (B, B) with positive slopes d_0..d_K at the knots;
outside it is the identity (linear tails of slope 1, so d_0 = d_K = 1 and the map is C^1).
In bin k, with width w = x_{k+1} - x_k, height h = y_{k+1} - y_k, slope s = h / w and
ξ = (x - x_k) / w ∈ [0, 1]:

    y  = y_k + h [s ξ² + d_k ξ(1-ξ)] / [s + (d_{k+1} + d_k - 2s) ξ(1-ξ)]

    dy/dx = s² [d_{k+1} ξ² + 2s ξ(1-ξ) + d_k (1-ξ)²] / [s + (d_{k+1} + d_k - 2s) ξ(1-ξ)]²

Inverse: for y in bin k, ξ is the root in [0, 1] of a ξ² + b ξ + c = 0 with

    a = h (s - d_k) + (y - y_k)(d_{k+1} + d_k - 2s)
    b = h d_k - (y - y_k)(d_{k+1} + d_k - 2s)
    c = -s (y - y_k)

taken in the form ξ = 2c / (-b - sqrt(b² - 4ac)), which does not cancel when a → 0
(b² - 4ac ≥ 0 for a monotone spline; it is clamped at 0 against rounding).

Parametrisation from unconstrained numbers (the conditioner's outputs, K widths, K heights,
K-1 interior slopes): widths and heights are softmaxes scaled to 2B with a floor
(``MIN_BIN``) so no bin collapses; slopes are softplus with a floor (``MIN_SLOPE``), shifted
so that an output of 0 gives slope exactly 1. All-zero parameters are therefore equal bins
with unit slopes, which is the identity map: a zero-initialised conditioner starts the
coupling at the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flowgen.errors import InvalidValueError

MIN_BIN = 1e-3  # smallest bin width / height, as a fraction of 2B
MIN_SLOPE = 1e-3
# softplus(u + SLOPE_SHIFT) + MIN_SLOPE == 1 at u = 0
SLOPE_SHIFT = math.log(math.expm1(1.0 - MIN_SLOPE))


def num_spline_params(bins: int) -> int:
    """Unconstrained numbers per transformed element: K widths, K heights, K - 1 interior slopes."""
    return 3 * bins - 1


def _knots(unnormalised: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(knot positions (..., K+1) from -B to B exactly, bin sizes (..., K))."""
    bins = unnormalised.shape[-1]
    fractions = MIN_BIN + (1 - MIN_BIN * bins) * torch.softmax(unnormalised, dim=-1)
    knots = F.pad(torch.cumsum(fractions, dim=-1), (1, 0))
    knots = (2 * knots - 1) * bound
    # the ends exactly at ±B (a cumulative sum of softmaxes only comes within rounding of 1)
    ends = torch.ones_like(knots[..., :1]) * bound
    knots = torch.cat([-ends, knots[..., 1:-1], ends], dim=-1)
    return knots, knots[..., 1:] - knots[..., :-1]


def _bin_index(knots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index k with knots[k] <= value < knots[k+1], clamped to 0..K-1."""
    index = torch.searchsorted(knots, values.unsqueeze(-1).contiguous(), right=True) - 1
    return index.clamp(0, knots.shape[-1] - 2)


def _gather(params: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return params.gather(-1, index).squeeze(-1)


def rational_quadratic_spline(
    inputs: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    slopes: torch.Tensor,
    bound: float,
    inverse: bool = False,
    derivative: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply the spline (or its inverse) elementwise; returns (outputs, log|d outputs / d inputs|).

    inputs: (...); widths, heights: (..., K) unconstrained; slopes: (..., K-1) unconstrained
    interior slopes. The log-derivative is elementwise (same shape as ``inputs``) and is that
    of the map actually applied (negative of the forward one for the inverse); with
    ``derivative=False`` it is not computed (None), for callers that want the map alone.
    """
    if bound <= 0:
        raise InvalidValueError(f"spline bound must be > 0, got {bound}")
    if slopes.shape[-1] != widths.shape[-1] - 1 or heights.shape[-1] != widths.shape[-1]:
        raise InvalidValueError(f"spline parameters need K widths, K heights, K-1 slopes; got {widths.shape[-1]}, "
                         f"{heights.shape[-1]}, {slopes.shape[-1]}")
    inside = (inputs >= -bound) & (inputs <= bound)
    x = inputs.clamp(-bound, bound)  # tails are the identity; the spline sees in-range values only

    xs, bin_widths = _knots(widths, bound)
    ys, bin_heights = _knots(heights, bound)
    interior = MIN_SLOPE + F.softplus(slopes + SLOPE_SHIFT)
    ones = torch.ones_like(interior[..., :1])
    d = torch.cat([ones, interior, ones], dim=-1)  # d_0 = d_K = 1 matches the identity tails

    k = _bin_index(ys if inverse else xs, x)
    x_k, y_k = _gather(xs, k), _gather(ys, k)
    w, h = _gather(bin_widths, k), _gather(bin_heights, k)
    d_k, d_k1 = _gather(d, k), _gather(d, k + 1)
    s = h / w
    curvature = d_k1 + d_k - 2 * s

    if inverse:
        dy = x - y_k
        a = h * (s - d_k) + dy * curvature
        b = h * d_k - dy * curvature
        c = -s * dy
        discriminant = (b * b - 4 * a * c).clamp_min(0)
        xi = (2 * c) / (-b - discriminant.sqrt())
        xi = xi.clamp(0, 1)
        out = x_k + xi * w
    else:
        xi = (x - x_k) / w
        out = y_k + h * (s * xi * xi + d_k * xi * (1 - xi)) / (s + curvature * xi * (1 - xi))
    out = torch.where(inside, out, inputs)
    if not derivative:
        return out, None

    one_minus = 1 - xi
    denominator = s + curvature * xi * one_minus
    numerator = d_k1 * xi * xi + 2 * s * xi * one_minus + d_k * one_minus * one_minus
    log_derivative = 2 * torch.log(s) + torch.log(numerator) - 2 * torch.log(denominator)
    if inverse:
        log_derivative = -log_derivative
    log_derivative = torch.where(inside, log_derivative, torch.zeros_like(log_derivative))
    return out, log_derivative

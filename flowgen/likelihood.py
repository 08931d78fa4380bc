r"""Likelihood accounting: the ONE place where integer pixels become model inputs and nats become bits.

Notation.  An image has D = C·H·W integer pixels x ∈ {0, …, K-1}^D, where K is the number of
levels (K = 2**n_bits, or a dataset's own count: the 8x8 digits have K = 17).  The flow models a
continuous density p_Y on y ∈ R^D.

Dequantisation.  With noise u ∈ [0, 1)^D the model input is

    y = (x + u) / K - 1/2            ∈ [-1/2, 1/2)^D,

an affine map of the continuous pixel x + u with Jacobian K^{-D}.  The probability of the
integer image is the mass of its unit bin:

    P(x) = ∫_{[0,1)^D} p_Y((x + u)/K - 1/2) · K^{-D} du.

Uniform dequantisation (u ~ U[0,1)^D, Jensen's inequality):

    log P(x) >= E_u[ log p_Y(y) ] - D·log K.

Variational dequantisation (u ~ q(u | x), Flow++ / Ho et al. 2019):

    log P(x) = log E_q[ p_Y(y) K^{-D} / q(u|x) ]  >=  E_q[ log p_Y(y) - log q(u|x) ] - D·log K,

and with S samples u_1..u_S ~ q the importance-weighted bound (tighter, -> log P(x) as S -> ∞):

    log P(x) >= logmeanexp_s[ log p_Y(y_s) - log q(u_s|x) ] - D·log K.

Uniform noise is the special case log q = 0.  Bits per dimension:

    bpd = -log P(x) / (D · ln 2).

A model that is uniform on [-1/2, 1/2)^D (log p_Y = 0) scores exactly log2 K bits per dimension.

Preprocessing (optional; RealNVP, Dinh et al. 2017, section 4.1).  The flow may model the logit of
the rescaled pixels instead of y: with p = y + 1/2 ∈ [0, 1) and α ∈ (0, 1/2),

    s = α + (1 - 2α)·p ∈ [α, 1 - α),      z = logit(s) = log s - log(1 - s),

a bijection of [-1/2, 1/2)^D onto [logit α, logit(1 - α))^D whose log-determinant is

    log |det ∂z/∂y| = Σ_i [ log(1 - 2α) - log s_i - log(1 - s_i) ]
                    = Σ_i [ log(1 - 2α) + softplus(z_i) + softplus(-z_i) ].

The density of y is then p_Y(y) = p_Z(z) · |det ∂z/∂y|, so every bound above holds with

    log p_Y(y) = log p_Z(z) + log |det ∂z/∂y|

(``LogitPreprocessed`` in flowgen/models/preprocessed.py puts this term into the model's
``log_prob``, so every consumer of the model contract counts it).  Sampling runs the map backwards:
y = (σ(z) - α)/(1 - 2α) - 1/2, then ``quantize``.  Σ_x P(x) is the mass p_Z puts on the box
[logit α, logit(1 - α)]^D, at most 1: the mass outside is never counted, so the bpd is that of a
sub-normalised P, never below the bpd of P renormalised (a standard-logistic p_Z has p_Y = (1 - 2α)^D
on the whole cube and scores log2 K - log2(1 - 2α) bits per dimension).  The map is computed in
float64 (``logit_map``).

Every other quantity here is computed in float32 (float64 if given float64).
"""

from __future__ import annotations

import math

import torch
from torch.nn.functional import softplus

from flowgen.errors import InvalidValueError

LN2 = math.log(2.0)


def _float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def dequantize(x: torch.Tensor, u: torch.Tensor, num_levels: int) -> torch.Tensor:
    """y = (x + u) / K - 1/2: integer pixels plus noise in [0,1) -> model input in [-1/2, 1/2)."""
    return (_float(x) + u) / num_levels - 0.5


def quantize(y: torch.Tensor, num_levels: int) -> torch.Tensor:
    """The bin of y: x = clamp(floor((y + 1/2)·K), 0, K-1), as int64 (inverse of ``dequantize``)."""
    return torch.floor((_float(y) + 0.5) * num_levels).clamp(0, num_levels - 1).long()


def to_unit_interval(y: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Model-space y -> image intensities in [0, 1] (bin centres), for saving pictures."""
    return quantize(y, num_levels).float() / (num_levels - 1)


def discretization_log_volume(num_dims: int, num_levels: int) -> float:
    """-D·log K: log of the Jacobian of u -> y, the term that turns a density into a bin mass."""
    return -num_dims * math.log(num_levels)


def log_likelihood_bound(log_p_y: torch.Tensor, num_dims: int, num_levels: int,
                         log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image lower bound on log P(x) in nats: log p_Y(y) - log q(u|x) - D·log K.

    ``log_q`` is None for uniform dequantisation (log q = 0 on [0,1)^D).
    """
    log_w = _float(log_p_y) if log_q is None else _float(log_p_y) - _float(log_q)
    return log_w + discretization_log_volume(num_dims, num_levels)


def importance_weighted_bound(log_p_y: torch.Tensor, log_q: torch.Tensor, num_dims: int,
                              num_levels: int) -> torch.Tensor:
    """logmeanexp over the S samples (dim 0, shape (S, B)) of log p_Y(y_s) - log q(u_s|x), minus D·log K.

    With S = 1 it equals ``log_likelihood_bound`` exactly; it never falls below the mean of the
    per-sample bounds (Jensen), and it tends to log P(x) as S grows.
    """
    w = _float(log_p_y) - _float(log_q)
    log_mean_w = torch.logsumexp(w, dim=0) - math.log(w.shape[0])
    return log_mean_w + discretization_log_volume(num_dims, num_levels)


def bits_per_dim(log_px: torch.Tensor, num_dims: int) -> torch.Tensor:
    """bpd = -log P(x) / (D·ln 2)."""
    return -_float(log_px) / (num_dims * LN2)


def nats_to_bpd(nll_nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Negative log-likelihood in nats per image -> bits per dimension."""
    return _float(nll_nats) / (num_dims * LN2)


def check_logit_alpha(alpha) -> float:
    """α of the logit map as a float: a number strictly between 0 and 1/2, else a one-line ``InvalidValueError``."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 0.5:
        raise InvalidValueError(f"preprocessing.logit_alpha={alpha!r} must be a number strictly between 0 and 0.5 "
                                "(RealNVP uses 0.05 on CIFAR-10), or null for no logit map")
    return float(alpha)


def logit_log_derivatives(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """log |∂z_i/∂y_i| = log(1 - 2α) + softplus(z_i) + softplus(-z_i), elementwise, from the logit z."""
    z = _float(z)
    return math.log(1 - 2 * alpha) + softplus(z) + softplus(-z)


def logit_map(y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """z = logit(α + (1 - 2α)(y + 1/2)) and its log-determinant Σ_i log |∂z_i/∂y_i|, shape (B,) (module docstring).

    Computed in float64 and returned in float32 (float64 if given float64): then only the rounding of z
    itself, at most ~1.5e-8 in y, separates ``inverse_logit_map(z)`` from y, so pixels -> z -> pixels
    returns every pixel whose y lies farther than that from its bin's edges (float32 rounding of s would
    move y by up to ~7e-8).
    """
    s = alpha + (1 - 2 * alpha) * (y.double() + 0.5)
    z = torch.log(s) - torch.log1p(-s)
    dtype = _float(y).dtype
    return z.to(dtype), logit_log_derivatives(z, alpha).flatten(1).sum(1).to(dtype)


def inverse_logit_map(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """y = (σ(z) - α)/(1 - 2α) - 1/2 (in float64, returned like ``logit_map``): the inverse of ``logit_map``;
    outside [-1/2, 1/2) for z outside the box [logit α, logit(1 - α)], where ``quantize`` clamps."""
    return ((torch.sigmoid(z.double()) - alpha) / (1 - 2 * alpha) - 0.5).to(_float(z).dtype)

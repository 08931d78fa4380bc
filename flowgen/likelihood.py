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
Every quantity here is computed in float32 (float64 if given float64).
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def num_levels_from_bits(n_bits: int) -> int:
    """K = 2**n_bits for n_bits in 1..8."""
    if not isinstance(n_bits, int) or isinstance(n_bits, bool) or not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be an integer in 1..8, got {n_bits!r}")
    return 2**n_bits


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

"""Invertible 1x1 convolutions (Glow, section 3.2): a learned linear map of the channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowgen.flows.base import Flow, logdet_dtype, no_autocast


def random_rotation(channels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random orthogonal matrix with det = +1 (QR of a Gaussian matrix, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # make the factorisation unique (Haar)
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _conv1x1(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight.to(x.dtype).unsqueeze(-1).unsqueeze(-1))


class InvConv1x1(Flow):
    """Unconstrained invertible 1x1 convolution.

        z[:, :, h, w] = W x[:, :, h, w]           W ∈ R^{C×C}, initialised as a random rotation
        log|det dz/dx| = H · W · log|det W|       (slogdet, computed in float64)

    Simple but O(C^3) per step and numerically fragile late in training; prefer
    ``InvConv1x1LU``.
    """

    def __init__(self, channels: int, generator: torch.Generator | None = None):
        super().__init__()
        self.weight = nn.Parameter(random_rotation(channels, generator).float())

    def _logdet(self, x: torch.Tensor) -> torch.Tensor:
        hw = x.shape[2] * x.shape[3]
        ld = torch.linalg.slogdet(self.weight.to(torch.float64))[1].to(logdet_dtype(x))
        return (hw * ld).expand(x.shape[0])

    def forward(self, x, cond=None):
        with no_autocast(x):
            return _conv1x1(x, self.weight), self._logdet(x)

    def inverse(self, z, cond=None):
        with no_autocast(z):
            w_inv = torch.linalg.inv(self.weight.to(torch.float64))
            return _conv1x1(z, w_inv), -self._logdet(z)


class InvConv1x1LU(Flow):
    """Invertible 1x1 convolution with an LU-decomposed weight.

        W = P · L · (U + diag(sign_s · exp(log|s|)))
        z[:, :, h, w] = W x[:, :, h, w]
        log|det dz/dx| = H · W · Σ_c log|s_c|

    P is a fixed permutation, L unit lower triangular, U strictly upper triangular and
    sign_s fixed; L, U and log|s| are learned.  The log-determinant is a sum, so the training
    forward needs no slogdet and no matrix inverse.  Initialised from the LU factors of a
    random rotation, exactly like ``InvConv1x1``.
    """

    def __init__(self, channels: int, generator: torch.Generator | None = None):
        super().__init__()
        w0 = random_rotation(channels, generator)
        p, l, u = torch.linalg.lu(w0)
        s = torch.diagonal(u)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(l.float())
        self.upper = nn.Parameter(torch.triu(u, 1).float())
        self.log_s = nn.Parameter(s.abs().log().float())

    def weight(self) -> torch.Tensor:
        """W = P L (U + diag(sign_s exp(log_s))), in float32."""
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.perm @ (lower @ upper)

    def inverse_weight(self) -> torch.Tensor:
        """W^{-1} = (U + diag)^{-1} L^{-1} P^T by triangular solves, in float64."""
        lower = (self.lower * self.lower_mask + self.eye).double()
        upper = (self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())).double()
        eye = self.eye.double()
        l_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        u_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        return u_inv @ l_inv @ self.perm.double().T

    def _logdet(self, x: torch.Tensor) -> torch.Tensor:
        hw = x.shape[2] * x.shape[3]
        return (hw * self.log_s.to(logdet_dtype(x)).sum()).expand(x.shape[0])

    def forward(self, x, cond=None):
        with no_autocast(x):
            return _conv1x1(x, self.weight()), self._logdet(x)

    def inverse(self, z, cond=None):
        with no_autocast(z):
            return _conv1x1(z, self.inverse_weight()), -self._logdet(z)

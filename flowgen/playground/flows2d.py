"""Invertible layers on (B, D) vectors (D = 2 in the playground), under the repo's layer contract:

    forward(x) -> (z, logdet)     logdet = log|det ∂z/∂x|, shape (B,)
    inverse(z) -> (x, logdet)     logdet = log|det ∂x/∂z| = minus forward's

A coupling splits the D coordinates into a kept part x_a (the coordinates i with i % 2 == parity)
and a transformed part x_b (the others), and maps x_b elementwise with parameters h = NN(x_a) from
an MLP; couplings alternate ``parity``, so for D = 2 one layer moves x_1 given x_2, the next x_2
given x_1, and so on:

    affine    z_b = x_b · exp(s) + t,  s = S · tanh(h^s),  t = h^t     log|det| = Σ s
    spline    z_b = RQS_h(x_b)                                      log|det| = Σ log RQS_h'(x_b)

and z_a = x_a.  The Jacobian is triangular (z_a does not depend on x_b), so its log-determinant is
the sum over the transformed coordinates above, and the inverse recomputes the same h from
z_a = x_a.  |s| ≤ S bounds each layer's stretch, which keeps training stable.  The MLP's last layer
starts at zero, so s = t = 0 and all spline parameters are 0: every coupling starts as the
identity (see ``flowgen.flows.splines``; RQS is the identity outside [-B, B]).

``VectorActNorm`` is Glow's ActNorm (``flowgen.flows.actnorm``) on vectors, one "channel" per
coordinate:  z = (x + b) ⊙ exp(s),  log|det| = Σ_i s_i,  b and s set from the first batch so that
z starts with zero mean and unit variance per coordinate.
"""

from __future__ import annotations

import torch
from torch import nn

from flowgen.flows.actnorm import ActNorm
from flowgen.flows.base import Flow, FlowSequence, sum_except_batch
from flowgen.flows.splines import num_spline_params, rational_quadratic_spline

COUPLINGS = ("affine", "spline")


def mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    """inputs → hidden → hidden → outputs with SiLU (smooth, so the learned density is smooth);
    the last layer is zero-initialised so the coupling it drives starts as the identity."""
    net = nn.Sequential(nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                        nn.Linear(hidden, outputs))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


class Coupling2d(Flow):
    """The split shared by both couplings: kept coordinates i % 2 == parity, the others transformed."""

    def __init__(self, dim: int, parity: int):
        super().__init__()
        if dim < 2:
            raise ValueError(f"a coupling needs at least 2 coordinates, got {dim}")
        coordinates = torch.arange(dim)
        self.register_buffer("kept", coordinates[coordinates % 2 == parity], persistent=False)
        self.register_buffer("changed", coordinates[coordinates % 2 != parity], persistent=False)

    def _map(self, x_b: torch.Tensor, h: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(the map of x_b, or its inverse, given h;  its elementwise log-derivative)."""
        raise NotImplementedError  # pragma: no cover

    def _couple(self, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(x[:, self.kept])
        z_b, log_derivative = self._map(x[:, self.changed], h, inverse)
        return x.index_copy(1, self.changed, z_b), sum_except_batch(log_derivative)

    def forward(self, x, cond=None):
        return self._couple(x, inverse=False)

    def inverse(self, z, cond=None):
        return self._couple(z, inverse=True)


class AffineCoupling(Coupling2d):
    """z_b = x_b · exp(s) + t,  (s, t) from NN(x_a),  s = S · tanh(·) ∈ (-S, S)."""

    def __init__(self, dim: int, hidden: int, parity: int, scale_bound: float = 2.0):
        super().__init__(dim, parity)
        self.net = mlp(len(self.kept), hidden, 2 * len(self.changed))
        self.scale_bound = scale_bound

    def _map(self, x_b, h, inverse):
        shift, raw = h.chunk(2, dim=1)
        log_scale = self.scale_bound * torch.tanh(raw)
        if inverse:
            return (x_b - shift) * (-log_scale).exp(), -log_scale
        return x_b * log_scale.exp() + shift, log_scale


class SplineCoupling(Coupling2d):
    """z_b = RQS_h(x_b),  h = NN(x_a): K bins on [-B, B], the identity outside."""

    def __init__(self, dim: int, hidden: int, parity: int, bins: int = 8, bound: float = 4.0):
        super().__init__(dim, parity)
        self.bins, self.bound = bins, bound
        self.net = mlp(len(self.kept), hidden, len(self.changed) * num_spline_params(bins))

    def _map(self, x_b, h, inverse):
        k = self.bins
        h = h.view(x_b.shape[0], x_b.shape[1], num_spline_params(k))  # coordinate-major: 3K - 1 numbers each
        return rational_quadratic_spline(x_b, h[..., :k], h[..., k : 2 * k], h[..., 2 * k :], self.bound,
                                         inverse=inverse)


class VectorActNorm(Flow):
    """Glow's ActNorm on (B, D) vectors: z = (x + b) ⊙ exp(s),  log|det| = Σ_i s_i."""

    def __init__(self, dim: int):
        super().__init__()
        self.actnorm = ActNorm(dim)

    def forward(self, x, cond=None):
        z, logdet = self.actnorm(x[:, :, None, None])  # a (B, D, 1, 1) "image": H · W = 1
        return z.flatten(1), logdet

    def inverse(self, z, cond=None):
        x, logdet = self.actnorm.inverse(z[:, :, None, None])
        return x.flatten(1), logdet


def build_flow(num_layers: int, coupling: str, hidden: int, actnorm: bool = True, scale_bound: float = 2.0,
               spline_bins: int = 8, spline_bound: float = 4.0, dim: int = 2) -> FlowSequence:
    """``num_layers`` blocks, each [VectorActNorm,] coupling, with the coupling's mask alternating.

    Block j transforms the coordinates i with i % 2 != j % 2.  The blocks are the "layers" the
    evolution figure steps through, so a block is itself a FlowSequence.
    """
    if coupling not in COUPLINGS:
        raise ValueError(f"unknown coupling {coupling!r}; choose one of {', '.join(COUPLINGS)}")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be an integer >= 1, got {hidden!r}")
    if coupling == "affine" and not scale_bound > 0:
        raise ValueError(f"scale_bound must be > 0, got {scale_bound!r}")
    if coupling == "spline" and (not isinstance(spline_bins, int) or spline_bins < 2 or not spline_bound > 0):
        raise ValueError(f"a spline coupling needs spline_bins >= 2 and spline_bound > 0, got {spline_bins!r} "
                         f"and {spline_bound!r}")
    blocks = []
    for j in range(num_layers):
        if coupling == "affine":
            layer = AffineCoupling(dim, hidden, parity=j % 2, scale_bound=scale_bound)
        else:
            layer = SplineCoupling(dim, hidden, parity=j % 2, bins=spline_bins, bound=spline_bound)
        blocks.append(FlowSequence([VectorActNorm(dim), layer] if actnorm else [layer]))
    return FlowSequence(blocks)

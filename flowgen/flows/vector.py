"""Invertible layers on (B, D) vectors (D = 2 in the playground), under the repo's layer contract:

    forward(x) -> (z, logdet)     logdet = log|det ∂z/∂x|, shape (B,)
    inverse(z) -> (x, logdet)     logdet = log|det ∂x/∂z| = minus forward's

Three kinds of flow layer (``FLOW_KINDS``), all mapping coordinates with the same elementwise
transform of ``flowgen.transforms`` (``COUPLINGS``, the config's ``flow.coupling``):

    affine    z_i = x_i · exp(s) + t,  s = S · tanh(h^s),  t = h^t     log|det| = Σ s
    spline    z_i = RQS_h(x_i)                                      log|det| = Σ log RQS_h'(x_i)

(affine is ``Affine(scale="tanh")`` with α fixed at S = ``scale_bound``, not learned: |s| < S bounds
each layer's stretch, which keeps training stable; spline is ``Spline``, the identity outside [-B, B]).

coupling  splits the D coordinates into a kept part x_a (the coordinates i with i % 2 == parity)
          and a transformed part x_b (the others), h = NN(x_a) from an MLP; z_a = x_a.  Couplings
          alternate ``parity``, so for D = 2 one layer moves x_2 given x_1, the next x_1 given x_2.
          The inverse recomputes the same h from z_a = x_a: one pass each way.
maf, iaf  masked autoregressive layers (``flowgen.flows.autoregressive``): every coordinate is
          transformed, coordinate i with parameters from the coordinates before it (MADE);
          consecutive layers alternate the order (0, 1, ..., D-1, then reversed).  MAF computes the
          density in one pass and samples in D passes, IAF the opposite.

cnf       a continuous normalizing flow (``build_cnf``): dz/dt = v(z, t) on t ∈ [0, 1] with a velocity MLP
          (``flowgen.flows.velocity``), log|det| = ∫ tr(∂v/∂z) dt with the exact trace (D = 2: two
          vector-Jacobian products per evaluation).  Its "layers" are the ODE's solution maps over
          ``num_layers`` equal time segments [j/n, (j+1)/n], sharing the one velocity field; trained by
          maximum likelihood or by flow matching (``FlowDensity2d``'s objective).

The discrete kinds' Jacobians are triangular, so their log-determinants are the sums above.  The conditioners'
last layers start at zero, so s = t = 0 and all spline parameters are 0: every layer starts as the
identity.

``VectorActNorm`` is Glow's ActNorm (``flowgen.flows.actnorm``) on vectors, one "channel" per
coordinate:  z = (x + b) ⊙ exp(s),  log|det| = Σ_i s_i,  b and s set from the first batch so that
z starts with zero mean and unit variance per coordinate.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from flowgen.errors import InvalidValueError
from flowgen.flows.actnorm import ActNorm
from flowgen.flows.autoregressive import MaskedAutoregressive
from flowgen.flows.base import Flow, FlowSequence, sum_except_batch, zero_logdet
from flowgen.flows.flow_matching import flow_matching_loss
from flowgen.flows.ode import ContinuousFlow, SolverOptions, TraceOptions
from flowgen.flows.velocity import VelocityMLP
from flowgen.transforms import ElementwiseTransform, TransformOptions, make_transform

COUPLINGS = ("affine", "spline")  # the transform of every kind of layer (the config key is flow.coupling)
FLOW_KINDS = ("coupling", "maf", "iaf")  # the kinds of discrete layer (``build_flow``)
PLAYGROUND_KINDS = (*FLOW_KINDS, "cnf")  # the config's flow.kind: those, or a continuous flow (``build_cnf``)


def mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    """inputs → hidden → hidden → outputs with SiLU (smooth, so the learned density is smooth);
    the last layer is zero-initialised so the coupling it drives starts as the identity."""
    net = nn.Sequential(nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                        nn.Linear(hidden, outputs))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def bounded_affine(scale_bound: float) -> ElementwiseTransform:
    """``Affine(scale="tanh")`` with α a constant S (a buffer, not a parameter): s = S · tanh(h^s) ∈ (-S, S)."""
    return make_transform("affine", TransformOptions(scale="tanh", alpha=scale_bound, learn_alpha=False))


def spline(bins: int, bound: float) -> ElementwiseTransform:
    return make_transform("spline", TransformOptions(spline_bins=bins, spline_bound=bound))


class Coupling2d(Flow):
    """z_b = f(x_b; NN(x_a)), z_a = x_a, with kept coordinates i % 2 == parity and any elementwise transform f.

    The MLP's output holds parameter p of the j-th transformed coordinate at p · |b| + j.
    """

    def __init__(self, dim: int, hidden: int, parity: int, transform: ElementwiseTransform):
        super().__init__()
        if dim < 2:
            raise InvalidValueError(f"a coupling needs at least 2 coordinates, got {dim}")
        coordinates = torch.arange(dim)
        self.register_buffer("kept", coordinates[coordinates % 2 == parity], persistent=False)
        self.register_buffer("changed", coordinates[coordinates % 2 != parity], persistent=False)
        self.transform = transform
        self.net = mlp(len(self.kept), hidden, transform.num_params * len(self.changed))

    def _params(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.net(x[:, self.kept]), "b (p d) -> b d p", p=self.transform.num_params)

    def _logdet(self, x: torch.Tensor, log_derivative: torch.Tensor | None) -> torch.Tensor:
        return zero_logdet(x) if log_derivative is None else sum_except_batch(log_derivative)

    def forward(self, x, cond=None):
        z_b, log_derivative = self.transform(x[:, self.changed], self._params(x))
        return x.index_copy(1, self.changed, z_b), self._logdet(x, log_derivative)

    def inverse(self, z, cond=None):
        x_b, log_derivative = self.transform.inverse(z[:, self.changed], self._params(z))
        return z.index_copy(1, self.changed, x_b), self._logdet(z, log_derivative)

    def invert(self, z, cond=None):
        return z.index_copy(1, self.changed, self.transform.invert(z[:, self.changed], self._params(z)))


class AffineCoupling(Coupling2d):
    """z_b = x_b · exp(s) + t,  (s, t) from NN(x_a),  s = S · tanh(·) ∈ (-S, S)."""

    def __init__(self, dim: int, hidden: int, parity: int, scale_bound: float = 2.0):
        super().__init__(dim, hidden, parity, bounded_affine(scale_bound))
        self.scale_bound = scale_bound


class SplineCoupling(Coupling2d):
    """z_b = RQS_h(x_b),  h = NN(x_a): K bins on [-B, B], the identity outside."""

    def __init__(self, dim: int, hidden: int, parity: int, bins: int = 8, bound: float = 4.0):
        super().__init__(dim, hidden, parity, spline(bins, bound))
        self.bins, self.bound = bins, bound


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
               spline_bins: int = 8, spline_bound: float = 4.0, dim: int = 2, kind: str = "coupling") -> FlowSequence:
    """``num_layers`` blocks, each [VectorActNorm,] layer of ``kind`` with the transform ``coupling``.

    Block j alternates: a coupling transforms the coordinates i with i % 2 != j % 2; a MAF or IAF
    layer takes the coordinates in the order 0..D-1 for even j and D-1..0 for odd j (its MADE has two
    hidden layers of width ``hidden``, as the coupling's MLP).  The blocks are the "layers" the
    evolution figure steps through, so a block is itself a FlowSequence.
    """
    if kind not in FLOW_KINDS:
        raise InvalidValueError(f"unknown flow kind {kind!r}; choose one of {', '.join(FLOW_KINDS)}")
    if coupling not in COUPLINGS:
        raise InvalidValueError(f"unknown coupling {coupling!r}; choose one of {', '.join(COUPLINGS)}")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise InvalidValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    if not isinstance(hidden, int) or hidden < 1:
        raise InvalidValueError(f"hidden must be an integer >= 1, got {hidden!r}")
    if coupling == "affine" and not scale_bound > 0:
        raise InvalidValueError(f"scale_bound must be > 0, got {scale_bound!r}")
    if coupling == "spline" and (not isinstance(spline_bins, int) or spline_bins < 2 or not spline_bound > 0):
        raise InvalidValueError(f"a spline coupling needs spline_bins >= 2 and spline_bound > 0, got {spline_bins!r} "
                         f"and {spline_bound!r}")
    blocks = []
    for j in range(num_layers):
        transform = bounded_affine(scale_bound) if coupling == "affine" else spline(spline_bins, spline_bound)
        if kind == "coupling":
            layer = Coupling2d(dim, hidden, j % 2, transform)
        else:
            layer = MaskedAutoregressive(dim, hidden, transform, kind, order=None if j % 2 == 0 else "reverse")
        blocks.append(FlowSequence([VectorActNorm(dim), layer] if actnorm else [layer]))
    return FlowSequence(blocks)


class ContinuousFlowSequence(FlowSequence):
    """The solution map of dz/dt = v(z, t) over [0, 1], as ``num_segments`` ODE solves over equal time segments
    (``ContinuousFlow``) that share the velocity ``v``; ``flow_matching_loss`` trains v by regression."""

    def __init__(self, velocity: nn.Module, num_segments: int, solver: SolverOptions):
        exact = TraceOptions("exact")
        super().__init__([ContinuousFlow(velocity, j / num_segments, (j + 1) / num_segments, solver, exact, exact)
                          for j in range(num_segments)])
        self.velocity = velocity

    def flow_matching_loss(self, x: torch.Tensor) -> torch.Tensor:
        return flow_matching_loss(self.velocity, x)

    @property
    def nfe(self) -> int:
        """Function evaluations of the last pass through all segments."""
        return sum(flow.nfe for flow in self.flows)


def build_cnf(num_layers: int, hidden: int, dim: int = 2, solver: str = "dopri5", rtol: float = 1e-5,
              atol: float = 1e-5, step_size: float | None = None) -> ContinuousFlowSequence:
    """A CNF on (B, ``dim``) vectors: a velocity MLP (three hidden layers of width ``hidden`` with a time
    embedding) solved by torchdiffeq's ``solver`` over ``num_layers`` time segments (module docstring)."""
    if not isinstance(num_layers, int) or num_layers < 1:
        raise InvalidValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    if not isinstance(hidden, int) or hidden < 1:
        raise InvalidValueError(f"hidden must be an integer >= 1, got {hidden!r}")
    return ContinuousFlowSequence(VelocityMLP(dim, hidden, depth=3), num_layers,
                                  SolverOptions(solver, rtol, atol, step_size))

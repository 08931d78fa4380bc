r"""A continuous-time flow layer: the solution map of an ODE, with the instantaneous change of variables.

The velocity field v(z, t, c) (``flowgen.flows.velocity``) defines, on a time interval [t_0, t_1],

    dz/dt = v(z(t), t),        z(t_0) = x,        f(x) = z(t_1).

f is a bijection (the same ODE solved from t_1 back to t_0 inverts it) and its log-determinant obeys
the instantaneous change of variables (Chen et al. 2018, "Neural ODEs"):

    d/dt log|det ∂z(t)/∂x| = tr(∂v/∂z (z(t), t)),     log|det ∂f/∂x| = ∫_{t_0}^{t_1} tr(∂v/∂z) dt,

so a density carried along the flow satisfies d log p(z(t)) / dt = -tr(∂v/∂z).  The trace is either

    exact         Σ_i ∂v_i/∂z_i, one vector-Jacobian product per dimension (D backward passes), or
    hutchinson    εᵀ (∂v/∂z) ε for a probe ε with E[ε εᵀ] = I (Rademacher ±1 or Gaussian), one
                  vector-Jacobian product: FFJORD (Grathwohl et al. 2019).  The probe is drawn once
                  per solve and held fixed along the path, so the integral εᵀ(∫ ∂v/∂z dt)ε is an
                  unbiased estimate of the log-determinant (of a solve that is exact); with K probes
                  the mean of K such integrals is returned with its standard error
                  s_K / √K (s_K the sample standard deviation over the probes).

Regularisers of the dynamics (RNODE, Finlay et al. 2020), integrated along the same solve when asked:
kinetic energy ∫ ||v||² dt and the Jacobian's Frobenius norm ∫ ||εᵀ ∂v/∂z||² dt (its Hutchinson estimate).

The ODE is solved by torchdiffeq (``odeint``, or ``odeint_adjoint`` for O(1)-memory gradients), with
the method, tolerances and step size of ``SolverOptions``.  The state is the tuple
(z, a_1..a_K, [kinetic], [jacobian]) with a_k(t_0) = 0; every call counts its function
evaluations in ``nfe`` (the last solve's, forward only: adjoint backward passes not counted).

Solves that need a trace run with gradients on (and out of inference mode), whatever the caller's
mode: the trace is a derivative.  Results are detached when the caller had gradients off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from flowgen.errors import InvalidValueError
from flowgen.flows.base import Flow, logdet_dtype
from flowgen.flows.noise import Generators, noise_like

# the torchdiffeq methods (explicit ones: implicit Adams and scipy's wrapper need other options)
ODE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "heun2", "heun3",
               "rk4", "explicit_adams")
FIXED_STEP_SOLVERS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams")
TRACE_ESTIMATORS = ("exact", "hutchinson")
PROBE_KINDS = ("rademacher", "gaussian")


@dataclass(frozen=True)
class SolverOptions:
    """How the ODE is solved: a torchdiffeq ``method`` with its tolerances (adaptive methods) or its
    ``step_size`` (fixed-step methods, which need one), and ``adjoint`` (gradients by the adjoint ODE)."""

    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    step_size: float | None = None
    adjoint: bool = False

    def __post_init__(self):
        if self.method not in ODE_SOLVERS:
            raise InvalidValueError(f"unknown ODE solver {self.method!r}; choose one of {', '.join(ODE_SOLVERS)}")
        if self.method in FIXED_STEP_SOLVERS and self.step_size is None:
            raise InvalidValueError(f"the fixed-step solver {self.method} needs a step_size (e.g. 0.05)")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InvalidValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and 0 < self.step_size <= 1):
            raise InvalidValueError(f"step_size must be in (0, 1], got {self.step_size!r}")

    def solver_kwargs(self) -> dict:
        kwargs = {"method": self.method, "rtol": self.rtol, "atol": self.atol}
        if self.method in FIXED_STEP_SOLVERS:
            kwargs["options"] = {"step_size": self.step_size}
        return kwargs


@dataclass(frozen=True)
class TraceOptions:
    """How tr(∂v/∂z) is computed: ``estimator`` exact | hutchinson, ``probe`` rademacher | gaussian, ``probes`` K."""

    estimator: str = "exact"
    probe: str = "rademacher"
    probes: int = 1

    def __post_init__(self):
        if self.estimator not in TRACE_ESTIMATORS:
            raise InvalidValueError(f"unknown trace estimator {self.estimator!r}; choose one of "
                                    f"{', '.join(TRACE_ESTIMATORS)}")
        if self.probe not in PROBE_KINDS:
            raise InvalidValueError(f"unknown probe {self.probe!r}; choose one of {', '.join(PROBE_KINDS)}")
        if not isinstance(self.probes, int) or self.probes < 1:
            raise InvalidValueError(f"probes must be a positive integer, got {self.probes!r}")

    def draw(self, z: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """K probes shaped like z: (K, B, ...), from ``generator`` (one per image, or one, or the global RNG)."""
        draws = []
        for _ in range(self.probes):
            if self.probe == "gaussian":
                draws.append(noise_like(torch.randn, z, generator, z.dtype))
            else:
                draws.append(noise_like(torch.rand, z, generator, z.dtype).lt(0.5).to(z.dtype) * 2 - 1)
        return torch.stack(draws)


def exact_trace(v: torch.Tensor, z: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """tr(∂v/∂z) per sample, (B,): one vector-Jacobian product with each basis vector e_i (samples are
    independent, so the gradient of Σ_b v_{b,i} with respect to z_b is row i of sample b's Jacobian)."""
    dims = v[0].numel()
    basis = torch.eye(dims, dtype=v.dtype, device=v.device)[:, None].expand(dims, *v.shape[:1], dims)
    (rows,) = torch.autograd.grad(v, z, basis.reshape(dims, *v.shape), create_graph=create_graph, retain_graph=True,
                                  is_grads_batched=True)  # (D, B, ...): row i of every sample's Jacobian
    return rows.flatten(2).diagonal(dim1=0, dim2=2).sum(1)


class AugmentedDynamics(nn.Module):
    """The right-hand side of the augmented ODE (module docstring) as a module (``odeint_adjoint`` finds the
    velocity's parameters through it).  ``setup`` gives it the labels, probes and what to integrate."""

    def __init__(self, velocity: nn.Module):
        super().__init__()
        self.velocity = velocity
        self.nfe = 0
        self.cond: torch.Tensor | None = None
        self.probes: torch.Tensor | None = None  # (K, B, ...) for hutchinson; None for exact
        self.trace = True
        self.regularise = False
        self.create_graph = False

    def setup(self, cond, probes, trace: bool, regularise: bool, create_graph: bool) -> None:
        self.cond, self.probes, self.trace, self.regularise, self.create_graph = (
            cond, probes, trace, regularise, create_graph)
        self.nfe = 0

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        self.nfe += 1
        z = state[0]
        times = t.to(z.dtype).expand(z.shape[0])
        if not self.trace:
            return (self.velocity(z, times, self.cond),)
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            v = self.velocity(z, times, self.cond)
            derivatives = [v]
            if self.probes is None:
                derivatives.append(exact_trace(v, z, self.create_graph)[None])
                eps_jacobian = None
            else:
                rows = [torch.autograd.grad(v, z, eps, create_graph=self.create_graph, retain_graph=True)[0]
                        for eps in self.probes]  # εᵀ ∂v/∂z for each probe
                derivatives.append(torch.stack([(r * eps).flatten(1).sum(1) for r, eps in zip(rows, self.probes,
                                                                                              strict=True)]))
                eps_jacobian = rows[0]
            if self.regularise:
                derivatives.append(v.flatten(1).pow(2).sum(1))
                if eps_jacobian is None:  # exact trace: no probe; the Frobenius norm from one Gaussian probe
                    eps = torch.randn_like(z)
                    eps_jacobian = torch.autograd.grad(v, z, eps, create_graph=self.create_graph, retain_graph=True)[0]
                derivatives.append(eps_jacobian.flatten(1).pow(2).sum(1))
        if not self.create_graph:
            derivatives = [d.detach() for d in derivatives]
        return tuple(derivatives)


@dataclass
class Solution:
    """What one solve returns: the end point, the log-determinant estimate of the map and its standard error
    (B,) (zero for the exact trace, NaN for a single Hutchinson probe), the regularisers (B,) when asked,
    and the number of function evaluations."""

    z: torch.Tensor
    logdet: torch.Tensor | None
    std_error: torch.Tensor | None
    kinetic: torch.Tensor | None
    jacobian: torch.Tensor | None
    nfe: int


class ContinuousFlow(Flow):
    """f(x) = z(t_1) of dz/dt = v(z, t, c) from z(t_0) = x; log|det ∂f/∂x| = ∫ tr(∂v/∂z) dt (module docstring).

    velocity: a module v(z, t, cond) -> dz/dt of z's shape (t: (B,)).
    t0, t1: the time interval (the data side is t0).
    solver: ``SolverOptions``; trace: ``TraceOptions`` in training mode, eval_trace in eval mode.
    """

    def __init__(self, velocity: nn.Module, t0: float = 0.0, t1: float = 1.0, solver: SolverOptions = SolverOptions(),
                 trace: TraceOptions = TraceOptions("hutchinson"), eval_trace: TraceOptions = TraceOptions()):
        super().__init__()
        self.dynamics = AugmentedDynamics(velocity)
        self.t0, self.t1 = float(t0), float(t1)
        self.solver, self.trace_options, self.eval_trace_options = solver, trace, eval_trace
        self.nfe = 0  # function evaluations of the last solve

    @property
    def velocity(self) -> nn.Module:
        return self.dynamics.velocity

    def solve(self, x: torch.Tensor, cond=None, reverse: bool = False, logdet: bool = True, regularise: bool = False,
              trace: TraceOptions | None = None, generator: Generators = None) -> Solution:
        """Solve from t0 to t1 (``reverse``: from t1 to t0) starting at x.

        ``logdet``: integrate the trace too (with ``trace``, default: this mode's options), probes from ``generator``;
        ``regularise``: integrate the kinetic energy and the Jacobian norm too (training).
        """
        trace = trace or (self.trace_options if self.training else self.eval_trace_options)
        grad = torch.is_grad_enabled()
        needs_graph = logdet or regularise
        with torch.inference_mode(False):
            if torch.is_inference(x):  # a tensor made in inference mode cannot enter autograd: copy it out
                x = x.clone()
            if cond is not None and torch.is_inference(cond):
                cond = cond.clone()
            probes = trace.draw(x, generator) if needs_graph and trace.estimator == "hutchinson" else None
            self.dynamics.setup(cond, probes, trace=needs_graph, regularise=regularise,
                                create_graph=grad and (needs_graph or self.solver.adjoint))
            times = torch.tensor([self.t1, self.t0] if reverse else [self.t0, self.t1], dtype=x.dtype,
                                 device=x.device)
            count = probes.shape[0] if probes is not None else 1
            state = (x,)
            if needs_graph:
                state += (torch.zeros(count, x.shape[0], dtype=x.dtype, device=x.device),)
            if regularise:
                state += (torch.zeros(x.shape[0], dtype=x.dtype, device=x.device),) * 2
            solve = odeint_adjoint if (self.solver.adjoint and grad) else odeint
            extra = {"adjoint_params": tuple(self.dynamics.parameters())} if solve is odeint_adjoint else {}
            with torch.set_grad_enabled(grad):
                final = [s[-1] for s in solve(self.dynamics, state, times, **self.solver.solver_kwargs(), **extra)]
        self.nfe = self.dynamics.nfe
        z = final[0]
        log_det = std_error = kinetic = jacobian = None
        if needs_graph:
            estimates = final[1].to(logdet_dtype(x))  # (K, B)
            log_det = estimates.mean(0)
            if probes is None:  # the exact trace: no estimator error
                std_error = torch.zeros_like(log_det)
            elif count > 1:
                std_error = (estimates.std(0) / math.sqrt(count)).detach()
            else:  # one probe: unbiased, but its spread is unknown
                std_error = torch.full_like(log_det, math.nan)
        if regularise:
            kinetic, jacobian = final[2], final[3]
        return Solution(z, log_det, std_error, kinetic, jacobian, self.nfe)

    def forward(self, x, cond=None):
        solution = self.solve(x, cond)
        return solution.z, solution.logdet

    def inverse(self, z, cond=None):
        solution = self.solve(z, cond, reverse=True)
        return solution.z, solution.logdet

    def invert(self, z, cond=None):
        return self.solve(z, cond, reverse=True, logdet=False).z

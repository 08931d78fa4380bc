r"""Continuous normalizing flows (FFJORD, Grathwohl et al. 2019) trained by maximum likelihood or by flow matching.

The map.  A fixed scale s (``data_scale``) and one ODE on t ∈ [0, 1] carry the dequantized image y to the latent:

    dz/dt = v(z(t), t, c),   z(0) = s·y,   f(y) = z(1) ~ N(0, I),
    log p(y | c) = log N(f(y); 0, I) + ∫_0^1 tr(∂v/∂z) dt + D log s          (instantaneous change of variables)

(s brings y ∈ [-1/2, 1/2) to about the prior's unit scale, so the ODE need not learn a global contraction; the
noise-to-data path of flow matching runs between N(0, I) and s·y.)

(``flowgen.flows.ode.ContinuousFlow``; v is a small U-Net with a time and class embedding, or an MLP on the
flattened image, ``flowgen.flows.velocity``).  Sampling solves the same ODE from t = 1 back to t = 0 starting
at z = T·ε, ε ~ N(0, I) (temperature T).  The trace is exact (D vector-Jacobian products per function
evaluation) or Hutchinson's estimate εᵀ(∂v/∂z)ε with K probes held along the path: an unbiased estimate of
log p (not a bound), returned with its standard error by ``log_prob_estimate``.

Two objectives (``objective``), both scored by the same likelihood:

  likelihood      FFJORD: maximise log p(y | c) with the ``trace`` estimator (Hutchinson, one probe, by
                  default), backpropagating through the solver (or the adjoint ODE, ``adjoint``); optional
                  RNODE regularisers (Finlay et al. 2020) add  λ_K ∫||v||² dt / D + λ_J ∫||εᵀ∂v/∂z||² dt / D
                  to the per-image bpd (``kinetic_energy``, ``jacobian_norm``), keeping the dynamics simple and
                  the number of function evaluations (NFE) down.
  flow_matching   conditional flow matching on the linear (rectified-flow / optimal-transport) path
                  (Lipman et al. 2023; Liu et al. 2023): with t ~ U(0, 1), ε ~ N(0, I),
                      z_t = (1 - t)·y + t·ε,      u_t = dz_t/dt = ε - y,
                      loss = (1/D) ||v(z_t, t, c) - u_t||²,
                  one network evaluation per image and no solve.  Its minimiser is the marginal velocity whose
                  flow carries the data distribution to N(0, I), i.e. a CNF of the kind above.

Class conditioning: v reads a class embedding; row ``num_classes`` is the null class ∅, used when no label is
given; in training mode each label is replaced by ∅ with probability ``label_drop``.

Numerics: the solve runs with autocast off, in the input's dtype (float32; float64 in the exactness tests).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from flowgen.errors import InvalidValueError
from flowgen.flows.base import no_autocast
from flowgen.flows.flow_matching import OBJECTIVES, flow_matching_loss
from flowgen.flows.ode import ContinuousFlow, SolverOptions, TraceOptions
from flowgen.flows.prior import standard_normal_log_prob
from flowgen.flows.velocity import VELOCITY_NETS, VelocityMLP, VelocityUNet
from flowgen.models.base import (
    FlowModel,
    LogProbEstimate,
    LogProbParts,
    NullClassConditioning,
    TrainingLoss,
    check_temperature,
    latent_list,
)
from flowgen.models.validation import check_choice, check_image_size, check_positive


class CNF(NullClassConditioning, FlowModel):
    """A continuous normalizing flow on images (module docstring).

    in_channels, image_size: the data.
    velocity: "unet" (width, resolutions, blocks: channels at full resolution, how many resolutions, residual
        blocks per resolution)
        or "mlp" on the flattened image (hidden, depth).
    num_classes, label_drop: class conditioning and the training-time probability of the null class.
    objective: "likelihood" (FFJORD) | "flow_matching" (regression on the linear path's velocity).
    trace, probe, probes: the trace estimator in training (hutchinson | exact; rademacher | gaussian; K);
    eval_trace, eval_probes: the estimator in eval mode (validation, evaluate.py): exact, or Hutchinson with
        K >= 2 probes (so that its standard error is known).
    solver, rtol, atol, step_size, adjoint: torchdiffeq's method, tolerances, fixed step and the adjoint ODE.
    data_scale: s, the fixed scale of the input before the ODE (log|det| D log s).
    kinetic_energy, jacobian_norm: RNODE weights λ_K, λ_J (objective=likelihood).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        velocity: str = "unet",
        width: int = 32,
        resolutions: int = 2,
        blocks: int = 1,
        hidden: int = 256,
        depth: int = 3,
        num_classes: int | None = None,
        label_drop: float = 0.0,
        objective: str = "likelihood",
        trace: str = "hutchinson",
        probe: str = "rademacher",
        probes: int = 1,
        eval_trace: str = "exact",
        eval_probes: int = 16,
        solver: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        step_size: float | None = None,
        adjoint: bool = False,
        kinetic_energy: float = 0.0,
        jacobian_norm: float = 0.0,
        data_scale: float = 1.0,
    ):
        super().__init__()
        check_positive(in_channels=in_channels, width=width, resolutions=resolutions, blocks=blocks, hidden=hidden,
                       depth=depth)
        check_choice("velocity", velocity, VELOCITY_NETS)
        check_choice("objective", objective, OBJECTIVES)
        if velocity == "unet":
            check_image_size(image_size, 2 ** (resolutions - 1), f"the U-Net halves the image {resolutions - 1} times")
        else:
            check_image_size(image_size, 1, "")
        if num_classes is not None:
            check_positive(num_classes=num_classes)
        if not 0 <= label_drop < 1:
            raise InvalidValueError(f"label_drop must be in [0, 1), got {label_drop!r}")
        for name, value in (("kinetic_energy", kinetic_energy), ("jacobian_norm", jacobian_norm)):
            if not (math.isfinite(value) and value >= 0):
                raise InvalidValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(data_scale) and data_scale > 0):
            raise InvalidValueError(f"data_scale must be a finite number > 0, got {data_scale!r}")
        if eval_trace == "hutchinson" and eval_probes < 2:
            raise InvalidValueError(f"eval_trace=hutchinson needs eval_probes >= 2 to know its standard error, got "
                             f"{eval_probes}")

        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.label_drop, self.objective = float(label_drop), objective
        self.kinetic_energy, self.jacobian_norm = float(kinetic_energy), float(jacobian_norm)
        self.num_dims = in_channels * image_size**2
        self.data_scale = float(data_scale)
        self.scale_logdet = self.num_dims * math.log(self.data_scale)  # D log s
        if velocity == "unet":
            net = VelocityUNet(in_channels, width, resolutions, blocks, num_classes)
        else:
            net = FlatVelocity(VelocityMLP(self.num_dims, hidden, depth, num_classes))
        self.flow = ContinuousFlow(net, 0.0, 1.0, SolverOptions(solver, rtol, atol, step_size, adjoint),
                                   trace=TraceOptions(trace, probe, probes),
                                   eval_trace=TraceOptions(eval_trace, probe, eval_probes))

    # -- settings ---------------------------------------------------------------------------------
    @contextmanager
    def solver_settings(self, **changes):
        """Within the block, the solver options (method, rtol, atol, step_size, adjoint) given replace the
        model's own (e.g. to score or sample at other tolerances); the model's are back afterwards."""
        saved = self.flow.solver
        self.flow.solver = replace(saved, **changes)
        try:
            yield self
        finally:
            self.flow.solver = saved

    @property
    def nfe(self) -> int:
        """Function evaluations of the last solve."""
        return self.flow.nfe

    # -- data -> latent ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (z = z(1), ∫ tr(∂v/∂z) dt + D log s), the trace by this mode's estimator (eval: exact by default)."""
        with no_autocast(x):
            solution = self.flow.solve(x * self.data_scale, self._labels(y, x.shape[0], x.device))
        return solution.z, solution.logdet + self.scale_logdet

    def log_prob_estimate(self, x: torch.Tensor, y=None, generator=None) -> LogProbEstimate:
        """log p(x | y) = log N(z(1)) + ∫ tr dt + D log s, its standard error (0 for the exact trace) and
        {"nfe": ...}; Hutchinson probes from ``generator`` (one, or one per image)."""
        labels = self._training_labels(y, x.shape[0], x.device)
        with no_autocast(x):
            solution = self.flow.solve(x * self.data_scale, labels, generator=generator)
            log_p = standard_normal_log_prob(solution.z) + solution.logdet + self.scale_logdet
        return LogProbEstimate(log_p, solution.std_error, {"nfe": float(solution.nfe)})

    def log_prob(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """log p(x | y) in nats (B,) (an unbiased estimate with a Hutchinson trace)."""
        return self.log_prob_estimate(x, y).log_prob

    def log_prob_parts(self, x: torch.Tensor, y=None) -> LogProbParts:
        """Terms "scale/logdet" (D log s), "ode/logdet" (∫ tr(∂v/∂z) dt) and "prior" (log N(z(1); 0, I));
        no elementwise log-derivatives."""
        labels = self._training_labels(y, x.shape[0], x.device)
        with no_autocast(x):
            solution = self.flow.solve(x * self.data_scale, labels)
            scale = torch.full_like(solution.logdet, self.scale_logdet)
            return LogProbParts({"scale/logdet": scale, "ode/logdet": solution.logdet,
                                 "prior": standard_normal_log_prob(solution.z)})

    # -- training ---------------------------------------------------------------------------------
    def training_loss(self, y: torch.Tensor, labels=None) -> TrainingLoss:
        """objective=likelihood: log p(y | c) with RNODE penalties; objective=flow_matching: the regression loss."""
        labels = self._training_labels(labels, y.shape[0], y.device)
        if self.objective == "flow_matching":
            return TrainingLoss(loss=self.flow_matching_loss(y * self.data_scale, labels), name="fm_mse",
                                metrics={"nfe": 1.0})
        regularise = self.kinetic_energy > 0 or self.jacobian_norm > 0
        with no_autocast(y):
            solution = self.flow.solve(y * self.data_scale, labels, regularise=regularise)
            log_p = standard_normal_log_prob(solution.z) + solution.logdet + self.scale_logdet
        metrics: dict = {"nfe": float(solution.nfe)}
        penalty = None
        if regularise:
            penalty = (self.kinetic_energy * solution.kinetic + self.jacobian_norm * solution.jacobian) / self.num_dims
            metrics.update(kinetic_energy=solution.kinetic.mean().detach() / self.num_dims,
                           jacobian_norm=solution.jacobian.mean().detach() / self.num_dims)
        return TrainingLoss(log_prob=log_p, penalty=penalty, metrics=metrics)

    def flow_matching_loss(self, y: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(1/D) ||v(z_t, t, c) - (ε - y)||² per image of ODE inputs y (already scaled by s)."""
        return flow_matching_loss(self.flow.velocity, y, labels)

    # -- latent -> data ---------------------------------------------------------------------------
    def _latent(self, latents) -> torch.Tensor:
        parts = latent_list(latents)
        if len(parts) != 1:
            raise InvalidValueError(f"a CNF has one latent tensor, got {len(parts)}")
        return parts[0]

    def inverse(self, latents, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        """z -> (x = z(0)/s solved backwards, log|det ∂x/∂z| = -∫_0^1 tr dt - D log s along that path)."""
        z = self._latent(latents)
        with no_autocast(z):
            solution = self.flow.solve(z, self._labels(y, z.shape[0], z.device), reverse=True)
        return solution.z / self.data_scale, solution.logdet - self.scale_logdet

    def invert(self, latents, y=None) -> torch.Tensor:
        z = self._latent(latents)
        with no_autocast(z):
            x = self.flow.solve(z, self._labels(y, z.shape[0], z.device), reverse=True, logdet=False).z
        return x / self.data_scale

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, y=None, generator=None, *, solver: str | None = None,
               rtol: float | None = None, atol: float | None = None, step_size: float | None = None) -> torch.Tensor:
        """n images: z = T·ε, ε ~ N(0, I), solved from t = 1 to t = 0.  The keyword options replace the model's
        solver settings for this call (e.g. ``solver="rk4", step_size=0.1``: 10 steps, 40 evaluations)."""
        check_temperature(temperature)
        param = next(self.parameters())
        z = torch.randn((n, *self.input_shape), generator=generator, device=param.device, dtype=param.dtype)
        changes = {k: v for k, v in (("method", solver), ("rtol", rtol), ("atol", atol), ("step_size", step_size))
                   if v is not None}
        with self.solver_settings(**changes):
            return self.invert(z * temperature, y)

    @torch.no_grad()
    def reconstruction_errors(self, x: torch.Tensor) -> dict[str, float]:
        """max |f^{-1}(f(x)) - x| of the one ODE (∅ labels): the solver's round trip."""
        labels = self._labels(None, x.shape[0], x.device)
        with no_autocast(x):
            h = x * self.data_scale
            z = self.flow.solve(h, labels, logdet=False).z
            back = self.flow.solve(z, labels, reverse=True, logdet=False).z
        return {"ode": (back - h).abs().max().item()}


class FlatVelocity(nn.Module):
    """An MLP velocity on the flattened image: v(x) = unflatten(MLP(flatten(x)))."""

    def __init__(self, mlp: VelocityMLP):
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(x.flatten(1), t, cond).view_as(x)

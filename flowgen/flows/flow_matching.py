r"""Conditional flow matching on the linear path (Lipman et al. 2023; rectified flow, Liu et al. 2023).

With data x (the t = 0 end, where a continuous flow's ``forward`` starts), noise ε ~ N(0, I) (the t = 1 end)
and t ~ U(0, 1), the path and its velocity are

    z_t = (1 - t)·x + t·ε,        u_t = dz_t/dt = ε - x,

and the loss regresses the velocity field on u_t, per sample:

    L(x) = (1/D) ||v(z_t, t, c) - u_t||².

No ODE is solved.  Its minimiser over v is E[u_t | z_t] (the marginal velocity), whose flow carries the data
distribution at t = 0 to N(0, I) at t = 1: a continuous normalizing flow, scored by the same ODE likelihood.
"""

from __future__ import annotations

import torch
from torch import nn

# how a continuous flow is trained: maximum likelihood through the ODE, or this regression
OBJECTIVES = ("likelihood", "flow_matching")


def flow_matching_loss(velocity: nn.Module, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """(1/D) ||v(z_t, t, c) - (ε - x)||² per sample (B,), float32; t and ε from the global RNG."""
    t = torch.rand(x.shape[0], device=x.device, dtype=x.dtype)
    noise = torch.randn_like(x)
    t_ = t.view(-1, *([1] * (x.dim() - 1)))
    z_t = (1 - t_) * x + t_ * noise
    v = velocity(z_t, t, cond)
    return (v.float() - (noise - x).float()).pow(2).flatten(1).mean(1)

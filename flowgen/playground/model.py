"""A 2-D flow density: a stack of invertible blocks on a standard Gaussian base.

    z = f(x) = f_n ∘ … ∘ f_1 (x),     z ~ N(0, I)
    log p(x) = log N(f(x); 0, I) + Σ_j log|det ∂f_j/∂h_{j-1}|,     h_0 = x, h_j = f_j(h_{j-1})

Sampling runs the blocks backwards: x = f_1^{-1} ∘ … ∘ f_n^{-1} (z).  The intermediate variable
h_j has a density too, by the same change of variables through the blocks after it:

    log p_j(y) = log N(f_n ∘ … ∘ f_{j+1}(y); 0, I) + Σ_{i > j} log|det ∂f_i|

which is what the layer-by-layer figure draws: p_n is the Gaussian, p_0 the model's p(x).

Training minimises ``training_loss``: -log p(x) (maximum likelihood), or for a continuous flow
(``flowgen.flows.vector.build_cnf``) with objective "flow_matching" the flow-matching regression loss instead.
"""

from __future__ import annotations

import torch
from torch import nn

from flowgen.errors import InvalidValueError
from flowgen.flows.base import FlowSequence, zero_logdet
from flowgen.flows.flow_matching import OBJECTIVES as OBJECTIVES_2D
from flowgen.flows.prior import standard_normal_log_prob
from flowgen.flows.vector import ContinuousFlowSequence


class FlowDensity2d(nn.Module):
    """p(x) of a FlowSequence of blocks on N(0, I); ``blocks[j]`` is f_{j+1} in the module docstring."""

    def __init__(self, blocks: FlowSequence, objective: str = "likelihood"):
        super().__init__()
        if objective not in OBJECTIVES_2D:
            raise InvalidValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES_2D)}")
        if objective == "flow_matching" and not isinstance(blocks, ContinuousFlowSequence):
            raise InvalidValueError("objective=flow_matching trains a continuous flow's velocity: use flow.kind=cnf")
        self.blocks = blocks
        self.objective = objective

    def training_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Per point (B,): -log p(x) in nats, or the flow-matching loss (objective="flow_matching")."""
        if self.objective == "flow_matching":
            return self.blocks.flow_matching_loss(x)
        return -self.log_prob(x)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x), shape (B,), in nats."""
        z, logdet = self.blocks(x)
        return standard_normal_log_prob(z) + logdet

    def stage_log_prob(self, y: torch.Tensor, j: int) -> torch.Tensor:
        """log p_j(y): the density of h_j, after j of the n blocks have been applied to x."""
        logdet = zero_logdet(y)
        for block in list(self.blocks)[j:]:
            y, block_logdet = block(y)
            logdet = logdet + block_logdet
        return standard_normal_log_prob(y) + logdet

    @torch.no_grad()
    def stages(self, z: torch.Tensor) -> list[torch.Tensor]:
        """[h_n = z, h_{n-1}, …, h_0 = x]: the points after each block of the inverse, Gaussian to data."""
        points = [z]
        for block in reversed(list(self.blocks)):
            points.append(block.invert(points[-1]))
        return points

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples x = f^{-1}(z), z ~ N(0, I)."""
        z = torch.randn(n, 2, generator=generator)
        return self.blocks.invert(z)

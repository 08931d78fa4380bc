"""Maximum likelihood (or flow matching) on fresh samples: a plain loop (the image models train with Lightning).

    loss = -(1/B) Σ_b log p(x_b),   x_b drawn anew from the toy density at every step
    (a continuous flow trained by flow matching: the mean of its regression loss, ``FlowDensity2d.training_loss``)

Adam with a cosine learning-rate decay to 0 (the density sharpens in the last steps) and the
gradient norm clipped, as in the image models.  The data never repeat, so there is no
overfitting to watch and the training loss is an unbiased estimate of the cross-entropy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from flowgen.errors import UserError
from flowgen.playground.model import FlowDensity2d

MAX_GRAD_NORM = 10.0


def train(model: FlowDensity2d, sample_batch: Callable[[int], torch.Tensor], steps: int, batch_size: int, lr: float,
          log_every: int = 0, log: Callable[[str], None] = print) -> list[float]:
    """Fit ``model`` to ``sample_batch(batch_size)`` for ``steps`` Adam steps; returns the loss (nats) of each step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)  # one kernel for all parameters
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    losses = []
    for step in range(1, steps + 1):
        loss = model.training_loss(sample_batch(batch_size)).mean()
        if not torch.isfinite(loss):
            raise UserError(f"training diverged at step {step} (loss {loss.item()}); lower train.lr (now {lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps):
            name = "nll" if model.objective == "likelihood" else "flow-matching loss"
            log(f"step {step:5d}/{steps}  {name} {loss.item():.4f}{' nats' if name == 'nll' else ''}")
    model.eval()
    return losses


@torch.no_grad()
def mean_nll(model: FlowDensity2d, x: torch.Tensor) -> float:
    """-(1/N) Σ log p(x_n) in nats: the cross-entropy of the data under the model."""
    return -model.log_prob(x).double().mean().item()

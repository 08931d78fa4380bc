"""A test callback that puts an Inf into one rank's gradients (after DDP has averaged them)."""

from __future__ import annotations

import lightning as L


class InfGradientOnRank(L.Callback):
    """At ``step``, on ``rank`` only: one gradient entry becomes Inf, as a local overflow would make it.

    The gradients are already all-reduced when ``on_after_backward`` runs, so without the NaN guard's
    all-rank vote this rank would skip the step and the others would not: the ranks would desync.
    """

    def __init__(self, step: int, rank: int = 1):
        self.step = step
        self.rank = rank

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("inf")

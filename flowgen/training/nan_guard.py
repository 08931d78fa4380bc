"""Skipping optimizer steps whose loss or gradients are not finite, on every rank together."""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist

from flowgen.errors import InvalidValueError, UserError


class NonFiniteStepsError(UserError):
    """Training met too many consecutive NaN/Inf steps; the message names the step and the way out."""


def gradient_norm(parameters) -> torch.Tensor | None:
    """The global L2 norm of all gradients as a 0-d tensor (one fused kernel, no host sync); None without any."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def gradients_are_finite(parameters) -> torch.Tensor:
    """A 0-d bool tensor: every gradient entry is finite (the global norm is finite iff every entry is)."""
    norm = gradient_norm(parameters)
    return torch.ones((), dtype=torch.bool) if norm is None else torch.isfinite(norm)


def all_ranks_finite(finite: torch.Tensor) -> bool:
    """True only when ``finite`` holds on every rank (a MIN all-reduce), so all ranks skip together."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = finite.to(torch.int32).clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)
    return bool(finite)


class NonFiniteGuard(L.Callback):
    """Before each optimizer step: if the loss or any gradient is NaN/Inf on ANY rank, every rank
    drops its gradients (``p.grad = None``, so the optimizer leaves those weights and their
    moments untouched) and the step is counted in ``train/skipped_steps``.

    After ``max_consecutive`` bad steps in a row, training stops with ``NonFiniteStepsError``
    naming the step, the last good checkpoint and the usual causes. The weights are never
    updated from a bad step, so every checkpoint holds finite weights; ``FlowModule`` also
    refuses to save non-finite ones.

    Cost: one boolean read per step (one all-reduce of an int under DDP).
    """

    def __init__(self, max_consecutive: int = 20):
        super().__init__()
        if max_consecutive < 1:
            raise InvalidValueError(f"nan_guard.max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        finite = gradients_are_finite(pl_module.parameters())
        loss = getattr(pl_module, "last_loss", None)
        if loss is not None:
            finite = finite & torch.isfinite(loss.detach()).all().to(finite.device)
        if all_ranks_finite(finite):
            self.consecutive = 0
        else:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.skipped += 1
            self.consecutive += 1
            if self.consecutive >= self.max_consecutive:
                raise NonFiniteStepsError(self._message(trainer))
        pl_module.log("train/skipped_steps", float(self.skipped), rank_zero_only=True)

    def _message(self, trainer) -> str:
        callback = trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "") or "none saved yet"
        return (f"training stopped at step {trainer.global_step}: {self.consecutive} consecutive steps had NaN/Inf "
                f"loss or gradients (last good checkpoint: {last}); usual causes: a learning rate too high "
                "(optimizer.lr), a warmup too short (scheduler.warmup_steps), fp16 overflow (try bf16-mixed), or "
                "unbounded coupling scales; resume with ckpt_path=last after fixing it")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

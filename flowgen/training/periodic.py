"""Periodic measurements during training: once at every optimizer step that is a multiple of ``every_n_steps``,
on rank 0, logged to every logger at the global step."""

from __future__ import annotations

import lightning as L

from flowgen.errors import InvalidValueError


class EveryNSteps(L.Callback):
    """Base of the callbacks that measure every ``every_n_steps`` optimizer steps (never at step 0): a subclass
    gives ``measure_now(trainer, pl_module, batch) -> {name: value}``.

    ``due(trainer)`` is true once per such step: with gradient accumulation several batches end at the
    same global step, and only the first of them measures. Rank 0 measures alone (the measurements have
    no collective, so the other ranks need not run them), and only when there is a logger to log to."""

    def __init__(self, every_n_steps: int, name: str):
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise InvalidValueError(f"{name}.every_n_steps must be an int >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self._last_step = -1
        self.last_metrics: dict[str, float] = {}

    def due(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps != 0 or step == self._last_step:
            return False
        self._last_step = step
        return True

    def measure_now(self, trainer: L.Trainer, pl_module: L.LightningModule, batch) -> dict[str, float]:
        raise NotImplementedError

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.due(trainer) or not trainer.is_global_zero or not trainer.loggers:
            return
        self.last_metrics = self.measure_now(trainer, pl_module, batch)
        for logger in trainer.loggers:
            logger.log_metrics(self.last_metrics, step=trainer.global_step)

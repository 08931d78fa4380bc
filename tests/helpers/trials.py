"""Test callbacks for sweep trials: one job that diverges, a user mistake inside training, a stop
request, and a record of the steps at which validation ran."""

from __future__ import annotations

import lightning as L
from hydra.core.hydra_config import HydraConfig

from flowgen.errors import UserError


class NaNGradientsInJob(L.Callback):
    """In Hydra job ``job`` of a sweep only (``None``: in every run), every gradient is NaN from
    ``step`` on, as in a run whose learning rate is far too high: the NaN guard skips those steps
    and, after ``callbacks.nan_guard.max_consecutive`` of them, stops the run. Other jobs train normally."""

    def __init__(self, job: int | None, step: int = 0):
        self.job = job
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        job = HydraConfig.get().job.get("num") if HydraConfig.initialized() else None
        if (self.job is None or job == self.job) and trainer.global_step >= self.step:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))


class MistakeAtStep(L.Callback):
    """Raise a ``UserError`` (a mistake the user must fix, not a divergence) at the end of ``step``."""

    def __init__(self, step: int = 1):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise UserError(f"a mistake found at step {self.step}")


class ValidationSteps(L.Callback):
    """Appends the training step of every validation run during ``fit`` to ``ValidationSteps.steps``
    (a class attribute: the test reads it after ``train`` built and dropped the instance)."""

    steps: list[int] = []

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            ValidationSteps.steps.append(trainer.global_step)


class StopAtStep(L.Callback):
    """Request the end of training (``trainer.should_stop``, as EarlyStopping or a Timer would) at ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True

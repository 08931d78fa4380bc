"""A test callback that preempts its own run: the signal a cluster would send, at a chosen step."""

from __future__ import annotations

import os
import signal

import lightning as L


class SignalAtStep(L.Callback):
    """Send ``signal`` to this process at the end of ``step``, on the first attempt only (not after a resume)."""

    def __init__(self, step: int, signal_name: str = "SIGUSR2"):
        self.step = step
        self.signal = getattr(signal, signal_name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and trainer.ckpt_path is None and trainer.is_global_zero:
            os.kill(os.getpid(), self.signal)

"""last.ckpt at the final step of a run that ``max_steps`` stops in the middle of an epoch."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class FinalStepCheckpoint(L.Callback):
    """Lightning's ModelCheckpoint saves at validation and epoch ends (and every N steps), so a run
    stopped by ``max_steps`` inside an epoch would lose its last steps. This writes ``last.ckpt``
    at that final step, from inside the training loop (``on_train_batch_end``, the point Lightning
    knows how to resume from mid-epoch), not after ``fit`` returns, when the loop state has
    already moved on to the next epoch.
    """

    def __init__(self, checkpoint: ModelCheckpoint):
        super().__init__()
        self.checkpoint = checkpoint

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.max_steps is None or trainer.max_steps < 0 or trainer.global_step < trainer.max_steps:
            return
        last = Path(self.checkpoint.dirpath) / f"{self.checkpoint.CHECKPOINT_NAME_LAST}{self.checkpoint.FILE_EXTENSION}"
        trainer.save_checkpoint(last, weights_only=False)  # a full checkpoint, to resume from
        self.checkpoint.last_model_path = str(last)

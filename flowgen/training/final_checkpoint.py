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
        save_last_checkpoint(trainer, self.checkpoint)


def save_last_checkpoint(trainer: L.Trainer, checkpoint: ModelCheckpoint | None = None) -> Path:
    """Write ``last.ckpt`` now; call it from ``on_train_batch_end`` on every rank (rank 0 writes).

    Into ``checkpoint``'s directory, else the trainer's checkpoint callback's, else
    ``<default_root_dir>/checkpoints``.  Returns the path.
    """
    checkpoint = checkpoint or trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.dirpath:
        last = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
    else:
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last, weights_only=False)  # a full checkpoint, to resume from
    if checkpoint is not None:
        checkpoint.last_model_path = str(last)
    return last

"""The final training step: one more validation where the loop would not validate, then last.ckpt."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from flowgen.training.final_validation import loop_validates_after_this_batch, stops_after_this_batch, validate_in_step


class FinalStepCheckpoint(L.Callback):
    """At the end of the batch after which ``fit`` stops (``max_steps``, the last epoch's last batch,
    or a stop request such as ``max_time``), in this order:

    1. validate, unless the loop validates after this batch anyway (an epoch end): a run stopped
       inside an epoch still gets its ``val/bpd`` and its best checkpoint at this step, and no
       step is validated twice (``flowgen.training.final_validation``);
    2. write ``last.ckpt`` (when given the ``checkpoint`` callback that owns it): Lightning's
       ModelCheckpoint saves at validation and epoch ends (and every N steps), and writes
       ``last.ckpt`` only along with a checkpoint it saves at that step (a new best), so a run
       would lose its last steps.

    Both happen inside the training loop (``on_train_batch_end``, the point Lightning knows how to
    resume from mid-epoch), not after ``fit`` returns, when the loop state has already moved on.
    ``last.ckpt`` comes after the validation, so it knows the best checkpoint that one made.

    The callback runs after every other callback but the checkpoint callbacks (it moves itself
    there at setup): Lightning appends its ``max_time`` Timer, which requests the stop in this
    same hook, after the user's callbacks.
    """

    def __init__(self, checkpoint: ModelCheckpoint | None = None):
        super().__init__()
        self.checkpoint = checkpoint

    def setup(self, trainer, pl_module, stage):
        # a new list: the hook loop calling this iterates over the old one
        others = [c for c in trainer.callbacks if c is not self and not isinstance(c, Checkpoint)]
        trainer.callbacks = others + [self] + [c for c in trainer.callbacks if isinstance(c, Checkpoint)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not stops_after_this_batch(trainer):
            return
        if trainer.enable_validation and not loop_validates_after_this_batch(trainer):
            validate_in_step(trainer)
        if self.checkpoint is not None:
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

"""The last training step: whether this batch is it, and one more validation inside it.

Lightning validates at epoch ends (and every ``val_check_interval``), so a run that ``max_steps``
or a stop request (``max_time``) ends inside an epoch, e.g. a sweep trial of a few steps or
``debug=fast``, would have no ``val/bpd`` for its final weights: no best checkpoint, and no
objective for the sweep. ``FinalStepCheckpoint`` (flowgen/training/final_checkpoint.py) calls
``validate_in_step`` at the end of that final batch, then writes ``last.ckpt``.

Why inside the step (``on_train_batch_end``) and not ``trainer.validate`` after ``fit``:
``trainer.validate`` scores the weights but checkpoints nothing, and after ``fit`` the loop state
has moved on. Inside the step, the fit loop's own validation loop runs with its hooks, loggers,
``limit_val_batches`` and DDP ranks, and the checkpoints it triggers are written from the point
that a run resumes from exactly. Validation draws its noise from its own seeded generators, so it
leaves the training stream untouched.

This leans on a few private members of Lightning's loops (named where used; Lightning 2.6),
pinned by tests/test_sweeps.py.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops.utilities import _is_max_limit_reached
from lightning.pytorch.trainer import call


def stops_after_this_batch(trainer: L.Trainer) -> bool:
    """Whether ``fit`` ends after the batch whose ``on_train_batch_end`` is running: ``max_steps``
    reached, the last batch of the last epoch (``max_epochs``), or a stop request
    (``trainer.should_stop``, e.g. from Lightning's ``max_time`` Timer) that the loop honours now."""
    fit = trainer.fit_loop
    if _is_max_limit_reached(trainer.global_step, fit.max_steps):
        return True
    epoch_ends = fit.epoch_loop._num_ready_batches_reached()
    epochs_done = fit.epoch_progress.current.processed + int(epoch_ends)  # the loop counts an epoch after its end
    if epoch_ends and _is_max_limit_reached(epochs_done, fit.max_epochs):
        return True
    # a stop request waits for min_epochs and min_steps (FitLoop._can_stop_early, counting an epoch ending now)
    return bool(trainer.should_stop) and epochs_done >= (fit.min_epochs or 0) and \
        trainer.global_step >= (fit.min_steps or 0)


def loop_validates_after_this_batch(trainer: L.Trainer) -> bool:
    """Whether the epoch loop validates after this batch on its own schedule (an epoch end, a
    ``val_check_interval`` point), a stop request aside: Lightning also validates when
    ``should_stop`` is set, but a stop inside an epoch is left to ``validate_in_step``."""
    stop, trainer.should_stop = trainer.should_stop, False
    try:
        return trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
    finally:
        trainer.should_stop = stop


def validate_in_step(trainer: L.Trainer) -> None:
    """Run the fit loop's validation now, from a training-batch hook, as the epoch loop runs it after
    a batch (``_TrainingEpochLoop.on_advance_end``), and mark it as run so the loop does not repeat it.

    ModelCheckpoint saves at this validation's end, not at the train epoch end (its default when
    validation runs once per epoch): by then the loop has counted the epoch as processed, and a run
    resumed from such a checkpoint inside the epoch has its sampler set to the next epoch's order
    (tests/test_exact_resume.py catches it).
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    on_epoch_end = [c._save_on_train_epoch_end for c in checkpoints]  # the save_on_train_epoch_end argument
    for c in checkpoints:
        c._save_on_train_epoch_end = False
    trainer.validating = True  # the validation loop becomes the active one (results, hooks)
    first_loop_iter = trainer._logger_connector._first_loop_iter
    try:
        if not epoch_loop._should_accumulate():
            call._call_lightning_module_hook(trainer, "on_validation_model_zero_grad")
        epoch_loop.val_loop.run()
    finally:
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter
        for c, value in zip(checkpoints, on_epoch_end, strict=True):
            c._save_on_train_epoch_end = value
    epoch_loop._skip_next_val = True  # a stop request would make the loop validate this step again

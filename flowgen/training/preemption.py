"""Preemption and time limits on a cluster: save ``last.ckpt`` at a step boundary, then requeue.

SLURM warns a job before its time limit (``sbatch --signal=USR2@120``, which submitit sets from
``signal_delay_s``) and, on clusters configured for it, before preemption.  The signal lands at
an arbitrary point of a step and on each rank at a slightly different moment, so it is never
acted on inside the handler; the handler only raises a flag.  Every ``check_every_n_steps``
steps the ranks agree on the flag (one MAX all-reduce of an int), and if any rank has it:

1. every rank calls ``save_last_checkpoint`` (rank 0 writes ``last.ckpt`` atomically) at the
   end of the step, the point Lightning resumes from mid-epoch;
2. the signal's previous handler runs, when there was one: submitit's, which on rank 0 pickles
   the job again, requeues it (``scontrol requeue``) and exits; on other ranks it returns;
3. the process exits: code ``exit_code`` (default 3) without a previous handler, so that a
   plain sbatch script can requeue itself (``scripts/slurm/train.sbatch``), 0 on the ranks
   submitit leaves running.

The requeued job starts ``train.py`` again with the same overrides in the same run directory;
``ckpt_path=last`` (set automatically when ``SLURM_RESTART_COUNT`` says the job was requeued)
resumes it exactly.  Lightning's own SLURM auto-requeue (SIGUSR1) is switched off by train.py.
"""

from __future__ import annotations

import signal
import sys
import threading

import lightning as L
import torch
import torch.distributed as dist

from flowgen.errors import InvalidValueError
from flowgen.training.final_checkpoint import save_last_checkpoint

REQUEUE_EXIT_CODE = 3


def parse_signal(name: str | int) -> signal.Signals:
    """``USR2``, ``SIGUSR2`` or a number -> the signal."""
    if isinstance(name, int):
        return signal.Signals(name)
    key = str(name).upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    if not hasattr(signal, key):
        raise InvalidValueError(f"preemption.signal={name!r} is not a signal name (e.g. USR1, USR2, TERM)")
    return signal.Signals(getattr(signal, key))


class PreemptionCheckpoint(L.Callback):
    """On ``signal``: at the next agreed step end, save last.ckpt on every rank, requeue, exit."""

    def __init__(self, signal: str | int = "USR2", check_every_n_steps: int = 10, exit_code: int = REQUEUE_EXIT_CODE):
        super().__init__()
        self.signal = parse_signal(signal)
        if check_every_n_steps < 1:
            raise InvalidValueError(f"preemption.check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self.exit_code = exit_code
        self.received = False
        self._previous = None
        self._installed = False

    # -- the handler: only a flag -----------------------------------------------------------------
    def _handler(self, signum, frame) -> None:
        self.received = True

    def on_fit_start(self, trainer, pl_module):
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be caught in the main thread
        self._previous = signal.getsignal(self.signal)
        signal.signal(self.signal, self._handler)
        self._installed = True

    def teardown(self, trainer, pl_module, stage):
        if self._installed:
            signal.signal(self.signal, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    # -- acting on it at a step boundary ------------------------------------------------------------
    def _agreed(self, trainer) -> bool:
        if trainer.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return self.received
        if trainer.global_step % self.check_every_n_steps:
            return False  # every rank skips the same steps, so the collective below always pairs up
        flag = torch.tensor([int(self.received)], dtype=torch.int32, device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._agreed(trainer):
            return
        path = save_last_checkpoint(trainer)
        trainer.strategy.barrier("preemption-checkpoint")
        if trainer.is_global_zero:
            print(f"caught SIG{self.signal.name.removeprefix('SIG')} at step {trainer.global_step}: saved {path}; "
                  "the job resumes from it when relaunched with ckpt_path=last", flush=True)
        previous = self._previous
        self.teardown(trainer, pl_module, "fit")
        if callable(previous):
            previous(self.signal, None)  # submitit: rank 0 requeues and exits here
            sys.exit(0)  # the other ranks: the requeue ends this job anyway; exit cleanly meanwhile
        sys.exit(self.exit_code)

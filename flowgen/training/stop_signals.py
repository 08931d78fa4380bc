"""Ctrl-C and ``kill`` end a run without losing it: ``last.ckpt`` at the current step, then exit.

Without this, SIGINT raises KeyboardInterrupt wherever Python happens to be, Lightning shuts
down, and everything since the last checkpoint is lost; SIGTERM (``kill``, ``docker stop``,
a scheduler) kills the process outright. Here the handler only raises a flag (acting inside
it could interrupt a checkpoint write or a collective). At the end of the step in progress
the ranks agree on the flag (one MAX all-reduce of an int per step under DDP), every rank
calls ``save_last_checkpoint`` (rank 0 writes ``last.ckpt`` atomically), rank 0 prints the
command that resumes, and the process exits with 128 + the signal's number, as a shell
reports a process ended by that signal. A second signal before then ends the run at once
(the default action), for a user who does not want to wait for the step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import lightning as L
import torch
import torch.distributed as dist

from flowgen.training.final_checkpoint import save_last_checkpoint

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal(L.Callback):
    """On SIGINT/SIGTERM: ``last.ckpt`` at the end of the current step, the resume command, exit 128 + N."""

    def __init__(self, resume_command: str, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        super().__init__()
        self.resume_command = resume_command
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handler(self, signum, frame) -> None:
        received = signal.Signals(signum)
        if self.received is not None:  # the second one: stop now, as the signal would without us
            self._restore()
            signal.raise_signal(received)
            return
        self.received = received
        os.write(2, f"\n{received.name}: saving last.ckpt at the end of this step, then stopping "
                    f"(send {received.name} again to stop at once without saving)\n".encode())

    def on_train_start(self, trainer, pl_module):
        # after Lightning's own SIGTERM handler (registered after on_fit_start), which would raise
        # SystemExit (exit status 0, nothing saved) from inside a validation; ours replaces it for the fit
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return  # handlers can only be installed from the main thread
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def teardown(self, trainer, pl_module, stage):
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _agreed(self, trainer) -> int:
        """The signal number any rank received (0 for none), the same on every rank."""
        mine = int(self.received or 0)
        if trainer.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return mine
        flag = torch.tensor([mine], dtype=torch.int32, device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        signum = self._agreed(trainer)
        if not signum:
            return
        path = save_last_checkpoint(trainer)
        trainer.strategy.barrier("stop-on-signal")
        if trainer.is_global_zero:
            print(f"stopped by {signal.Signals(signum).name} at step {trainer.global_step}: saved {path}\n"
                  f"resume with: {self.resume_command}", flush=True)
        self._restore()
        sys.exit(128 + signum)

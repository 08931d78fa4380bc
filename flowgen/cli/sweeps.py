"""Sweeps that survive a bad trial: every job returns a number and leaves a row.

A trial returns its best ``val/bpd``, or +inf when it diverged (the NaN guard's stop, non-finite
weights, or a NaN/Inf ``val/bpd``): Optuna records +inf as a completed trial, the worst, so its
sampler learns to avoid that region and the study goes on, where a NaN or no value would fail the
trial (and a study whose trials all failed ends without its ``optimization_results.yaml``).
Every job of any sweeper, grids included, appends its row to ``<sweep dir>/results.csv``.
"""

from __future__ import annotations

import csv
import fcntl
import io
import math
import os
import sys
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

RESULTS_FILE = "results.csv"  # in the sweep directory: one row per trial, appended as each one ends
RESULTS_COLUMNS = ["job", "val_bpd", "test_bpd", "steps", "status", "reason", "run_dir", "overrides"]


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra sweep (``-m``, ``hparams_search=...``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_objective(trainer: L.Trainer, run_dir: Path, val_bpd, test_bpd, diverged: str | None) -> float | None:
    """What a sweep trial returns: its best ``val/bpd``, or +inf when it diverged (the NaN guard's stop,
    non-finite weights, or a NaN/Inf ``val/bpd``). Optuna records +inf as a completed trial, the worst,
    so its sampler learns to avoid the region and the study goes on; a NaN or no value would fail the
    trial, and a study whose trials all failed ends without its ``optimization_results.yaml``.
    Rank 0 appends the trial's row to ``<sweep dir>/results.csv`` (any sweeper)."""
    if diverged is None and val_bpd is not None and not math.isfinite(val_bpd):
        diverged = f"val/bpd is {val_bpd}"
    if diverged is not None:
        status, reason, val_bpd = "diverged", diverged, math.inf
        note = f"diverged: {reason}; this trial's objective is val/bpd = inf and the sweep goes on"
    elif val_bpd is None:
        status, reason = "no val/bpd", "never validated (trainer.limit_val_batches=0, or train=false)"
        note = f"no val/bpd: this trial {reason}, so it returns no objective"
    else:
        status, reason, note = "completed", "", None
    if trainer.is_global_zero:
        if note:
            print(note, file=sys.stderr, flush=True)
        record_trial(run_dir, trainer.global_step, val_bpd, test_bpd, status, reason)
    return val_bpd


def record_trial(run_dir: Path, steps: int, val_bpd, test_bpd, status: str, reason: str) -> Path:
    """Append this job's row to ``<sweep dir>/results.csv``, under an exclusive POSIX lock on the file
    (``lockf``, which NFS clients forward to the server), so jobs that end together, on any node
    of a cluster, each add one whole row, and the header is written once."""
    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.sweep.dir)
    row = {"job": hydra_cfg.job.num, "val_bpd": val_bpd, "test_bpd": test_bpd, "steps": steps, "status": status,
           "reason": reason, "run_dir": _relative_to(run_dir, sweep_dir),
           "overrides": " ".join(hydra_cfg.overrides.task)}
    text = io.StringIO()
    csv.DictWriter(text, RESULTS_COLUMNS, lineterminator="\n").writerow(row)
    path = sweep_dir / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)  # released when the file closes
        if f.seek(0, io.SEEK_END) == 0:
            f.write(",".join(RESULTS_COLUMNS) + "\n")
        f.write(text.getvalue())
        f.flush()
        os.fsync(f.fileno())
    return path


def _relative_to(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)

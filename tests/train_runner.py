"""Run train.py (and the other entry points) as a subprocess inside a temporary project layout."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A few steps of everything; small enough for 2 CPU cores.
FAST = [
    "trainer.max_steps=6",
    "trainer.max_epochs=-1",
    "trainer.limit_train_batches=3",  # an epoch of 3 steps, so validation runs at steps 3 and 6
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "callbacks.samples.every_n_steps=3",
    "callbacks.samples.num_per_row=4",
    "~callbacks.rich_progress_bar",
    "scheduler.warmup_steps=2",
    "data.num_workers=0",
]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_entry(script: str, args: list[str], tmp_path: Path, timeout: int = 300, env: dict | None = None) -> Run:
    """``python <script> args`` with logs and data under tmp_path and no network credentials."""
    environment = {
        **os.environ,
        "FLOWGEN_LOG_DIR": str(tmp_path / "logs"),
        "FLOWGEN_DATA_DIR": str(tmp_path / "data"),
        "HOME": str(tmp_path / "home"),  # no ~/.netrc: wandb has no credentials
        "WANDB_SILENT": "true",
        "PYTHONWARNINGS": "ignore",
        **(env or {}),
    }
    environment.pop("WANDB_API_KEY", None)
    environment.pop("WANDB_MODE", None) if env is None or "WANDB_MODE" not in env else None
    proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def run_dir(tmp_path: Path, run_name: str) -> Path:
    return tmp_path / "logs" / "train" / "runs" / run_name

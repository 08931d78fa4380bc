"""Checkpoints survive kill -9 at any moment, and a failed write keeps the previous checkpoint."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from flowgen.checkpoints.writing import AtomicCheckpointIO, CheckpointWriteError
from tests.train_runner import FAST, REPO, run_dir, run_entry


def test_a_failed_write_names_the_file_and_keeps_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    good = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, good)
    (tmp_path / "not_a_dir").write_text("a file where a directory should be")
    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint .*not_a_dir/last.ckpt: .*previous"):
        io.save_checkpoint({"step": 2}, tmp_path / "not_a_dir" / "last.ckpt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, good)
    assert torch.load(good, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "not_a_dir"]  # no partial file left


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    good = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, good)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("flowgen.checkpoints.writing.torch.save", full_disk)
    with pytest.raises(CheckpointWriteError, match="last.ckpt: No space left on device; the previous checkpoints"):
        io.save_checkpoint({"step": 2}, good)
    monkeypatch.undo()
    assert torch.load(good, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


WRITER = """
import sys, torch
from flowgen.checkpoints.writing import AtomicCheckpointIO
io = AtomicCheckpointIO()
big = {"weights": torch.randn(64 * 1024 * 1024 // 4), "step": 2}  # 64 MiB: a write that takes a while
while True:
    io.save_checkpoint(big, sys.argv[1])
"""


def test_kill_9_during_a_write_leaves_the_old_or_the_new_file(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=REPO)
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob(".last.ckpt.partial-*")) and time.time() < deadline:
            time.sleep(0.01)  # wait until a write is under way
        assert list(tmp_path.glob(".last.ckpt.partial-*")), "the writer never started a write"
        time.sleep(random.uniform(0.0, 0.2))
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    step = torch.load(target, weights_only=True)["step"]  # a whole file, whichever it is
    assert step in (1, 2)


def kill_and_resume(tmp_path, name: str, kill_after: float) -> None:
    """Train with a checkpoint every step, kill -9 after ``kill_after`` s, check last.ckpt, resume to the end."""
    args = ["logger=csv", f"run_name={name}", *FAST, "trainer.max_steps=40", "test=false",
            "callbacks.model_checkpoint.every_n_train_steps=1", "model.hidden_channels=8"]
    env = {**os.environ, "FLOWGEN_LOG_DIR": str(tmp_path / "logs"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir(tmp_path, name) / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists()
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    resumed = run_entry("train.py", [*args, "ckpt_path=last"], tmp_path)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resuming from {last}" in resumed.stdout
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 40 >= step


def test_kill_9_while_training_and_checkpointing_then_resume(tmp_path):
    kill_and_resume(tmp_path, "killed", kill_after=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(6))
def test_kill_9_at_random_moments(tmp_path, attempt):
    kill_and_resume(tmp_path, f"killed{attempt}", kill_after=random.Random(attempt).uniform(0.0, 3.0))


def test_an_unwritable_checkpoint_directory_is_one_clear_line(tmp_path):
    (tmp_path / "blocked").write_text("a file, not a directory")
    run = run_entry("train.py", ["logger=csv", "run_name=blocked", *FAST, "trainer.max_steps=3", "test=false",
                                 f"callbacks.model_checkpoint.dirpath={tmp_path / 'blocked' / 'checkpoints'}"],
                    tmp_path)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.returncode == 2 and len(errors) == 1, run.output[-3000:]
    assert "cannot write checkpoint" in errors[0] and "blocked/checkpoints" in errors[0]

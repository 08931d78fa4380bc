"""train.py end to end as a subprocess: outputs, resume, and one-line errors.

Tests of: flowgen/training/module.py, flowgen/training/samples.py, flowgen/training/schedules.py.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch

from tests.fake_datasets import write_cifar10
from tests.train_runner import FAST, run_dir, run_entry


def read_metric(directory, name):
    values = []
    for path in sorted(directory.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            values += [float(row[name]) for row in csv.DictReader(f) if row.get(name)]
    return values


def assert_complete_run(directory):
    assert (directory / "checkpoints" / "last.ckpt").is_file()
    assert list((directory / "samples").glob("step_*.png"))
    assert (directory / "config.yaml").is_file()
    val = read_metric(directory, "val/bpd")
    assert val and all(math.isfinite(v) for v in val)
    return val


@pytest.mark.parametrize("model, dequantization", [
    ("glow_small", "uniform"),
    ("realnvp_small", "variational"),
])
def test_train_on_digits(tmp_path, model, dequantization):
    run = run_entry("train.py", [f"model={model}", f"dequantization={dequantization}", "logger=csv",
                                 "run_name=digits", *FAST], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    directory = run_dir(tmp_path, "digits")
    assert_complete_run(directory)
    assert "val/bpd (best)" in run.stdout and str(directory) in run.stdout
    ckpt = torch.load(directory / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    target = ckpt["hyper_parameters"]["run_config"]["model"]["_target_"]
    assert target == {"glow_small": "flowgen.models.Glow", "realnvp_small": "flowgen.models.RealNVP"}[model]


@pytest.mark.parametrize("model, dequantization", [
    ("glow_small", "variational"),
    pytest.param("realnvp_small", "uniform", marks=pytest.mark.slow),  # realnvp_small also trains on digits below
])
def test_train_on_fake_cifar10(tmp_path, model, dequantization):
    write_cifar10(tmp_path / "data", per_batch=8, n_test=8)
    run = run_entry("train.py", ["data=cifar10", f"model={model}", f"dequantization={dequantization}",
                                 "model.hidden_channels=16", "data.batch_size=4", "data.val_size=8",
                                 "logger=csv", "run_name=cifar", *FAST], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    assert_complete_run(run_dir(tmp_path, "cifar"))


def test_resume_continues_at_the_next_step_in_the_same_directory(tmp_path):
    args = ["logger=csv", "run_name=resumable", *FAST]
    first = run_entry("train.py", [*args, "trainer.max_steps=4"], tmp_path)
    assert first.returncode == 0, first.output[-3000:]
    directory = run_dir(tmp_path, "resumable")
    second = run_entry("train.py", [*args, "trainer.max_steps=8", "ckpt_path=last"], tmp_path)
    assert second.returncode == 0, second.output[-3000:]
    assert "resuming from" in second.stdout and str(directory / "checkpoints" / "last.ckpt") in second.stdout
    ckpt = torch.load(directory / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 8
    # the resumed launch logged its own steps 5..8 and kept the first launch's metrics file
    steps = []
    for path in sorted(directory.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            steps.append(sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("train/bpd")}))
    assert len(steps) == 2 and max(steps[0]) < 4 <= min(steps[1]) and max(steps[1]) == 7


def test_ckpt_path_last_without_checkpoint_starts_fresh_with_a_notice(tmp_path):
    run = run_entry("train.py", ["logger=csv", "run_name=fresh", "ckpt_path=last", "test=false", *FAST,
                                 "trainer.max_steps=2"], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    assert "no checkpoint" in run.stdout and "starting a fresh run" in run.stdout


def test_default_command_uses_wandb_offline_with_a_notice(tmp_path):
    run = run_entry("train.py", [*FAST, "trainer.max_steps=3", "run_name=default"], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    assert "wandb: no credentials found" in run.stdout
    directory = run_dir(tmp_path, "default")
    assert (directory / "wandb_id.txt").is_file()
    assert list((directory / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("args, message", [
    (["model=glow", "model.scales=4"], "image_size=8 is not divisible by 16"),
    # two more through the whole process (~9 s each; their messages are also tested in process)
    pytest.param(["ckpt_path=/nonexistent/run.ckpt"], "no such checkpoint file or run directory",
                 marks=pytest.mark.slow),
    pytest.param(["data=cifar10", "data.download=false"], "cifar", marks=pytest.mark.slow),
    # a composition-time error through the whole process (run_entry_point is also tested in process)
    pytest.param(["optimizer.lr=0.001", "scheduler.schedule=linear"],
                 "scheduler.schedule must be one of constant, cosine", marks=pytest.mark.slow),
])
def test_user_mistakes_end_in_one_clear_line(tmp_path, args, message):
    run = run_entry("train.py", ["logger=csv", *FAST, *args], tmp_path)
    assert run.returncode == 2, run.output[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0].lower(), run.stderr
    assert "Traceback" not in run.output


def test_a_new_run_never_overwrites_checkpoints(tmp_path):
    args = ["logger=csv", "run_name=taken", "test=false", *FAST, "trainer.max_steps=2"]
    assert run_entry("train.py", args, tmp_path).returncode == 0
    last = run_dir(tmp_path, "taken") / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    again = run_entry("train.py", [*args, "overwrite=no"], tmp_path)  # "no" is false, not a truthy string
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr
    assert last.read_bytes() == before

"""Exact resume: N steps, stop, resume to 2N == 2N steps straight, bit for bit (CPU, deterministic).

Tests of: flowgen/training/rng.py.
"""

from __future__ import annotations

import csv

import pytest
import torch

from tests.fake_datasets import write_cifar10
from tests.train_runner import FAST, run_dir, run_entry

# epochs of 3 batches, so step 4 stops in the middle of the second epoch; EMA, variational
# dequantization and random flips loaded by 2 worker processes, so all their states must come back
ARGS = ["logger=csv", *FAST, "trainer.deterministic=true", "ema_decay=0.9", "dequantization=variational",
        "data=cifar10", "data.hflip=true", "data.num_workers=2", "data.batch_size=4", "data.val_size=8",
        "model.hidden_channels=8", "model.steps=2", "test=false", "callbacks.samples.every_n_steps=100"]


def last_checkpoint(tmp_path, name):
    return torch.load(run_dir(tmp_path, name) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def logged_bpd(tmp_path, name) -> dict[int, float]:
    values = {}
    for path in sorted(run_dir(tmp_path, name).glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            values.update({int(r["step"]): float(r["train/bpd"]) for r in csv.DictReader(f) if r.get("train/bpd")})
    return values


def test_interrupted_and_resumed_equals_straight(tmp_path):
    write_cifar10(tmp_path / "data", per_batch=8, n_test=8)
    straight = run_entry("train.py", [*ARGS, "run_name=straight", "trainer.max_steps=8"], tmp_path)
    assert straight.returncode == 0, straight.output[-3000:]
    first = run_entry("train.py", [*ARGS, "run_name=resumed", "trainer.max_steps=4"], tmp_path)
    assert first.returncode == 0, first.output[-3000:]
    assert last_checkpoint(tmp_path, "resumed")["global_step"] == 4
    second = run_entry("train.py", [*ARGS, "run_name=resumed", "trainer.max_steps=8", "ckpt_path=last"], tmp_path)
    assert second.returncode == 0, second.output[-3000:]

    a, b = last_checkpoint(tmp_path, "straight"), last_checkpoint(tmp_path, "resumed")
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():  # model, EMA, noise flow, ActNorm buffers
        assert torch.equal(tensor, b["state_dict"][name]), name
    for (s1, s2) in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(),
                        strict=True):
        for key in s1:
            assert torch.equal(torch.as_tensor(s1[key]), torch.as_tensor(s2[key])), key
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert logged_bpd(tmp_path, "straight")[7] == logged_bpd(tmp_path, "resumed")[7]


@pytest.mark.slow
def test_resume_on_another_number_of_devices_warns_and_continues(tmp_path):
    """1 process for 4 steps, then 2 DDP processes on the CPU (gloo) to step 8."""
    args = ["logger=csv", *FAST, "model.hidden_channels=8", "test=false", "run_name=devices"]
    first = run_entry("train.py", [*args, "trainer.max_steps=4"], tmp_path)
    assert first.returncode == 0, first.output[-3000:]
    second = run_entry("train.py", [*args, "trainer.max_steps=8", "ckpt_path=last", "trainer.devices=2",
                                    "trainer.strategy=ddp"], tmp_path, timeout=600, env={"PYTHONWARNINGS": "default"})
    assert second.returncode == 0, second.output[-3000:]
    assert second.output.count("instead of 64 x 1") == 1 and "restarts its data order" in second.output
    assert last_checkpoint(tmp_path, "devices")["global_step"] == 8


@pytest.mark.slow
def test_two_cpu_processes_train_and_score_every_val_image_once(tmp_path):
    """trainer=ddp_cpu: 2 gloo processes; val/bpd is an average over the 297 val images, each once."""
    run = run_entry("train.py", ["logger=csv", *FAST, "trainer=ddp_cpu", "model.hidden_channels=8", "test=false",
                                 "run_name=ddp", "trainer.limit_val_batches=null", "trainer.max_steps=3"],
                    tmp_path, timeout=600)
    assert run.returncode == 0, run.output[-3000:]
    assert "64 per device x 2 devices" in run.stdout
    assert last_checkpoint(tmp_path, "ddp")["global_step"] == 3


# TarFlow, in process (runs of about two seconds): class-conditional with label dropout, whose draws inside
# log_prob come from the global generator that the checkpoint's RNG states restore, next to the dequantization
# noise; EMA of decay 0.999; diagnostics and the invertibility monitor on; epochs of 3 steps, so step 4 stops
# inside the second epoch
TARFLOW_ARGS = ["model=tarflow", "model.width=16", "model.num_blocks=2", "model.layers_per_block=1",
                "model.num_heads=2", "model.num_classes=${data.num_classes}", "model.label_drop=0.5",
                "ema_decay=0.999", "logger=csv", *FAST, "data.batch_size=16", "test=false",
                "callbacks.samples.every_n_steps=100", "callbacks.diagnostics.every_n_steps=2",
                "callbacks.invertibility_monitor.every_n_steps=2"]


def _train_in_process(tmp_path, name: str, *overrides: str):
    from flowgen.cli.train import train
    from tests.test_configs import compose_train

    train(compose_train(tmp_path / name, [*TARFLOW_ARGS, f"run_name={name}", *overrides]))
    return torch.load(tmp_path / name / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _same_states(a: dict, b: dict) -> bool:
    return a["state_dict"].keys() == b["state_dict"].keys() and all(
        torch.equal(t, b["state_dict"][name]) for name, t in a["state_dict"].items())


@pytest.mark.usefixtures("single_thread")
def test_tarflow_with_label_dropout_resumes_bit_for_bit(tmp_path, monkeypatch):
    straight = _train_in_process(tmp_path, "straight", "trainer.max_steps=8")
    _train_in_process(tmp_path, "resumed", "trainer.max_steps=4")
    resumed = _train_in_process(tmp_path, "resumed", "trainer.max_steps=8", "ckpt_path=last")
    assert straight["global_step"] == resumed["global_step"] == 8
    assert _same_states(straight, resumed)  # model, EMA (and its update count)
    for s1, s2 in zip(straight["optimizer_states"][0]["state"].values(),
                      resumed["optimizer_states"][0]["state"].values(), strict=True):
        assert all(torch.equal(torch.as_tensor(s1[k]), torch.as_tensor(s2[k])) for k in s1)

    # the check has teeth: without the RNG states, the resumed steps draw other noise and other dropped labels
    monkeypatch.setattr("flowgen.training.module.set_rng_states", lambda states: None)
    _train_in_process(tmp_path, "no_rng", "trainer.max_steps=4")
    assert not _same_states(straight, _train_in_process(tmp_path, "no_rng", "trainer.max_steps=8", "ckpt_path=last"))

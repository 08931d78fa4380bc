"""Cluster launching and sweeps, on this machine: Hydra multirun with the basic launcher, the
Optuna sweeper, the submitit launcher with its local executor, the SLURM launcher's
configuration, and preemption -> checkpoint -> requeue -> resume."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import flowgen.cli  # noqa: F401  (the config resolvers)
from flowgen.training.preemption import REQUEUE_EXIT_CODE, parse_signal
from tests.train_runner import FAST, REPO, run_dir, run_entry

QUICK = [*FAST, "logger=csv", "model.hidden_channels=8", "trainer.max_steps=2", "trainer.limit_train_batches=2",
         "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
# the test callback that sends the preemption signal from inside the run (tests/helpers/preempt.py)
PREEMPT_AT_4 = ["+callbacks.preempt._target_=tests.helpers.preempt.SignalAtStep", "+callbacks.preempt.step=4",
                "callbacks.preemption.check_every_n_steps=1", "trainer.max_steps=8", "trainer.limit_train_batches=3"]
HELPERS_ENV = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


def sweep_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "logs" / "train" / "multiruns").iterdir())


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_slurm_launcher_runs_one_task_per_device_on_each_node():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8",
                                          "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    # what Lightning's SLURM environment requires: ntasks-per-node = devices, nodes = num_nodes
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (8, 8, 2)
    assert launcher.partition == "gpu" and launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0
    assert cfg.callbacks.preemption.signal == os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")


def test_signal_names_parse_and_typos_are_refused():
    assert parse_signal("USR2") == parse_signal("SIGUSR2") == signal.SIGUSR2
    assert parse_signal(int(signal.SIGTERM)) == signal.SIGTERM
    with pytest.raises(ValueError, match="not a signal name"):
        parse_signal("USR3")


@pytest.mark.slow  # the Optuna test below also sweeps through the basic launcher
def test_multirun_with_the_basic_launcher_runs_every_job(tmp_path):
    run = run_entry("train.py", ["-m", *QUICK, "optimizer.lr=1e-3,2e-3"], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    lrs = sorted(yaml.safe_load((sweep / j / "config.yaml").read_text())["optimizer"]["lr"] for j in ("0", "1"))
    assert lrs == [1e-3, 2e-3]


# slow: the suite's 10-minute budget; run with `make test-full`
@pytest.mark.slow
def test_optuna_sweep_minimises_val_bpd(tmp_path):
    run = run_entry("train.py", [*QUICK, "hparams_search=glow_optuna", "hydra.sweeper.n_trials=2"], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # the search space of configs/hparams_search/glow_optuna.yaml, less what the command line fixed
    # (QUICK sets model.hidden_channels and scheduler.warmup_steps)
    assert set(results["best_params"]) == {"optimizer.lr", "model.steps", "model.coupling"}
    # the best value is the best val/bpd that one of the two trials returned
    assert results["best_value"] > 0
    assert [p.name for p in sorted(sweep.iterdir()) if p.is_dir()] == ["0", "1"]


def test_preempted_run_saves_last_ckpt_and_the_requeued_run_resumes(tmp_path):
    """Without submitit (a plain sbatch script): the signal -> last.ckpt at a step end -> exit 3;
    the requeued job (same command, SLURM_RESTART_COUNT=1) resumes from it in the same directory."""
    args = [*QUICK, *PREEMPT_AT_4, "run_name=preempted"]
    first = run_entry("train.py", args, tmp_path, env=HELPERS_ENV)
    assert first.returncode == REQUEUE_EXIT_CODE, first.output[-3000:]
    assert "caught SIGUSR2 at step 5" in first.stdout
    last = run_dir(tmp_path, "preempted") / "checkpoints" / "last.ckpt"
    assert ckpt_step(last) == 5

    second = run_entry("train.py", args, tmp_path, env={**HELPERS_ENV, "SLURM_RESTART_COUNT": "1"})
    assert second.returncode == 0, second.output[-3000:]
    assert f"resuming from {last}" in second.stdout
    assert ckpt_step(last) == 8


# slow (28 s): test_preempted_run_saves_last_ckpt_and_the_requeued_run_resumes covers the same path without submitit
@pytest.mark.slow
def test_submitit_local_job_is_preempted_requeued_and_resumes(tmp_path):
    """hydra/launcher=submitit_local: the signal reaches the job, flowgen saves last.ckpt, submitit
    checkpoints and requeues the job, and the requeued job resumes from that last.ckpt to the end."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")
    run = run_entry("train.py", ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                                 *QUICK, *PREEMPT_AT_4], tmp_path, env=HELPERS_ENV, timeout=600)
    assert run.returncode == 0, run.output[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    log = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.out"))
    assert "caught SIGUSR2 at step 5" in log and "Requeued job" in log, log[-3000:]
    assert f"resuming from {sweep / '0' / 'checkpoints' / 'last.ckpt'}" in log
    assert ckpt_step(sweep / "0" / "checkpoints" / "last.ckpt") == 8

"""Resume continues the run (flowgen/cli/resume.py): its directory, its saved configuration, the command
line on top; architecture and data changes refused in one line; Ctrl-C/kill keep the current step.

Tests of: flowgen/checkpoints/run_dir.py, flowgen/training/final_checkpoint.py,
flowgen/training/final_validation.py, flowgen/training/stop_signals.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from flowgen.cli.errors import EXIT_USER_ERROR, run_reporting_errors
from flowgen.cli.resume import continue_config, plan_run
from flowgen.cli.train import train
from flowgen.errors import UserError
from tests.test_configs import compose_train
from tests.train_runner import FAST, REPO, run_dir

TINY = ["logger=csv", *FAST, "model.hidden_channels=8", "test=false"]


def _compose(tmp_path, overrides):
    """The composed config and the overrides Hydra would report for this command line."""
    args = [*TINY, *overrides]
    return compose_train(tmp_path, args), [f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path}/data", *args]


def _saved(tmp_path, overrides=()) -> dict:
    cfg, _ = _compose(tmp_path, list(overrides))
    cfg.paths.output_dir = str(tmp_path / "old_run")
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def _continued(tmp_path, saved, overrides, run_dir_name="old_run"):
    cfg, args = _compose(tmp_path, overrides)
    return continue_config(saved, cfg, args, None, tmp_path / run_dir_name)


def test_command_line_keys_apply_on_top_of_the_saved_config(tmp_path):
    saved = _saved(tmp_path, ["model.coupling=spline", "model.steps=2", "data.batch_size=16"])
    resumed = _continued(tmp_path, saved, ["trainer.max_steps=40", "data.batch_size=32", "~callbacks.diagnostics",
                                           "model.memory=invertible"])
    assert resumed.model.coupling == "spline" and resumed.model.steps == 2  # not repeated, still the run's
    assert resumed.trainer.max_steps == 40 and resumed.data.batch_size == 32 and resumed.model.memory == "invertible"
    assert "diagnostics" not in resumed.callbacks and "samples" in resumed.callbacks


def test_a_group_choice_replaces_that_group(tmp_path):
    saved = _saved(tmp_path, ["logger=[csv,tensorboard]"])
    resumed = _continued(tmp_path, saved, ["logger=csv"])
    assert list(resumed.logger) == ["csv"]


@pytest.mark.parametrize("overrides, listed", [
    (["model.steps=4"], "model.steps: 2 -> 4"),
    (["model.coupling=additive"], "model.coupling: spline -> additive"),
    (["model=realnvp_small"], "model._target_: flowgen.models.Glow -> flowgen.models.RealNVP"),
    (["data=cifar10"], "data.name: digits -> cifar10"),
    (["dequantization=variational"], "dequantization._target_"),
    (["optimizer._target_=torch.optim.Adam"], "optimizer._target_: torch.optim.AdamW -> torch.optim.Adam"),
    (["data.hflip=true"], "data.hflip: False -> True"),
    (["preprocessing.logit_alpha=0.05"], "preprocessing.logit_alpha: None -> 0.05"),  # the model's input
    (["optimizer.weight_decay_params=[*.logs]"], "optimizer.weight_decay_params"),  # the optimizer's groups
])
def test_architecture_and_data_changes_are_refused_listing_the_keys(tmp_path, overrides, listed):
    saved = _saved(tmp_path, ["model.coupling=spline", "model.steps=2"])
    with pytest.raises(UserError) as refused:
        _continued(tmp_path, saved, overrides)
    message = str(refused.value)
    assert listed in message and "cannot change the architecture or the data" in message and "\n" not in message


def test_switching_the_ema_off_is_refused_but_another_decay_is_fine(tmp_path):
    saved = _saved(tmp_path)  # digits + glow_small: the tuned EMA of 0.999
    with pytest.raises(UserError, match=r"cannot switch the EMA off \(ema_decay: 0.999 -> None\)"):
        _continued(tmp_path, saved, ["ema_decay=null"])
    assert _continued(tmp_path, saved, ["ema_decay=0.99"]).ema_decay == 0.99


def test_paths_inside_a_moved_run_directory_follow_it(tmp_path):
    saved = _saved(tmp_path)
    resumed = _continued(tmp_path, saved, [], run_dir_name="moved_run")
    assert resumed.paths.output_dir == str(tmp_path / "moved_run")
    assert resumed.callbacks.model_checkpoint.dirpath == str(tmp_path / "moved_run" / "checkpoints")
    assert resumed.trainer.default_root_dir == str(tmp_path / "moved_run")


def test_a_global_group_sets_the_keys_it_changes(tmp_path):
    saved = _saved(tmp_path, ["trainer.max_steps=50"])
    cfg, args = _compose(tmp_path, ["debug=fast"])
    from flowgen.cli.resume import compose_defaults

    resumed = continue_config(saved, cfg, args, compose_defaults, tmp_path / "old_run")
    assert resumed.trainer.max_steps == cfg.trainer.max_steps  # what debug=fast (after FAST) sets


def test_a_spline_run_resumes_from_its_directory_with_its_own_config(tmp_path, capsys):
    first = compose_train(tmp_path / "a", [*TINY, "model.coupling=spline", "trainer.max_steps=2"])
    run_reporting_errors(train, first)
    old_dir = tmp_path / "a" / "run"
    assert torch.load(old_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    # a later command in another place: only the run directory and what changes
    again = compose_train(tmp_path / "b", [*TINY, f"ckpt_path={old_dir}", "trainer.max_steps=4"])
    plan = plan_run(again, [f"ckpt_path={old_dir}", "trainer.max_steps=4"])
    assert plan.run_dir == old_dir.resolve() and plan.cfg.model.coupling == "spline"
    run_reporting_errors(train, again)
    assert torch.load(old_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert OmegaConf.load(old_dir / "config.yaml").trainer.max_steps == 4
    assert not (tmp_path / "b" / "run").exists()  # the new directory was never used, so it is gone
    assert f"resuming from {old_dir.resolve() / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out


def test_a_refused_resume_changes_nothing(tmp_path, capsys):
    run_reporting_errors(train, compose_train(tmp_path / "a", [*TINY, "trainer.max_steps=2"]))
    old_dir = tmp_path / "a" / "run"
    before = {p.name: p.read_bytes() for p in (old_dir / "checkpoints").iterdir()}
    config_before = (old_dir / "config.yaml").read_text()
    again = compose_train(tmp_path / "b", [*TINY, f"ckpt_path={old_dir}", "model.steps=3"])
    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(train, again)
    assert exit_info.value.code == EXIT_USER_ERROR
    assert "model.steps: 8 -> 3" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (old_dir / "checkpoints").iterdir()} == before
    assert (old_dir / "config.yaml").read_text() == config_before
    assert not (tmp_path / "b" / "run").exists()


def test_an_older_checkpoint_never_rewinds_its_run_but_can_branch(tmp_path, capsys):
    run_reporting_errors(train, compose_train(tmp_path / "a", [*TINY, "trainer.max_steps=6"]))
    old_dir = tmp_path / "a" / "run"
    last = old_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    (older,) = [p for p in (old_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    again = compose_train(tmp_path / "b", [*TINY, f"ckpt_path={older}", "trainer.max_steps=8"])
    with pytest.raises(SystemExit):
        run_reporting_errors(train, again)
    assert "is not the latest state of run" in capsys.readouterr().err and last.read_bytes() == before
    branch = compose_train(tmp_path / "b", [*TINY, f"ckpt_path={older}", "trainer.max_steps=8", "run_name=fork"])
    run_reporting_errors(train, branch)
    assert last.read_bytes() == before  # the original run is untouched
    assert torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    assert f"branching run fork from {older}" in capsys.readouterr().out


def test_the_checkpoints_folder_names_its_run(tmp_path):
    run_reporting_errors(train, compose_train(tmp_path / "a", [*TINY, "trainer.max_steps=2"]))
    old_dir = tmp_path / "a" / "run"
    again = compose_train(tmp_path / "b", [*TINY, f"ckpt_path={old_dir / 'checkpoints'}"])
    assert plan_run(again, [f"ckpt_path={old_dir / 'checkpoints'}"]).run_dir == old_dir.resolve()


def _start(args, tmp_path) -> subprocess.Popen:
    env = {**os.environ, "FLOWGEN_LOG_DIR": str(tmp_path / "logs"), "FLOWGEN_DATA_DIR": str(tmp_path / "data"),
           "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("stop", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_second_run_is_refused_and_a_signal_saves_the_current_step(tmp_path, stop):
    """One run holds the directory; Ctrl-C (SIGINT) or kill (SIGTERM) saves last.ckpt at the step in
    progress, prints the command that resumes, and exits 128 + N; that command continues the run."""
    args = [*TINY, "run_name=held", "trainer.max_steps=100000", "trainer.limit_train_batches=null",
            "callbacks.samples.every_n_steps=100000", "callbacks.preemption.check_every_n_steps=1"]
    first = _start(args, tmp_path)
    directory = run_dir(tmp_path, "held")
    deadline = time.time() + 240
    while not list((directory / "csv").glob("version_*/metrics.csv")) and time.time() < deadline:
        time.sleep(0.5)  # training has begun once the logger has written
    second = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, "run_name=held", "ckpt_path=last"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "FLOWGEN_LOG_DIR": str(tmp_path / "logs"), "PYTHONWARNINGS": "ignore"})
    assert second.returncode == EXIT_USER_ERROR, second.stderr[-2000:]
    assert f"is in use by PID {first.pid} on" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    first.send_signal(stop)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 128 + stop, err[-3000:]
    saved = torch.load(directory / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert f"stopped by {stop.name} at step {saved}:" in out
    command = next(line for line in out.splitlines() if line.startswith("resume with: "))
    assert command == f"resume with: python {REPO / 'train.py'} ckpt_path={directory}"
    resumed = _start([f"ckpt_path={directory}", f"trainer.max_steps={saved + 2}"], tmp_path)
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    assert torch.load(directory / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == saved + 2
    assert not (directory / "run.lock").exists()


def test_start_up_mistakes_are_one_line_and_leave_no_directory(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FLOWGEN_LOG_DIR": str(tmp_path / "logs")}
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    # the two that happen where Hydra makes the run directory, before any flowgen code runs (the rest of the
    # catalogue is tested in process: tests/test_bad_inputs.py)
    cases = [
        (["run_name=../../escaped"], {}, "run_name=../../escaped must be a single directory name"),
        ([], {"FLOWGEN_LOG_DIR": str(blocker / "logs")}, f"cannot create {blocker / 'logs'}"),
    ]
    for args, extra, message in cases:
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=240, env={**env, **extra})
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-2000:]
        assert lines == [f"error: {message}"] or (len(lines) == 1 and lines[0].startswith(f"error: {message}")), lines
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    runs = tmp_path / "logs" / "train" / "runs"
    assert not runs.exists() or not any(runs.iterdir())

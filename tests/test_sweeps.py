"""Sweeps survive: a run stopped inside an epoch validates once more (so every trial has an
objective and a best checkpoint), a diverged trial returns +inf without ending the study, and
every trial gets its row in <sweep dir>/results.csv."""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from flowgen.cli.errors import EXIT_USER_ERROR, run_reporting_errors
from flowgen.cli.sweeps import RESULTS_COLUMNS, RESULTS_FILE, record_trial, sweep_objective
from flowgen.cli.train import train
from tests.test_configs import compose_train
from tests.train_runner import FAST, REPO, run_dir, run_entry

pytestmark = pytest.mark.usefixtures("single_thread")  # a tiny Glow: threads only contend on 2 shared cores

# epochs of 3 steps: a 5-step run stops inside its second epoch, a 6-step run at its end
TINY = ["logger=csv", "~callbacks.rich_progress_bar", "trainer.accelerator=cpu", "trainer.max_epochs=-1",
        "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
        "model.hidden_channels=8", "model.steps=2", "data.num_workers=0", "scheduler.warmup_steps=2",
        "callbacks.samples.every_n_steps=100", "test=false"]
VALIDATION_STEPS = ["+callbacks.validations._target_=tests.helpers.trials.ValidationSteps"]
HELPERS_ENV = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


def diverging(job: int | str) -> list[str]:
    """NaN gradients from the first step (in sweep job ``job``, or ``null``: any run); the NaN guard stops at step 1."""
    return ["+callbacks.diverge._target_=tests.helpers.trials.NaNGradientsInJob", f"+callbacks.diverge.job={job}",
            "callbacks.nan_guard.max_consecutive=2"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def model_checkpoint_state(ckpt: dict) -> dict:
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
    return state


def multirun(tmp_path: Path, overrides: list[str], job: int = 0):
    """The config a sweep's job ``job`` gets, with Hydra's state as a multirun sets it (in process)."""
    return compose_train(tmp_path, ["hydra.mode=MULTIRUN", f"hydra.job.num={job}",
                                    f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides])


def read_results(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / RESULTS_FILE, newline="") as f:
        return list(csv.DictReader(f))


# ---- the final validation ----------------------------------------------------------------------------------

STOP_AT_4 = ["trainer.max_steps=8", "+callbacks.stop._target_=tests.helpers.trials.StopAtStep",
             "+callbacks.stop.step=4"]


@pytest.mark.parametrize(("overrides", "validated_at"), [
    (["trainer.max_steps=5"], [3, 5]),  # max_steps inside the second epoch: its end (3), and once more at 5
    (["trainer.max_steps=6"], [3, 6]),  # max_steps at an epoch end: validated there once
    (STOP_AT_4, [3, 4]),  # a stop request (should_stop) inside the second epoch
], ids=["max_steps-inside-an-epoch", "max_steps-at-an-epoch-end", "stop-request"])
def test_every_run_validates_at_its_last_step_and_no_step_twice(tmp_path, overrides, validated_at):
    from tests.helpers.trials import ValidationSteps

    ValidationSteps.steps.clear()
    val_bpd = train(compose_train(tmp_path, [*TINY, *VALIDATION_STEPS, *overrides]))
    assert ValidationSteps.steps == validated_at
    final = validated_at[-1]

    checkpoints = tmp_path / "run" / "checkpoints"
    last = load(checkpoints / "last.ckpt")
    best_path = Path(model_checkpoint_state(last)["best_model_path"])  # last.ckpt knows the final best
    assert last["global_step"] == final and best_path.parent == checkpoints
    if final % 3:  # a stop inside an epoch; its validation improved on step 3's (a fresh flow's first steps do)
        best = load(best_path)
        assert best_path.name == f"epoch001-step{final:07d}.ckpt" and best["global_step"] == final
        assert best["loops"] == last["loops"]  # written from the same point of the step, which resumes exactly
    assert val_bpd == pytest.approx(model_checkpoint_state(last)["best_model_score"].item())
    assert math.isfinite(val_bpd)


def test_a_time_limit_validates_once_at_the_last_step(tmp_path):
    """``trainer.max_time``: Lightning's Timer requests the stop after the user's callbacks (the step
    it stops at depends on the machine's speed)."""
    from tests.helpers.trials import ValidationSteps

    ValidationSteps.steps.clear()
    train(compose_train(tmp_path, [*TINY, *VALIDATION_STEPS, "trainer.max_steps=200", "trainer.max_time=00:00:00:01"]))
    last = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] < 200
    assert ValidationSteps.steps[-1] == last["global_step"]
    assert len(set(ValidationSteps.steps)) == len(ValidationSteps.steps)


@pytest.mark.slow  # two processes (~1 min on 2 cores)
def test_two_ddp_processes_validate_together_at_a_stop_inside_an_epoch(tmp_path):
    """Every rank runs the final validation (val/bpd is all-reduced: a rank left out would hang the
    others); rank 0 writes the best checkpoint and last.ckpt at the final step."""
    run = run_entry("train.py", [*FAST, "logger=csv", "trainer=ddp_cpu", "model.hidden_channels=8", "model.steps=2",
                                 "trainer.max_steps=4", "test=false", "run_name=ddp"], tmp_path, timeout=600)
    assert run.returncode == 0, run.output[-3000:]
    checkpoints = run_dir(tmp_path, "ddp") / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch001-step0000004.ckpt", "last.ckpt"]
    assert load(checkpoints / "last.ckpt")["global_step"] == 4
    with open(run_dir(tmp_path, "ddp") / "csv" / "version_0" / "metrics.csv", newline="") as f:
        validations = [row for row in csv.DictReader(f) if row.get("val/bpd")]
    assert len(validations) == 2  # the epoch end (step 3) and the stop (step 4)


# ---- divergence: a single run stops, a sweep trial returns +inf --------------------------------------------

def test_a_diverged_single_run_still_ends_in_one_line(tmp_path, capsys):
    cfg = compose_train(tmp_path, [*TINY, "trainer.max_steps=5", *diverging("null")])
    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(train, cfg)
    assert exit_info.value.code == EXIT_USER_ERROR
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "training stopped at step 1: 2 consecutive steps had NaN/Inf" in line


def test_a_diverged_sweep_trial_returns_inf_and_a_mistake_still_stops_the_sweep(tmp_path, capsys):
    assert train(multirun(tmp_path, [*TINY, "trainer.max_steps=5", *diverging(1)], job=1)) == math.inf
    assert "diverged: training stopped at step 1" in capsys.readouterr().err
    (row,) = read_results(tmp_path / "sweep")
    assert (row["job"], float(row["val_bpd"]), row["steps"], row["status"]) == ("1", math.inf, "1", "diverged")
    assert row["reason"].startswith("training stopped at step 1: 2 consecutive steps had NaN/Inf")

    # a mistake the user must fix is not a divergence: it ends the sweep, in one line
    mistake = ["+callbacks.mistake._target_=tests.helpers.trials.MistakeAtStep", "+callbacks.mistake.step=1"]
    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(train, multirun(tmp_path / "second", [*TINY, "trainer.max_steps=5", *mistake]))
    assert exit_info.value.code == EXIT_USER_ERROR
    assert "error: a mistake found at step 1" in capsys.readouterr().err


def test_a_non_finite_val_bpd_is_a_diverged_trial(tmp_path):
    multirun(tmp_path, [])  # Hydra's state of a sweep job
    trainer = SimpleNamespace(is_global_zero=True, global_step=7)
    assert sweep_objective(trainer, tmp_path / "sweep" / "0", float("nan"), None, None) == math.inf
    assert sweep_objective(trainer, tmp_path / "sweep" / "0", 3.5, 3.6, None) == 3.5
    rows = read_results(tmp_path / "sweep")
    assert [(r["status"], r["reason"], r["val_bpd"]) for r in rows] == [
        ("diverged", "val/bpd is nan", "inf"), ("completed", "", "3.5")]
    assert rows[1]["run_dir"] == "0" and rows[1]["test_bpd"] == "3.6"


def _append_rows(n: int) -> None:
    for _ in range(n):
        record_trial(Path("."), 1, 2.5, None, "completed", "a reason, with a comma")


def test_jobs_ending_together_each_append_one_whole_row(tmp_path):
    """Jobs of a parallel sweep (SLURM, local processes) append under a lock: one header, whole rows."""
    multirun(tmp_path, ["optimizer.lr=1e-3"])  # set in this process; the forked writers inherit it
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_append_rows, args=(25,)) for _ in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert [w.exitcode for w in writers] == [0] * 4
    rows = read_results(tmp_path / "sweep")
    assert len(rows) == 100 and list(rows[0]) == RESULTS_COLUMNS
    assert {(r["reason"], r["overrides"]) for r in rows} == {("a reason, with a comma", rows[0]["overrides"])}
    assert rows[0]["overrides"].endswith("optimizer.lr=1e-3")


# ---- end to end: an Optuna study of three 5-step trials, one diverging -------------------------------------

def test_optuna_sweep_survives_a_diverged_trial_and_writes_its_results(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[cluster]'")
    args = [*FAST, "logger=csv", "model.hidden_channels=8", "model.steps=2", "trainer.limit_val_batches=1",
            "test=false", "trainer.max_steps=5", *diverging(1),
            "hparams_search=glow_optuna", "hydra.sweeper.n_trials=3"]
    run = run_entry("train.py", args, tmp_path, env=HELPERS_ENV)
    assert run.returncode == 0, run.output[-3000:]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()

    rows = read_results(sweep)
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert [r["status"] for r in rows] == ["completed", "diverged", "completed"]
    assert float(rows[1]["val_bpd"]) == math.inf and "NaN/Inf" in rows[1]["reason"]
    for row in (rows[0], rows[2]):  # 5 steps, validated at the stop inside the second epoch
        assert row["steps"] == "5" and math.isfinite(float(row["val_bpd"]))
        assert load(sweep / row["run_dir"] / "checkpoints" / "last.ckpt")["global_step"] == 5
    assert any(o.startswith("optimizer.lr=") for o in rows[1]["overrides"].split())  # what Optuna sampled
    assert "diverged: training stopped at step 1" in run.stderr

    # Optuna took +inf as a completed trial, the worst (the sweeper logs "Failed experiment" for a failed one)
    assert "Failed experiment" not in run.output
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == min(float(rows[0]["val_bpd"]), float(rows[2]["val_bpd"]))

"""A quiet start (flowgen/cli/quiet.py): third-party notices are silenced by message, real warnings
still come through, no ANSI codes reach a pipe, and the tools write nothing under logs/ but their outputs."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from flowgen.cli.loggers import build_loggers
from flowgen.cli.quiet import _RANK_ZERO_LOGGERS, quiet_third_party_notices
from tests.train_runner import run_dir, run_entry

LITLOGGER_TIP = ("💡 Tip: For seamless cloud logging and experiment tracking, try installing "
                 "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger, which logs metrics and "
                 "artifacts automatically to the Lightning Experiments platform.")
MODEL_CHECKPOINT = "lightning.pytorch.callbacks.model_checkpoint"

# What none of the entry points may print when stdout and stderr are pipes.
NOTICES = ["litlogger", "LeafSpec", "could not find the monitored key", "exists and is not empty",
           "anonymous setting", "\x1b["]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def recorded_warnings():
    """Every warning raised inside, except those quiet_third_party_notices() filters out."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party_notices()  # in front of "always", as in a run
        yield caught


def _lightning_warning(message: str) -> None:
    """A warning as Lightning's ModelCheckpoint raises it (rank_zero_warn -> warnings.warn in that module)."""
    import lightning.pytorch.callbacks.model_checkpoint as source

    warnings.warn_explicit(message, UserWarning, source.__file__, 1, module=MODEL_CHECKPOINT)


# ---- (a) in process: each notice by its own path, its neighbours untouched ---------------------------

def test_lightning_tip_is_dropped_and_its_other_info_lines_kept():
    import lightning.pytorch as pl
    import lightning_utilities.core.rank_zero as rank_zero_module

    assert rank_zero_module.log.name in _RANK_ZERO_LOGGERS  # the logger rank_zero_info writes to
    quiet_third_party_notices()
    records = Records()
    rank_zero_module.log.addHandler(records)
    try:
        pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)  # Lightning prints its tip here
        rank_zero_module.log.info(LITLOGGER_TIP)
    finally:
        rank_zero_module.log.removeHandler(records)
    assert any(m.startswith("GPU available") for m in records.messages), records.messages
    assert not any("litlogger" in m for m in records.messages), records.messages


def test_leafspec_deprecation_is_ignored_only_when_lightning_raises_it(recorded_warnings):
    from lightning.pytorch.utilities._pytree import _tree_flatten
    from torch.utils._pytree import LeafSpec

    _tree_flatten(torch.ones(2))  # Lightning's own LeafSpec(): the FutureWarning of every run
    assert not recorded_warnings
    LeafSpec()  # the same deprecation from our own code is a real warning
    warnings.warn("something else changes in a future version", FutureWarning, stacklevel=1)
    assert [str(w.message)[:30] for w in recorded_warnings] == ["`isinstance(treespec, LeafSpec",
                                                                "something else changes in a fu"]


def test_model_checkpoint_notices_are_ignored_and_a_misspelt_monitor_still_warns(recorded_warnings):
    missing = ("`ModelCheckpoint(monitor={!r})` could not find the monitored key in the returned metrics: "
               "['train/bpd', 'epoch', 'step']. HINT: Did you call `log({!r}, value)` in the `LightningModule`?")
    _lightning_warning(missing.format("val/bpd", "val/bpd"))
    _lightning_warning("Checkpoint directory /runs/x/checkpoints exists and is not empty.")
    assert not recorded_warnings
    _lightning_warning(missing.format("val/bdp", "val/bdp"))
    _lightning_warning("The `srun` command is available on your system but is not used.")
    assert len(recorded_warnings) == 2
    assert "val/bdp" in str(recorded_warnings[0].message)


def test_quiet_is_idempotent():
    with warnings.catch_warnings():
        quiet_third_party_notices()
        before = len(warnings.filters)
        quiet_third_party_notices()
        assert len(warnings.filters) == before
    for name in _RANK_ZERO_LOGGERS:
        assert len(logging.getLogger(name).filters) == 1


def test_wandb_logger_leaves_out_the_unset_anonymous_setting(tmp_path):
    """wandb warns "The anonymous setting has no effect" for any value Lightning passes, None included."""
    cfg = OmegaConf.create({"wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "p",
                                      "save_dir": str(tmp_path), "offline": True, "id": "abc"}})
    (logger,) = build_loggers(cfg, tmp_path)
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["project"] == "p"
    cfg.wandb.anonymous = True  # asked for explicitly: passed on
    (logger,) = build_loggers(cfg, tmp_path)
    assert logger._wandb_init["anonymous"] == "allow"


# ---- (b) and (c): the real entry points with stdout and stderr piped ------------------------------

def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _assert_quiet(run) -> None:
    assert run.returncode == 0, run.output[-3000:]
    for notice in NOTICES:
        assert notice not in run.output, f"{notice!r} in:\n{run.output[-3000:]}"


def test_train_resume_sample_evaluate_are_quiet_and_tools_write_only_their_outputs(tmp_path):
    env = {"PYTHONWARNINGS": "default"}  # train_runner ignores warnings by default; here they must show
    train = ["debug=fast", "logger=csv", "run_name=x"]
    _assert_quiet(run_entry("train.py", train, tmp_path, env=env))
    directory = run_dir(tmp_path, "x")
    assert not (directory / "train.log").exists()  # Hydra's job log file is not written (it stayed empty)
    _assert_quiet(run_entry("train.py", [*train, "ckpt_path=last", "trainer.max_steps=12"], tmp_path, env=env))

    before = _files(tmp_path)
    _assert_quiet(run_entry("sample.py", [f"ckpt_path={directory}", "n=2"], tmp_path, env=env))
    _assert_quiet(run_entry("evaluate.py", [f"ckpt_path={directory}", "typicality.split=null"], tmp_path,
                            env=env))
    new = sorted(str(p.relative_to(tmp_path)) for p in _files(tmp_path) - before)
    # nothing under logs/sample or logs/evaluate, nothing in the working directory: only the outputs
    outputs = "logs/train/runs/x/generated/", "logs/train/runs/x/checkpoints/"
    assert new and all(name.startswith(outputs[0]) or (name.startswith(outputs[1]) and ".eval-" in name)
                       for name in new), new
    assert {p.name for p in tmp_path.iterdir()} <= {"logs", "data", "home"}
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {"train"}


@pytest.mark.slow
def test_default_wandb_logger_is_quiet_when_piped(tmp_path):
    """The default logger (wandb, offline without credentials): no anonymous-setting warning and no
    colour codes in wandb's closing lines."""
    run = run_entry("train.py", ["debug=fast", "logger=wandb", "run_name=w", "test=false"], tmp_path,
                    env={"PYTHONWARNINGS": "default", "WANDB_SILENT": "false"})
    _assert_quiet(run)
    assert "wandb sync" in run.output  # wandb's own closing lines are still there, in plain text

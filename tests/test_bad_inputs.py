"""The catalogue of user mistakes: each ends in ONE line naming the problem and the fix, exit status 2.

Run in process through the same path as ``python train.py`` (compose, then ``run_reporting_errors``);
tests/test_train.py and tests/test_crash_safety.py run a few of them as real subprocesses.
README "Troubleshooting" lists the same cases.

Tests of: flowgen/cli/run_files.py.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from flowgen.build import build_module
from flowgen.cli.errors import EXIT_USER_ERROR, run_reporting_errors
from flowgen.cli.launch import startup_error
from flowgen.cli.overrides import unknown_choice
from flowgen.cli.train import train
from tests.fake_datasets import write_png
from tests.test_configs import compose_train


def run_train(tmp_path, capsys, overrides) -> str:
    """train.py's path in process (compose: a wrong type or choice is caught as run_entry_point catches it;
    then the task through run_reporting_errors); returns the single error line."""
    try:
        cfg = compose_train(tmp_path, ["logger=csv", "~callbacks.rich_progress_bar", "trainer.max_steps=1",
                                       "trainer.accelerator=cpu", *overrides])
    except Exception as exc:  # noqa: BLE001 - what Hydra raises while composing
        message = startup_error(exc)
        assert message is not None, f"no one-line message for {exc!r}"
        assert "\n" not in message
        return f"error: {message}"
    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(train, cfg)
    assert exit_info.value.code == EXIT_USER_ERROR
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    return errors[0]


@pytest.mark.parametrize("args, message", [
    (["model=glwo"], "model=glwo is not a model config; choose one of "),
    (["data=cifar100"], "data=cifar100 is not a data config; choose one of celeba, cifar10, digits"),
    (["dequantization=gaussian"], "dequantization=gaussian is not a dequantization config; choose one of uniform"),
    (["logger=[csv,tensorbord]"], "logger=tensorbord is not a logger config"),
])
def test_unknown_config_choices(args, message):
    assert message in unknown_choice(args)


def test_known_choices_and_plain_keys_pass():
    assert unknown_choice(["model=glow", "logger=[csv,tensorboard]", "trainer.max_steps=3", "~callbacks.samples",
                           "data.path=/x", "hydra/launcher=basic", "--cfg", "job"]) is None


@pytest.fixture
def image_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    for i in range(6):
        write_png(tmp_path / "photos" / f"{i}.png", size=(12, 12), seed=i)
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return tmp_path


@pytest.mark.parametrize("overrides, message", [
    (["model=glow", "model.scales=4"], "image_size=8 is not divisible by 16"),
    (["data=cifar10", "data.n_bits=9"], "data.n_bits=9 must be in [1, 8]"),
    (["data=cifar10", "data.download=false"], "cifar10 files not found in"),
    (["data.batch_size=0"], "data.batch_size=0 must be >= 1"),
    (["data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
    (["callbacks.samples.temperatures=[0.7,-1]"], "callbacks.samples.temperatures=[0.7, -1.0] has an element that "
                                                  "must be >= 0"),
    (["callbacks.samples.temperatures=[nan]"], "callbacks.samples.temperatures=[nan] has an element that must be a "
                                               "finite number"),
    (["callbacks.samples.temperatures=[]"], "callbacks.samples.temperatures=[] must not be empty"),
    (["trainer.precision=17"], "trainer.precision=17 is not one of 32-true"),
    (["trainer.precision=16-mixed"], "trainer.precision=16-mixed needs a CUDA GPU"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 must be >= 1"),
    (["trainer.max_steps=-2"], "trainer.max_steps=-2 must be >= -1"),
    (["trainer.limit_val_batches=1.5"], "trainer.limit_val_batches=1.5 must be a number of batches"),
    (["scheduler.schedule=linear"], "scheduler.schedule=linear: scheduler.schedule must be one of constant, cosine"),
    (["scheduler.warmup_steps=-1"], "scheduler.warmup_steps=-1 must be >= 0"),
    (["optimizer.lr=-0.001"], "optimizer.lr=-0.001 must be > 0"),
    (["optimizer.lr=0"], "optimizer.lr=0.0 must be > 0"),
    (["optimizer.lr=inf"], "optimizer.lr=inf must be a finite number"),
    (["optimizer.lr=fast"], "optimizer.lr=fast: optimizer.lr must be a number"),
    (["optimizer.betas=[0.9,1.5]"], "optimizer.betas=[0.9, 1.5] has an element that must be in [0, 1)"),
    (["model.coupling=spline2"], "model.coupling=spline2: model.coupling must be one of affine, additive, spline"),
    (["model.permutation=random"], "model.permutation must be one of lu, conv, shuffle, reverse"),
    (["model.memory=none"], "model.memory must be one of standard, checkpoint, invertible"),
    (["model.stpes=4"], "model.stpes: model has no key 'stpes'; its keys are in_channels, image_size, scales, steps"),
    (["model.steps=0"], "model.steps=0 must be >= 1"),
    (["model.steps=eight"], "model.steps=eight: model.steps must be an integer"),
    (["performance.compile=all"], "performance.compile must be one of none, step, model"),
    (["ema_decay=1.5"], "ema_decay=1.5 must be strictly between 0 and 1"),
    (["ema_decay=0"], "ema_decay=0.0 must be strictly between 0 and 1"),
    (["seed=abc"], "seed=abc: seed must be an integer"),
    (["overwrite=maybe"], "overwrite=maybe: overwrite must be a boolean"),
    (["train=nope"], "train=nope: train must be a boolean"),
    (["lr_scaling.rule=cubic"], "lr_scaling.rule must be one of none, linear, sqrt"),
    (["lr_scaling.base_batch_size=0"], "lr_scaling.base_batch_size=0 must be >= 1"),
    (["data=folder"], "data=folder needs data.path=<a directory of images>"),
    (["data.val_size=-3"], "data.val_size=-3 must be a count >= 0 or a fraction in [0, 1)"),
    (["data.channels=2"], "data.channels=2 is not one of 1, 3"),
    (["callbacks.nan_guard.max_consecutive=0"], "callbacks.nan_guard.max_consecutive=0 must be >= 1"),
    (["ckpt_path=/nonexistent/run.ckpt"], "no such checkpoint file or run directory"),
    (["model.num_classes=7"], "model.num_classes=7 but data=digits has 10 classes"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0 must be > 0"),
    (["seed=-1"], "seed=-1 must be in 0..4294967295"),
    (["trainer.max_time=forever"], "trainer.max_time=forever must be a duration DD:HH:MM:SS"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0 trains nothing"),
    (["trainer.limit_train_batches=0"], "trainer.limit_train_batches=0 trains nothing"),
    (["~model.steps"], "~model.steps: model.steps cannot be removed"),
    (["callbacks.samples.temperatures=0.7"], "callbacks.samples.temperatures must be a list"),
    (["model.coupling=[affine]"], "model.coupling takes a single choice, not a list"),
    (["ckpt_path=last"], "ckpt_path=last needs run_name=<the run's name>"),
    (["+callbacks.es._target_=lightning.pytorch.callbacks.EarlyStoping"],
     "Error locating target 'lightning.pytorch.callbacks.EarlyStoping'"),
    (["+foo=1"], "foo is not a setting of the top level (TrainConfig); its keys are task_name, run_name"),
    (["+model.stpes=4"], "model.stpes is not a setting of model (GlowConfig); its keys are in_channels"),
])
def test_configuration_mistakes(tmp_path, capsys, overrides, message):
    assert message in run_train(tmp_path, capsys, overrides)


def test_an_empty_image_folder(tmp_path, capsys, image_folders):
    line = run_train(tmp_path, capsys, ["data=folder", f"data.path={image_folders / 'empty'}", "data.num_workers=0"])
    assert "folder: no images" in line and "empty" in line


def test_a_corrupt_image_in_a_folder_is_named(tmp_path, capsys, image_folders):
    # the other images (12x12 RGB PNGs, not 64x64) are converted, not refused; the broken one is named
    line = run_train(tmp_path, capsys, ["data=folder", f"data.path={image_folders / 'photos'}", "data.num_workers=0",
                                        "data.image_size=8", "data.batch_size=2", "data.val_size=0.2", "test=false",
                                        "trainer.max_steps=10"])
    assert "broken.png" in line


def _checkpoint_of(tmp_path, overrides=()) -> dict:
    cfg = compose_train(tmp_path, list(overrides))
    module = build_module(cfg, 17)
    return {"state_dict": module.state_dict(), "global_step": 0, "epoch": 0}


def test_a_truncated_checkpoint(tmp_path, capsys):
    path = tmp_path / "cut.ckpt"
    torch.save(_checkpoint_of(tmp_path), path)
    path.write_bytes(path.read_bytes()[:4000])
    assert "cannot be read: it is truncated" in run_train(tmp_path, capsys, [f"ckpt_path={path}"])


def test_a_checkpoint_of_another_architecture_names_the_shapes(tmp_path, capsys):
    path = tmp_path / "wide.ckpt"
    torch.save(_checkpoint_of(tmp_path, ["model.hidden_channels=32"]), path)
    line = run_train(tmp_path, capsys, [f"ckpt_path={path}"])
    assert "another architecture" in line and "(32," in line and "(64," in line


class Payload:
    """What a malicious checkpoint carries: unpickling it would run a command."""

    def __reduce__(self):
        return (print, ("this code ran while loading a checkpoint",))


def test_a_checkpoint_carrying_code_is_refused_and_never_run(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    checkpoint = _checkpoint_of(tmp_path)
    checkpoint["extra"] = Payload()
    torch.save(checkpoint, path, pickle_module=pickle)
    line = run_train(tmp_path, capsys, [f"ckpt_path={path}"])
    assert "was refused: it carries pickled Python objects" in line
    assert "this code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("word, value", [("no", False), ("off", False), ("0", False), ("false", False),
                                         ("yes", True), ("on", True), ("1", True), ("true", True)])
def test_booleans_given_as_words_are_booleans(tmp_path, word, value):
    # the data-loss case: overwrite=no was the truthy string "no" and replaced a run's checkpoints
    cfg = compose_train(tmp_path, [f"overwrite={word}", f"data.hflip={word}", f"test={word}",
                                   f"performance.channels_last={word}"])
    assert cfg.overwrite is value and cfg.data.hflip is value and cfg.test is value
    assert cfg.performance.channels_last is value

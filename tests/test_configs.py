"""Every config in every group composes, and the model/data/dequantization combinations instantiate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

import flowgen.cli  # noqa: F401  (registers resolvers)
from flowgen.build import build_module

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_train(tmp_path, overrides=(), config_name="train"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name, overrides=[f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path}/data",
                                          *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.root_dir = str(tmp_path)
        del cfg.hydra
    return cfg


GROUPS = ["model", "data", "dequantization", "optimizer", "trainer", "logger", "callbacks", "debug", "experiment"]


@pytest.mark.parametrize("group, choice", [(g, c) for g in GROUPS for c in options(g)])
def test_every_config_composes(tmp_path, group, choice):
    extra = ["data.path=/some/images"] if (group, choice) == ("data", "folder") else []
    cfg = compose_train(tmp_path, [f"{group}={choice}", *extra])
    assert cfg.model._target_ and cfg.data._target_
    assert cfg.model.in_channels == cfg.data.channels and cfg.model.image_size == cfg.data.image_size


@pytest.mark.parametrize("data", [d for d in options("data")])
@pytest.mark.parametrize("model", ["glow_small", "realnvp_small"])
@pytest.mark.parametrize("dequantization", options("dequantization"))
def test_model_data_dequantization_combinations_instantiate(tmp_path, data, model, dequantization):
    extra = ["data.path=/some/images"] if data == "folder" else []
    overrides = [f"data={data}", f"model={model}", f"dequantization={dequantization}",
                 "model.hidden_channels=8", *extra]
    if model == "realnvp_small":
        overrides.append("model.num_blocks=1")
    cfg = compose_train(tmp_path, overrides)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule.num_levels)
    c, h, w = datamodule.input_shape
    x = torch.randint(0, datamodule.num_levels, (2, c, h, w), dtype=torch.uint8)
    nll = module.nll_nats((x, torch.zeros(2, dtype=torch.long)))
    assert nll.shape == (2,) and torch.isfinite(nll).all()


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_set_paper_models(tmp_path, experiment):
    cfg = compose_train(tmp_path, [f"experiment={experiment}"])
    model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
    if experiment == "glow_cifar10":
        assert (cfg.model.levels, cfg.model.steps, cfg.model.hidden_channels) == (3, 32, 512)
        assert cfg.optimizer._target_ == "torch.optim.Adamax" and cfg.optimizer.lr == 1e-3
        assert cfg.data.name == "cifar10" and cfg.data.n_bits == 8 and cfg.data.hflip
    if experiment == "glow_celeba64":
        assert cfg.data.n_bits == 5 and cfg.model.coupling == "additive" and cfg.data.image_size == 64


def test_default_is_a_small_glow_on_digits(tmp_path):
    cfg = compose_train(tmp_path)
    assert cfg.data.name == "digits" and cfg.model._target_ == "flowgen.models.Glow"
    assert cfg.logger.wandb._target_.endswith("WandbLogger")
    assert set(cfg.callbacks) == {"model_checkpoint", "samples", "nan_guard", "invertibility_monitor", "diagnostics",
                                  "rank_sync_check", "preemption", "lr_monitor",
                                  "rich_progress_bar"}
    assert cfg.callbacks.samples.temperatures == [0.5, 0.7, 0.8, 0.9, 1.0]


@pytest.mark.parametrize("overrides, optimizer, ema", [
    ([], "torch.optim.AdamW", 0.999),  # the default pair picks configs/tuned/digits_glow_small.yaml
    (["experiment=digits"], "torch.optim.AdamW", 0.999),
    (["~tuned"], "torch.optim.Adamax", None),
    (["model=glow"], "torch.optim.Adamax", None),  # any other pair keeps the paper's optimizer
    (["data=cifar10", "model=glow_small"], "torch.optim.Adamax", None),
])
def test_tuned_settings_apply_to_their_pair_only(tmp_path, overrides, optimizer, ema):
    cfg = compose_train(tmp_path, overrides)
    assert cfg.optimizer._target_ == optimizer and cfg.get("ema_decay") == ema


def test_run_name_makes_the_run_directory_deterministic(tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["run_name=my_run", f"paths.log_dir={tmp_path}"], return_hydra_config=True)
    assert cfg.hydra.run.dir == f"{tmp_path}/train/runs/my_run"


def test_learning_rate_scaling_rules():
    from flowgen.cli.errors import UserError
    from flowgen.cli.train import scaled_learning_rate

    assert scaled_learning_rate(1e-3, 512, 64, "none") == 1e-3
    assert scaled_learning_rate(1e-3, 512, 64, "linear") == pytest.approx(8e-3)
    assert scaled_learning_rate(1e-3, 256, 64, "sqrt") == pytest.approx(2e-3)
    with pytest.raises(UserError, match="lr_scaling.rule=cubic is not one of none, linear, sqrt"):
        scaled_learning_rate(1e-3, 256, 64, "cubic")
    with pytest.raises(UserError, match="base_batch_size=0 must be >= 1"):
        scaled_learning_rate(1e-3, 256, 0, "linear")


def test_lr_scaling_is_off_by_default_and_based_on_the_per_device_batch(tmp_path):
    cfg = compose_train(tmp_path, ["data.batch_size=32"])
    assert cfg.lr_scaling.rule == "none" and cfg.lr_scaling.base_batch_size == 32

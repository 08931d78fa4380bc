"""Every config in every group composes, and the model/data/dequantization combinations instantiate."""

from __future__ import annotations

import math
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
    # the paper sizes take minutes to initialise on a CPU: the model is built as configured but narrow and shallow
    small = {"flowgen.models.Glow": ["model.hidden_channels=8", "model.steps=2"],
             "flowgen.models.RealNVP": ["model.hidden_channels=8"],
             "flowgen.models.TarFlow": ["model.width=24"]}.get(cfg.model._target_, [])
    model = instantiate(compose_train(tmp_path, [f"experiment={experiment}", *small]).model)
    assert sum(p.numel() for p in model.parameters()) > 0
    if experiment == "glow_cifar10":
        assert (cfg.model.scales, cfg.model.steps, cfg.model.hidden_channels) == (3, 32, 512)
        assert cfg.optimizer._target_ == "torch.optim.Adamax" and cfg.optimizer.lr == 1e-3
        assert cfg.data.name == "cifar10" and cfg.data.n_bits == 8 and cfg.data.hflip
    if experiment == "glow_celeba64":
        assert cfg.data.n_bits == 5 and cfg.model.coupling == "additive" and cfg.data.image_size == 64
    if experiment == "glow_celebahq256":  # openai/glow README: --n_level 6 --depth 32 --flow_coupling 0 --n_bits_x 5
        assert (cfg.model.scales, cfg.model.steps, cfg.model.hidden_channels) == (6, 32, 512)
        assert cfg.model.coupling == "additive" and cfg.data.n_bits == 5 and cfg.data.image_size == 256
        assert cfg.data.name == "folder" and cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 40
    if experiment == "realnvp_cifar10":
        assert cfg.preprocessing.logit_alpha == 0.05 and cfg.optimizer._target_ == "torch.optim.Adam"


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


def _leaves(node: dict, prefix: str = "") -> dict:
    """{"a.b.c": value} for every leaf of a nested dict (lists are leaves)."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("experiment", options("experiment"))
def test_each_experiment_composes_and_states_only_what_differs(tmp_path, experiment):
    """An experiment composes and passes every check, and each value it sets differs from what its group
    choices (model, data, optimizer, ...) and train.yaml would give without it (issue 19)."""
    import yaml
    from omegaconf import OmegaConf

    from flowgen.checks import validated

    text = yaml.safe_load((CONFIGS / "experiment" / f"{experiment}.yaml").read_text())
    extra = ["data.path=/some/images"] if {"override /data": "folder"} in text.get("defaults", []) else []
    cfg = validated(compose_train(tmp_path, [f"experiment={experiment}", *extra]))
    choices = [f"{k.removeprefix('override /')}={v}" for d in text.get("defaults", []) for k, v in d.items()]
    baseline = validated(compose_train(tmp_path, [*choices, *extra]))
    restated = []
    for key, value in _leaves({k: v for k, v in text.items() if k != "defaults"}).items():
        assert OmegaConf.select(cfg, key) == value, key
        if OmegaConf.select(baseline, key, default="<absent>") == value:
            restated.append(key)
    assert not restated, f"{experiment} restates what its configs already give: {restated}"


def test_realnvp_regularises_only_the_scale_parameters(tmp_path):
    """experiment=realnvp_cifar10: the L2 (weight decay) reaches the couplings' scale bounds alpha and the
    conditioners' output log-scales, and no other parameter (section 4.1: weight-scale parameters only)."""
    from flowgen.checks import validated

    cfg = validated(compose_train(tmp_path, ["experiment=realnvp_cifar10", "model.hidden_channels=8",
                                             "model.num_blocks=1"]))  # narrower: the same parameter names
    module = build_module(cfg, 256)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.Adam) and len(optimizer.param_groups) == 2
    names = {id(p): n for n, p in module.named_parameters()}
    decayed, kept = ([names[id(p)] for p in g["params"]] for g in optimizer.param_groups)
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(2 * 5e-5 / (3 * 32 * 32 * math.log(2)), rel=1e-3)
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert decayed and all(n.endswith((".transform.alpha", ".logs")) for n in decayed)
    assert not any(n.endswith((".transform.alpha", ".logs")) for n in kept)
    assert len(decayed) + len(kept) == sum(1 for p in module.model.parameters() if p.requires_grad)
    assert module.model.alpha == 0.05  # and it models the logit of the pixels


def test_weight_decay_params_that_match_nothing_are_one_line(tmp_path):
    from flowgen.errors import UserError

    cfg = compose_train(tmp_path, ["optimizer.weight_decay=0.1", "optimizer.weight_decay_params=[*.nothing]"])
    with pytest.raises(UserError, match=r"optimizer.weight_decay_params: '\*.nothing' matches no trained parameter"):
        build_module(cfg, 17).configure_optimizers()
    cfg = compose_train(tmp_path)  # without patterns: one group, every parameter
    module = build_module(cfg, 17)
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(module.model.parameters()))

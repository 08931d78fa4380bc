"""Config -> module: the one construction of a flow, its dequantizer and its optimisation settings, used by
training, by the tools that restore a run (``flowgen.cli.restore``) and by the benchmark."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flowgen.errors import UserError
from flowgen.performance import compile_model, set_channels_last
from flowgen.training import FlowModule


def num_levels_of(cfg: DictConfig) -> int:
    """K of a run configuration: data.num_levels when set, else 2**data.n_bits."""
    data = cfg.data
    return int(data.num_levels) if data.get("num_levels") else 2 ** int(data.n_bits)


def build_module(cfg: DictConfig, num_levels: int, compile: bool = True) -> FlowModule:
    """The flow, its dequantizer and the optimisation settings, from the config alone.
    ``compile=False`` skips ``performance.compile`` (evaluate.py and sample.py run a checkpoint eagerly)."""
    model = instantiate(cfg.model)
    performance = cfg.get("performance") or {}
    dequantizer = instantiate(cfg.dequantization, num_levels=num_levels)
    noise_std = float(OmegaConf.select(cfg, "model.noise_std", default=None) or 0.0)
    if noise_std != dequantizer.noise_std:
        raise UserError(f"model.noise_std={noise_std:g} but the {cfg.dequantization._target_.rsplit('.', 1)[-1]} "
                        f"adds noise of std {dequantizer.noise_std:g}: the model's denoising and the training noise "
                        "must agree; use dequantization=uniform, whose noise_std follows model.noise_std")
    for network in (model, dequantizer):
        set_channels_last(network, performance.get("channels_last", False))
    module = FlowModule(
        model=model,
        dequantizer=dequantizer,
        num_levels=num_levels,
        optimizer=instantiate(cfg.optimizer, _convert_="all"),  # plain lists: checkpoints load weights_only
        warmup_steps=cfg.scheduler.warmup_steps,
        schedule=cfg.scheduler.schedule,
        min_lr_ratio=cfg.scheduler.min_lr_ratio,
        ema_decay=cfg.get("ema_decay"),
        class_conditional=bool(cfg.model.get("num_classes")),
        eval_samples=OmegaConf.select(cfg, "evaluation.num_samples", default=1),
        eval_seed=OmegaConf.select(cfg, "evaluation.seed", default=0),
        run_config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),  # plain data: loads weights_only
    )
    # after the EMA copy is made: the averaged weights are only evaluated, never worth a compile
    if compile:
        compile_model(module.model, performance.get("compile", "none"))
    return module

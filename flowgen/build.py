"""Config -> module, and checkpoint -> restored run: the one construction of a flow, its dequantizer and its
optimisation settings, used by training, by every tool that loads a trained run and by the benchmark.

``build_module(cfg, num_levels)`` builds a run's module from its configuration; ``restore_run(path)``
finds the checkpoint that a run directory or file names (the one rule is
``flowgen.checkpoints.run_dir.find_checkpoint``: a file is itself; a run directory gives its best checkpoint by
val/bpd, or ``last.ckpt`` when asked for it or when the run never validated), rebuilds the module from the
configuration saved in it and loads its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from flowgen.checkpoints.legacy import upgrade_run_config, upgrade_state_dict
from flowgen.checkpoints.reading import check_state_matches, load_checkpoint
from flowgen.checkpoints.run_dir import CONFIG_FILE, find_checkpoint, run_dir_of
from flowgen.data.registry import num_levels
from flowgen.errors import UserError
from flowgen.models.preprocessed import with_preprocessing
from flowgen.performance import compile_model, set_channels_last
from flowgen.training import FlowModule


def num_levels_of(cfg: DictConfig) -> int:
    """K of a run configuration: the dataset registry's rule (``flowgen.data.registry.num_levels``)."""
    n_bits = cfg.data.get("n_bits")
    return num_levels(str(cfg.data.name), None if n_bits is None else int(n_bits))


def optimizer_factory(cfg: DictConfig):
    """The configured optimizer as a partial that takes the parameters (or parameter groups).
    ``optimizer.weight_decay_params`` is flowgen's (``FlowModule.parameter_groups``), not the optimizer's argument;
    plain lists, so that checkpoints load weights_only."""
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    return instantiate({k: v for k, v in optimizer.items() if k != "weight_decay_params"}, _convert_="all")


def build_module(cfg: DictConfig, num_levels: int, compile: bool = True) -> FlowModule:
    """The flow, its dequantizer and the optimisation settings, from the config alone.
    ``compile=False`` skips ``performance.compile`` (evaluate.py and sample.py run a checkpoint eagerly)."""
    logit_alpha = OmegaConf.select(cfg, "preprocessing.logit_alpha", default=None)  # absent in older runs: none
    model = with_preprocessing(instantiate(cfg.model), logit_alpha)
    performance = cfg.get("performance") or {}
    dequantizer = instantiate(cfg.dequantization, num_levels=num_levels)
    noise_std = float(OmegaConf.select(cfg, "model.noise_std", default=None) or 0.0)
    if noise_std != dequantizer.noise_std:
        raise UserError(f"model.noise_std={noise_std:g} but the {cfg.dequantization._target_.rsplit('.', 1)[-1]} "
                        f"adds noise of std {dequantizer.noise_std:g}: the model's denoising and the training noise "
                        "must agree; use dequantization=uniform, whose noise_std follows model.noise_std")
    if logit_alpha is not None and dequantizer.noise_std > 0:
        raise UserError(f"preprocessing.logit_alpha={logit_alpha:g} needs pixels inside [0, 1), but model.noise_std="
                        f"{dequantizer.noise_std:g} adds Gaussian noise that leaves it; set one of them to null / 0")
    for network in (model, dequantizer):
        set_channels_last(network, performance.get("channels_last", False))
    module = FlowModule(
        model=model,
        dequantizer=dequantizer,
        num_levels=num_levels,
        optimizer=optimizer_factory(cfg),
        weight_decay_params=OmegaConf.to_container(cfg.optimizer, resolve=True).get("weight_decay_params"),
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


@dataclass
class RestoredRun:
    """A trained module, the configuration it was trained with, and where it came from."""

    module: FlowModule
    cfg: DictConfig
    ckpt: Path
    run_dir: Path
    use_ema: bool
    which: str = "the file given"  # which of the run's checkpoints this is, and why (find_checkpoint's note)

    @property
    def model(self) -> nn.Module:
        """The weights to use: the EMA copy when the run kept one and ``use_ema`` is set."""
        return self.module.eval_model if self.use_ema else self.module.model

    def describe(self, device) -> str:
        """The line every tool prints first: which file, why that one, which weights, where."""
        return f"checkpoint: {self.ckpt} ({self.which}; {self.weights} weights, {device})"

    @property
    def uses_ema(self) -> bool:
        return self.use_ema and self.module.ema is not None

    @property
    def weights(self) -> str:
        """Which weights ``model`` is: "ema" or "raw" (for messages, file names and cache keys)."""
        return "ema" if self.uses_ema else "raw"

    def cache_key(self) -> dict:
        """What a result computed from these weights depends on: the checkpoint file as it is on disk
        (its path, size and modification time) and which of its weights; a cache under another key is stale."""
        stat = self.ckpt.stat()
        return {"checkpoint": str(self.ckpt.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "weights": self.weights}


def run_config(checkpoint: dict, ckpt: Path) -> DictConfig:
    """The configuration the checkpoint was trained with: the copy inside it, else the run's config.yaml.
    A checkpoint without either, or a configuration that is not a flowgen run's, is one clear error."""
    hparams = checkpoint.get("hyper_parameters")
    saved = hparams.get("run_config") if isinstance(hparams, dict) else None
    if saved:
        source = "the run configuration saved in it"
        try:
            cfg = OmegaConf.create(saved) if isinstance(saved, dict) else None
        except Exception:  # noqa: BLE001 - values OmegaConf cannot hold: not a configuration flowgen saved
            cfg = None
    else:
        candidates = list(dict.fromkeys((run_dir_of(ckpt) / CONFIG_FILE, ckpt.parent / CONFIG_FILE)))
        found = [c for c in candidates if c.exists()]
        if not found:
            where = " or ".join(str(c.parent) for c in candidates)
            raise UserError(f"checkpoint {ckpt} is a Lightning checkpoint without its run configuration: it carries "
                            f"none (no hyper_parameters.run_config) and no {CONFIG_FILE} was found in {where}; keep "
                            f"the checkpoint inside its run directory, or put the run's {CONFIG_FILE} next to it")
        source = str(found[0])
        try:
            cfg = OmegaConf.load(found[0])
        except OSError as exc:
            raise UserError(f"checkpoint {ckpt}: its run configuration {source} cannot be read "
                            f"({exc.strerror or exc}); make it a readable file or restore the run's own copy") from None
        except Exception as exc:  # noqa: BLE001 - YAML syntax errors and OmegaConf's own, many kinds
            raise UserError(f"checkpoint {ckpt}: its run configuration {source} is not valid YAML "
                            f"({type(exc).__name__}); restore the run's own {CONFIG_FILE}") from None
    missing = [key for key in ("model", "data") if not isinstance(cfg, DictConfig)
               or not isinstance(cfg.get(key), DictConfig)]
    if missing:
        raise UserError(f"checkpoint {ckpt}: {source} is not a flowgen run configuration (no "
                        f"{' or '.join(missing)} section); keep the checkpoint with the {CONFIG_FILE} train.py "
                        "wrote for it")
    # a run of an earlier flowgen names some settings as it did then (flowgen.checkpoints.legacy)
    return OmegaConf.create(upgrade_run_config(OmegaConf.to_container(cfg)))


def restore_run(ckpt_path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu",
                which: str = "best") -> RestoredRun:
    """Rebuild the module from its saved config and load the checkpoint's weights, in eval mode on ``device``.
    A run directory gives its best checkpoint by val/bpd (``which="best"``, the one train.py tested) or
    its ``last.ckpt`` (``which="last"``); see ``flowgen.checkpoints.run_dir.find_checkpoint``."""

    ckpt, note = find_checkpoint(ckpt_path, which)
    checkpoint = load_checkpoint(ckpt)
    cfg = run_config(checkpoint, ckpt)
    hparams = checkpoint.get("hyper_parameters") or {}
    num_levels = hparams.get("num_levels") or num_levels_of(cfg)
    try:
        module = build_module(cfg, num_levels, compile=False)
    except Exception as exc:  # noqa: BLE001 - any failure here means config and code disagree
        raise UserError(f"cannot rebuild the model of {ckpt} from its saved config: {exc}") from None
    state = upgrade_state_dict(checkpoint["state_dict"], module.state_dict())
    check_state_matches(state, module, ckpt)
    module.load_state_dict(state, strict=True)
    module.to(device).eval()
    return RestoredRun(module=module, cfg=cfg, ckpt=ckpt, run_dir=run_dir_of(ckpt), use_ema=use_ema, which=note)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device}: no CUDA GPU is visible here; use device=cpu")
    return resolved


def instantiate_data(data_cfg: DictConfig):
    """The data module of ``data_cfg``, downloaded if it may and is missing, and set up."""
    datamodule = instantiate(data_cfg)
    datamodule.prepare_data()
    datamodule.setup("test")
    return datamodule

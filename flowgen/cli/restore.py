"""Rebuilding a trained flow from a run directory or a checkpoint, for sample.py and evaluate.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from flowgen.build import build_module, num_levels_of
from flowgen.cli.checkpoints import check_state_matches, load_checkpoint
from flowgen.cli.errors import UserError
from flowgen.cli.run_files import CONFIG_FILE, find_checkpoint, run_dir_of
from flowgen.training import FlowModule


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
    return cfg


def restore_run(ckpt_path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu",
                which: str = "best") -> RestoredRun:
    """Rebuild the module from its saved config and load the checkpoint's weights, in eval mode on ``device``.
    A run directory gives its best checkpoint by val/bpd (``which="best"``, the one train.py tested) or
    its ``last.ckpt`` (``which="last"``); see ``flowgen.cli.run_files.find_checkpoint``."""

    ckpt, note = find_checkpoint(ckpt_path, which)
    checkpoint = load_checkpoint(ckpt)
    cfg = run_config(checkpoint, ckpt)
    hparams = checkpoint.get("hyper_parameters") or {}
    num_levels = hparams.get("num_levels") or num_levels_of(cfg)
    try:
        module = build_module(cfg, num_levels, compile=False)
    except Exception as exc:  # noqa: BLE001 - any failure here means config and code disagree
        raise UserError(f"cannot rebuild the model of {ckpt} from its saved config: {exc}") from None
    check_state_matches(checkpoint["state_dict"], module, ckpt)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
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

"""Rebuilding a trained flow from a run directory or a checkpoint, for sample.py and evaluate.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from flowgen.cli.checkpoints import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    check_state_matches,
    find_in_run_dir,
    load_checkpoint,
)
from flowgen.cli.errors import UserError
from flowgen.training import FlowModule


@dataclass
class RestoredRun:
    """A trained module, the configuration it was trained with, and where it came from."""

    module: FlowModule
    cfg: DictConfig
    ckpt: Path
    run_dir: Path
    use_ema: bool

    @property
    def model(self) -> nn.Module:
        """The weights to use: the EMA copy when the run kept one and ``use_ema`` is set."""
        return self.module.eval_model if self.use_ema else self.module.model

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


def find_checkpoint(ckpt_path: str | Path) -> Path:
    """A .ckpt file as given, or a run directory's last checkpoint (else its newest one)."""
    if ckpt_path is None or str(ckpt_path) in ("", "???"):
        raise UserError("ckpt_path is required: a run directory or a .ckpt file, e.g. ckpt_path=logs/train/runs/<run>")
    path = Path(str(ckpt_path)).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"ckpt_path={ckpt_path}: no such checkpoint file or run directory")
    last = find_in_run_dir(path)
    if last is not None:
        return last
    found = sorted(path.glob(f"{CHECKPOINT_DIR}/*.ckpt"), key=lambda p: p.stat().st_mtime) or sorted(
        path.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"ckpt_path={ckpt_path}: the run directory holds no checkpoint ({CHECKPOINT_DIR}/*.ckpt); "
                        "train it first or pass a .ckpt file")
    return found[-1]


def run_dir_of(ckpt: Path) -> Path:
    """<run>/checkpoints/x.ckpt -> <run>; a checkpoint elsewhere -> its own directory."""
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINT_DIR else ckpt.parent


def run_config(checkpoint: dict, ckpt: Path) -> DictConfig:
    """The configuration the checkpoint was trained with: the copy inside it, else the run's config.yaml."""
    saved = (checkpoint.get("hyper_parameters") or {}).get("run_config")
    if saved:
        return OmegaConf.create(saved)
    for candidate in (run_dir_of(ckpt) / CONFIG_FILE, ckpt.parent / CONFIG_FILE):
        if candidate.is_file():
            return OmegaConf.load(candidate)
    raise UserError(f"checkpoint {ckpt} carries no run configuration and no {CONFIG_FILE} was found in "
                    f"{run_dir_of(ckpt)}; keep the checkpoint inside its run directory")


def restore_run(ckpt_path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu") -> RestoredRun:
    """Rebuild the module from its saved config and load the checkpoint's weights, in eval mode on ``device``."""
    from flowgen.cli.train import build_module  # the same construction as training

    ckpt = find_checkpoint(ckpt_path)
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
    return RestoredRun(module=module, cfg=cfg, ckpt=ckpt, run_dir=run_dir_of(ckpt), use_ema=use_ema)


def num_levels_of(cfg: DictConfig) -> int:
    """K of a run configuration: data.num_levels when set, else 2**data.n_bits."""
    data = cfg.data
    return int(data.num_levels) if data.get("num_levels") else 2 ** int(data.n_bits)


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

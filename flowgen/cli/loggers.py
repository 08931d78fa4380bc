"""Logger construction: wandb offline without credentials, and one wandb run per run directory."""

from __future__ import annotations

import netrc
import os
import secrets
import string
import sys
from pathlib import Path
from urllib.parse import urlparse

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

WANDB_ID_FILE = "wandb_id.txt"


def wandb_has_credentials() -> bool:
    """True when wandb could log in without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_run_id(run_dir: Path) -> str:
    """The wandb id of this run directory, created once and reused by every resume."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def build_loggers(logger_cfg: DictConfig | None, run_dir: Path) -> list:
    loggers = []
    for cfg in (logger_cfg or {}).values():
        if cfg is None or "_target_" not in cfg:
            continue
        kwargs = {}
        if cfg._target_.endswith("WandbLogger"):
            if cfg.get("quiet"):  # wandb's own start and summary lines: flowgen says where the run is
                kwargs["settings"] = {"quiet": True}
            cfg = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "quiet"})
            kwargs["id"] = cfg.get("id") or wandb_run_id(run_dir)
            kwargs["resume"] = "allow"
            if not cfg.get("offline") and os.environ.get("WANDB_MODE") is None and not wandb_has_credentials():
                print("wandb: no credentials found (WANDB_API_KEY or `wandb login`), logging offline to "
                      f"{run_dir}/wandb; upload later with `wandb sync`", flush=True)
                kwargs["offline"] = True
        logger = instantiate(cfg, **kwargs)
        if cfg._target_.endswith("WandbLogger"):
            _leave_out_unset_anonymous(logger)
        loggers.append(logger)
    return loggers


def _leave_out_unset_anonymous(logger) -> None:
    """Lightning's WandbLogger passes ``anonymous=None`` to ``wandb.init`` even when nobody set it,
    and wandb warns for any value given ("The anonymous setting has no effect and will be removed
    in a future version", wandb.termwarn in wandb/sdk/wandb_settings.py). Leave the unset value
    out; an explicit ``anonymous`` still reaches wandb (and its warning)."""
    init_kwargs = getattr(logger, "_wandb_init", None)
    if isinstance(init_kwargs, dict) and "anonymous" in init_kwargs and init_kwargs["anonymous"] is None:
        del init_kwargs["anonymous"]


def finish_wandb_run(exit_code: int = 0) -> None:
    """Finish this process's wandb run, if it has one, before the process exits.

    Left to the exit, the run is finished by the ``wandb-core`` service, which writes its closing
    lines ("You can sync this run ...") with ANSI colour codes whether or not stderr is a
    terminal; finished from Python, the same lines go through wandb's terminal check and a log
    file gets plain text. It also ends the run between the jobs of a Hydra multirun, so the next
    job's WandbLogger starts its own run instead of reusing this one."""
    wandb = sys.modules.get("wandb")  # never import wandb just to find that no run exists
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is not None:
        run.finish(exit_code=exit_code)

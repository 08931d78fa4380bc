"""Logger construction: wandb offline without credentials, and one wandb run per run directory."""

from __future__ import annotations

import netrc
import os
import secrets
import string
from pathlib import Path
from urllib.parse import urlparse

from hydra.utils import instantiate
from omegaconf import DictConfig

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
            kwargs["id"] = cfg.get("id") or wandb_run_id(run_dir)
            kwargs["resume"] = "allow"
            if not cfg.get("offline") and os.environ.get("WANDB_MODE") is None and not wandb_has_credentials():
                print("wandb: no credentials found (WANDB_API_KEY or `wandb login`), logging offline to "
                      f"{run_dir}/wandb; upload later with `wandb sync`", flush=True)
                kwargs["offline"] = True
        loggers.append(instantiate(cfg, **kwargs))
    return loggers

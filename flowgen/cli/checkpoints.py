"""Finding the checkpoint to resume from, and protecting the checkpoints of existing runs."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from flowgen.cli.errors import UserError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
CONFIG_FILE = "config.yaml"  # the run's resolved config, next to its checkpoints


def find_in_run_dir(run_dir: Path) -> Path | None:
    """<run_dir>/checkpoints/last.ckpt (or <run_dir>/last.ckpt), if present."""
    for candidate in (run_dir / CHECKPOINT_DIR / LAST, run_dir / LAST):
        if candidate.is_file():
            return candidate
    return None


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from.

    ``None``: start fresh.  ``last``: this run directory's last.ckpt, or a fresh start with a
    notice when there is none yet (so it can be set permanently, e.g. for requeued jobs).
    A ``.ckpt`` file: that file.  A directory: that run's last.ckpt.
    """
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    if str(ckpt_path) == "last":
        found = find_in_run_dir(run_dir)
        if found is None:
            print(f"ckpt_path=last: no checkpoint in {run_dir / CHECKPOINT_DIR} yet, starting a fresh run", flush=True)
        return found
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        found = find_in_run_dir(path)
        if found is None:
            raise UserError(f"ckpt_path={ckpt_path}: the directory holds no {CHECKPOINT_DIR}/{LAST}; "
                            "pass a .ckpt file or a run directory that has one")
        return found
    if not path.is_file():
        raise UserError(f"ckpt_path={ckpt_path}: no such checkpoint file or run directory")
    return path


def refuse_to_overwrite(run_dir: Path) -> None:
    """A new run never writes into a run directory that already holds checkpoints."""
    existing = sorted((run_dir / CHECKPOINT_DIR).glob("*.ckpt")) if (run_dir / CHECKPOINT_DIR).is_dir() else []
    if existing:
        raise UserError(
            f"run directory {run_dir} already holds checkpoints ({existing[0].name}, ...): resume it with "
            "ckpt_path=last, choose another run_name, or pass overwrite=true to start over there"
        )


def load_checkpoint(ckpt: Path, mmap: bool = False) -> dict:
    """The checkpoint's dictionary, unpickled safely (tensors and plain data only), or one clear error.

    ``mmap=True`` maps the tensors instead of reading them: a cheap check of a checkpoint before
    Lightning loads it for real (a truncated file fails here, in its zip directory).
    """
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise UserError(f"checkpoint {ckpt} was refused: it carries pickled Python objects that could run code "
                            "when loaded, and flowgen only loads tensors and plain data; use a checkpoint that "
                            "flowgen wrote") from None
        raise UserError(f"checkpoint {ckpt} cannot be read: not a checkpoint file ({_one_line(exc)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f"checkpoint {ckpt} cannot be read (truncated or not a checkpoint): {_one_line(exc)}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"checkpoint {ckpt} has no model weights (state_dict); it is not a Lightning checkpoint")
    return checkpoint


def check_state_matches(state: dict, module: nn.Module, ckpt: Path) -> None:
    """The checkpoint's tensors have the names and shapes of the module's, or an error naming the differences."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} in the checkpoint vs {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return
    def first(items: list[str], sep: str = ", ") -> str:
        return sep.join(items[:3]) + (f"{sep}..." if len(items) > 3 else "")

    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shapes differ ({first(shapes, '; ')})")
    if missing:
        parts.append(f"{len(missing)} tensors missing ({first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({first(unexpected)})")
    raise UserError(f"checkpoint {ckpt} was written by another architecture than this config builds: "
                    f"{'; '.join(parts)}; use the run's own model settings (its config.yaml) or start a new run")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]

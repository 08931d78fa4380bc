"""Finding the checkpoint to resume from, and protecting the checkpoints of existing runs."""

from __future__ import annotations

from pathlib import Path

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

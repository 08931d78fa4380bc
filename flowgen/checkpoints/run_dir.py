"""Where a run keeps its files, and the one rule for finding its checkpoints.

A run directory holds ``config.yaml`` (the resolved configuration), ``checkpoints/last.ckpt``
(the latest state, written at every validation, at the last step and when the run is stopped)
and the best checkpoint by ``val/bpd`` (its path is recorded in ``last.ckpt``'s ModelCheckpoint
state; it is the one train.py tests).

``find_checkpoint(path, which)``:
- a ``.ckpt`` file: that file;
- a run directory, ``which="last"``: its ``checkpoints/last.ckpt``;
- a run directory, ``which="best"``: the best checkpoint recorded in ``last.ckpt``, or
  ``last.ckpt`` itself when the run never validated (said in the returned note).
"""

from __future__ import annotations

from pathlib import Path

from flowgen.checkpoints.reading import load_checkpoint
from flowgen.errors import UserError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
CONFIG_FILE = "config.yaml"  # the run's resolved config, next to its checkpoints
WHICH = ("best", "last")  # which checkpoint of a run directory a tool reads (``find_checkpoint``)


def run_dir_of(ckpt: Path) -> Path:
    """<run>/checkpoints/x.ckpt -> <run>; a checkpoint elsewhere -> its own directory."""
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINT_DIR else ckpt.parent


def last_checkpoint(run_dir: Path) -> Path | None:
    """<run_dir>/checkpoints/last.ckpt (or <run_dir>/last.ckpt), if present."""
    for candidate in (run_dir / CHECKPOINT_DIR / LAST, run_dir / LAST):
        if candidate.is_file():
            return candidate
    return None


def best_checkpoint(last: Path) -> Path | None:
    """The best checkpoint by ``val/bpd`` that ``last`` records, if it still exists.

    The path was written as the run saw it; the file of that name in ``last``'s own directory
    comes first, so a run directory that was moved or copied finds its own best checkpoint."""
    states = load_checkpoint(last, mmap=True).get("callbacks") or {}
    for key, state in states.items():
        if not str(key).startswith("ModelCheckpoint") or not isinstance(state, dict):
            continue
        recorded = state.get("best_model_path") or ""
        if not recorded or state.get("best_model_score") is None:
            continue
        # this run directory's own file: a copied run directory must never score the original's
        candidate = last.parent / Path(recorded).name
        if candidate.is_file():
            return candidate
    return None


def find_checkpoint(ckpt_path, which: str = "best") -> tuple[Path, str]:
    """The checkpoint that ``ckpt_path`` (a run directory or a ``.ckpt`` file) names, and a note
    saying which one it is and why (for the user: every tool prints the file it used)."""
    if ckpt_path is None or str(ckpt_path) in ("", "???"):
        raise UserError("ckpt_path is required: a run directory or a .ckpt file, e.g. ckpt_path=logs/train/runs/<run>")
    if which not in WHICH:
        raise UserError(f"which={which!r} must be one of {', '.join(WHICH)}")
    path = Path(str(ckpt_path)).expanduser()
    if path.is_file():
        return path, "the file given"
    if path.is_dir() and path.name == CHECKPOINT_DIR and (path.parent / CONFIG_FILE).is_file():
        path = path.parent  # <run>/checkpoints given for <run>
    if not path.is_dir():
        raise UserError(f"ckpt_path={ckpt_path}: no such checkpoint file or run directory")
    last = last_checkpoint(path)
    if last is None:
        found = sorted(p.name for p in path.glob(f"{CHECKPOINT_DIR}/*.ckpt"))
        hint = f"it has {', '.join(found)}: pass one of them as a file" if found else "train it first"
        raise UserError(f"ckpt_path={ckpt_path}: the run directory holds no {CHECKPOINT_DIR}/{LAST}; {hint}")
    if which == "last":
        return last, "last (which=last)"
    best = best_checkpoint(last)
    if best is None:
        return last, "last: the run recorded no best checkpoint by val/bpd (it never validated)"
    return best, "best by val/bpd (which=last for the latest)"


def refuse_to_overwrite(run_dir: Path) -> None:
    """A new run never writes into a run directory that already holds checkpoints."""
    existing = sorted((run_dir / CHECKPOINT_DIR).glob("*.ckpt")) if (run_dir / CHECKPOINT_DIR).is_dir() else []
    if existing:
        raise UserError(
            f"run directory {run_dir} already holds checkpoints ({existing[0].name}, ...): resume it with "
            "ckpt_path=last, choose another run_name, or pass overwrite=true to start over there"
        )

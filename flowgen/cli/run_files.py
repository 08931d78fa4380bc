"""Hydra's run directories: removing one that a task left unused (a mistake stopped it before it wrote anything)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

HYDRA_FILES = (".hydra",)  # what Hydra writes into a run directory before flowgen's code runs


def remove_unused_run_dir(run_dir: Path) -> None:
    """Remove ``run_dir`` if nothing but Hydra's own start-up files (``.hydra/``, empty ``*.log``) is in it
    (never the working directory or one above it)."""
    if _is_cwd_or_above(run_dir):
        return
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return
    leftovers = [e for e in entries if not (e.name in HYDRA_FILES or (e.suffix == ".log" and _empty_file(e)))]
    if leftovers:
        return
    for entry in entries:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()
        run_dir.parent.rmdir()  # runs/ and <task>/ when Hydra made them for this run: only ever empty ones
        run_dir.parent.parent.rmdir()


def _empty_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size == 0
    except OSError:
        return False


def is_hydra_run_dir(path: Path) -> bool:
    """Whether ``path`` is laid out as a Hydra run or sweep-job directory of flowgen's
    (``<log dir>/<task>/runs/<name>``, ``<log dir>/<task>/multiruns/<time>/<job>``) and is not the
    working directory or above it: the only directories an error may tidy away."""
    path = path.resolve()
    if _is_cwd_or_above(path):
        return False
    return path.parent.name == "runs" or (len(path.parents) > 1 and path.parent.parent.name == "multiruns")


def _is_cwd_or_above(path: Path) -> bool:
    path, cwd = Path(path).resolve(), Path.cwd().resolve()
    return path == cwd or path in cwd.parents

"""Checkpoint files that are always whole: write aside, flush to disk, then rename over the old one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from flowgen.errors import UserError

PARTIAL = ".partial-"


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (full disk, unwritable directory); the previous ones are kept."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.partial-<pid>`` in the target directory, ``fsync``, then ``os.replace``.

    A rename within one directory is atomic on POSIX file systems, so a process killed at any
    moment (``kill -9``, preemption, power loss after the fsync) leaves either the previous file
    or the new one under the checkpoint's name, never a truncated one. Lightning's own local
    save writes through an fsspec transaction whose temporary file lives in the system temp
    directory; its final move across file systems is a copy, which a kill can cut short.
    A write that fails (disk full, read-only or missing directory) removes its partial file and
    raises ``CheckpointWriteError`` naming the file and the cause; earlier checkpoints are untouched.
    Remote paths (``s3://`` ...) go through Lightning's default.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        partial = path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
            _fsync_directory(path.parent)
        except OSError as exc:
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: {exc.strerror or exc}; the previous checkpoints are kept; free disk "
                "space or set paths.log_dir to a writable disk, then resume with ckpt_path=last") from None
        finally:
            with contextlib.suppress(OSError):  # whatever failed, no partial file stays behind
                partial.unlink(missing_ok=True)


def remove_partial_files(directory: Path) -> list[Path]:
    """Delete the partial files that killed writers left behind (never a finished checkpoint)."""
    removed = []
    if directory.is_dir():
        for leftover in directory.glob(f".*.ckpt{PARTIAL}*"):
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (the directory entry), where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

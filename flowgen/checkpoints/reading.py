"""Reading a checkpoint safely (or saying exactly why it cannot be read) and checking it fits the model.
Where a run keeps its checkpoints: flowgen/checkpoints/run_dir.py."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from flowgen.checkpoints import diagnosis
from flowgen.errors import UserError


def load_checkpoint(ckpt: Path, mmap: bool = False) -> dict:
    """The checkpoint's dictionary, unpickled safely (tensors and plain data only), or one clear error
    naming what the file actually is (told by ``flowgen.checkpoints.diagnosis`` once loading has failed).

    ``mmap=True`` maps the tensors instead of reading them: a cheap check of a checkpoint before
    Lightning loads it for real (a truncated file fails here, in its zip directory).
    """
    def load(mmap: bool):
        with warnings.catch_warnings():  # torch's note on an unusual pickle protocol; the error below says more
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(ckpt, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            checkpoint = load(mmap)
        except RuntimeError:
            if not mmap or diagnosis.is_zip(ckpt):
                raise
            checkpoint = load(False)  # torch maps only its zip format; a file in the older format is read
    except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds on a bad file; the bytes tell which
        raise UserError(diagnosis.why_unreadable(ckpt, exc)) from None
    problem = diagnosis.why_not_a_checkpoint(checkpoint)
    if problem is not None:
        raise UserError(f"checkpoint {ckpt} {problem}")
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

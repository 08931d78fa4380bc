"""Checks that every DDP rank holds bit-identical weights (a desync is silent and ruins a run).

DDP keeps ranks identical only if they start identical and apply identical updates.  The classic
way to break it in a flow is data-dependent initialisation (ActNorm) from each rank's own first
batch; others are a rank-local RNG in a layer, or a callback that edits weights on one rank.
``RankSyncCheck`` compares a checksum of every parameter and buffer across ranks after the first
optimizer step, every ``every_n_steps`` and at the end of training, and stops with the names of
the tensors that differ.  On one process it does nothing.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from flowgen.errors import InvalidValueError, UserError

# 2**61 - 1, a Mersenne prime: position weights below it keep int64 products from repeating early
_PRIME = 2_305_843_009_213_693_951


class RanksOutOfSyncError(UserError):
    """The ranks of a DDP run hold different weights."""


def tensor_checksums(module: nn.Module) -> tuple[list[str], torch.Tensor]:
    """Names and an int64 checksum per parameter and buffer, exact to the bit.

    The checksum is Σ_j bits_j · (j mod p + 1) over the tensor's raw bytes read as integers
    (wrapping int64 arithmetic), so any flipped bit or swapped pair of entries changes it.
    """
    names, sums = [], []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        t = tensor.detach().contiguous().view(-1)
        bits = t.view(torch.uint8) if t.element_size() == 1 else t.view(_int_view(t.element_size()))
        bits = bits.to(torch.int64)
        weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64) % _PRIME
        names.append(name)
        sums.append((bits * weights).sum())
    if not sums:
        return names, torch.zeros(0, dtype=torch.int64)
    return names, torch.stack(sums)


def _int_view(size: int) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[size]


def differing_tensors(module: nn.Module) -> list[str]:
    """Names of the parameters/buffers whose checksum differs between ranks (empty: in sync)."""
    names, local = tensor_checksums(module)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return []
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered)  # (ranks, tensors)
    return [names[i] for i in (table != table[0]).any(dim=0).nonzero().flatten().tolist()]


class RankSyncCheck(L.Callback):
    """After the first optimizer step, every ``every_n_steps`` steps and when training ends:
    all ranks must hold identical parameters and buffers (model, EMA, dequantizer).

    Cost: one checksum pass over the weights and one all-gather of one int64 per tensor, so
    leave it on; ``every_n_steps: 0`` checks only after the first step and at the end.
    """

    def __init__(self, every_n_steps: int = 1000):
        super().__init__()
        if every_n_steps < 0:
            raise InvalidValueError(f"rank_sync_check.every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.checks = 0
        self._last_checked_step = -1

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> None:
        if trainer.world_size < 2:
            return
        differing = differing_tensors(pl_module)
        self.checks += 1
        if differing:
            raise RanksOutOfSyncError(
                f"the {trainer.world_size} ranks hold different weights {when} (step {trainer.global_step}): "
                f"{', '.join(differing[:5])}{' ...' if len(differing) > 5 else ''}; a layer initialised or "
                "updated from rank-local data or randomness breaks data parallelism")
        if when != "during training" and trainer.is_global_zero:
            print(f"ranks in sync {when}: {len(pl_module.state_dict())} tensors identical on "
                  f"{trainer.world_size} ranks at step {trainer.global_step}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_checked_step:  # gradient accumulation: several batches per step
            return
        if step == 1:
            self._check(trainer, pl_module, "after the first step")
        elif self.every_n_steps and step % self.every_n_steps == 0:
            self._check(trainer, pl_module, "during training")
        else:
            return
        self._last_checked_step = step

    def on_train_end(self, trainer, pl_module):
        self._check(trainer, pl_module, "at the end of training")

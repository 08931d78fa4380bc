"""Exponential moving average of the flow's weights (torch's AveragedModel does the averaging)."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMA(nn.Module):
    """θ_ema <- d · θ_ema + (1 - d) · θ after every optimizer step; buffers are copied as they are.

    Buffers (ActNorm's ``initialized`` flag, LU permutations) are not averaged: a flag or a
    permutation has no meaningful average, and the copy keeps the EMA model invertible.
    The averaged copy never receives gradients.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)

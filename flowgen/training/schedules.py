"""Learning-rate schedules: linear warmup, then constant or cosine decay."""

from __future__ import annotations

import math

from flowgen.errors import InvalidValueError

SCHEDULES = ("constant", "cosine")


def warmup_then(schedule: str, warmup_steps: int, total_steps: int | None = None, min_ratio: float = 0.0):
    """Multiplier of the base learning rate at optimizer step t (for ``torch.optim.lr_scheduler.LambdaLR``).

        warmup   t < W:   (t + 1) / W                 (Glow warms up linearly; flows diverge without it)
        constant t >= W:  1
        cosine   t >= W:  m + (1 - m) · ½ (1 + cos(π · (t - W) / (T - W)))
    """
    if schedule not in SCHEDULES:
        raise InvalidValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise InvalidValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if schedule == "cosine" and (total_steps is None or total_steps <= warmup_steps):
        raise InvalidValueError(
            f"a cosine schedule needs total steps > warmup_steps, got {total_steps} and {warmup_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor

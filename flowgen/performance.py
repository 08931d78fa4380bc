"""Speed settings that never change the math: NHWC conditioners and ``torch.compile``.

    performance.channels_last   the conditioner networks (where nearly all FLOPs are) keep their
                                wide activations in NHWC layout; the flow path itself (C = 12..48
                                channels, elementwise maps and 1x1 convolutions) stays NCHW
    performance.compile         none | step | model:  ``step`` compiles every flow layer on its own
                                (identical steps share one compiled graph, quick to compile),
                                ``model`` compiles the whole x -> (latents, log-det, log-prior)
                                pass as one graph (longest compile, most fusion)

Both apply to the module in place: parameter names, checkpoints and the EMA copy are unchanged.
Compilation is checked against the eager ``log_prob`` in tests/test_performance.py.
"""

from __future__ import annotations

import torch
from torch import nn

from flowgen.errors import UserError

COMPILE_MODES = ("none", "step", "model")


def set_channels_last(model: nn.Module, enabled: bool) -> int:
    """Switch every conditioner that supports it (a ``channels_last`` attribute) to NHWC; returns how many."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "channels_last") and isinstance(module.channels_last, bool):
            module.channels_last = bool(enabled)
            switched += 1
    return switched


def compile_model(model: nn.Module, mode: str, **compile_kwargs) -> nn.Module:
    """Compile ``model`` in place (``torch.compile``) per flow step or as a whole; returns it."""
    if mode not in COMPILE_MODES:
        raise UserError(f"performance.compile={mode} is not one of {', '.join(COMPILE_MODES)}")
    if mode == "step":
        for level in getattr(model, "levels", []):
            for layer in level:
                layer.compile(**compile_kwargs)
        for split in getattr(model, "splits", []):
            split.compile(**compile_kwargs)
    elif mode == "model":
        # log_prob and forward both go through encode: compiling it covers training and scoring.
        # An instance attribute, not a wrapper module, so state_dict keys stay those of the eager model.
        model.encode = torch.compile(model.encode, **compile_kwargs)
    return model


def apply_performance(model: nn.Module, channels_last: bool = False, compile: str = "none") -> nn.Module:
    """The two settings of ``configs/train.yaml``'s ``performance`` block, applied to ``model``."""
    set_channels_last(model, channels_last)
    return compile_model(model, compile)

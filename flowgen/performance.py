"""Speed settings that never change the math: NHWC conditioners, ``torch.compile``, CPU heap reuse.

    performance.channels_last   the conditioner networks (where nearly all FLOPs are) keep their
                                wide activations in NHWC layout; the flow path itself (C = 12..48
                                channels, elementwise maps and 1x1 convolutions) stays NCHW
    performance.compile         none | step | model:  ``step`` compiles every unit the model names
                                (``compile_units``: flow steps, transformer blocks) on its own
                                (identical steps share one compiled graph, quick to compile),
                                ``model`` compiles the whole ``log_prob`` pass as one graph
                                (longest compile, most fusion)
    performance.keep_freed_cpu_memory
                                glibc keeps freed CPU memory for the next step instead of mapping
                                every large tensor afresh (``keep_freed_cpu_memory``); process-wide

channels_last and compile apply to the module in place: parameter names, checkpoints and the EMA
copy are unchanged.  keep_freed_cpu_memory is a setting of the process's C library, not of a module.
Compilation is checked against the eager ``log_prob`` in tests/test_performance.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch
from torch import nn

from flowgen.errors import UserError

COMPILE_MODES = ("none", "step", "model")

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
# glibc's ceiling for its self-raising mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20


def glibc():
    """The C library if it is glibc with ``mallopt`` (Linux), else None."""
    path = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or path is None:
        return None
    libc = ctypes.CDLL(path)
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_cpu_memory(enabled: bool) -> bool:
    """Serve CPU tensors from glibc's heap and keep freed memory there for the next step (``True``),
    or go back to glibc's usual limits (``False``).  Returns whether glibc took the setting.

    glibc hands every allocation above its mmap threshold its own fresh pages and returns them
    to the kernel when it is freed.  The threshold raises itself to the largest block freed so
    far, but never above 32 MiB, and a paper-width Glow's conditioner activations are larger
    (64 x 512 x 16 x 16 floats = 32.5 MiB at batch 64): each one then costs a page fault per
    4 KiB and the kernel's zeroing of the pages, in every forward and every backward.  With
    mmap off and trimming off, a step reuses the memory the previous step freed.  The resident
    set then stays at its high-water mark instead of shrinking between steps.

    ``False`` sets what glibc's self-raising limits settle at once a 32 MiB block has been freed
    (threshold 32 MiB, trim above 64 MiB), so that both settings can be timed in one process.
    """
    libc = glibc()
    if libc is None:
        return False
    if enabled:
        settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
    else:
        settings = ((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX),
                    (M_TRIM_THRESHOLD, 2 * GLIBC_MMAP_THRESHOLD_MAX))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


def set_channels_last(model: nn.Module, enabled: bool) -> int:
    """Switch every conditioner that supports it (a ``channels_last`` attribute) to NHWC; returns how many."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "channels_last") and isinstance(module.channels_last, bool):
            module.channels_last = bool(enabled)
            switched += 1
    return switched


def compile_model(model: nn.Module, mode: str, **compile_kwargs) -> nn.Module:
    """Compile ``model`` in place (``torch.compile``) per unit or as a whole; returns it.

    ``step`` compiles each of the model's ``compile_units()`` (flow steps and splits, transformer
    blocks); ``model`` compiles ``log_prob``, the pass that training and scoring run.
    """
    if mode not in COMPILE_MODES:
        raise UserError(f"performance.compile={mode} is not one of {', '.join(COMPILE_MODES)}")
    if mode == "step":
        units = model.compile_units()
        if not units:
            raise UserError(f"performance.compile=step: {type(model).__name__} has no per-step units; "
                            "use performance.compile=model")
        for unit in units:
            unit.compile(**compile_kwargs)
    elif mode == "model":
        # An instance attribute, not a wrapper module, so state_dict keys stay those of the eager model.
        model.log_prob = torch.compile(model.log_prob, **compile_kwargs)
    return model

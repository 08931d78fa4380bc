"""The random states a resumed run needs to draw exactly what the uninterrupted run would have drawn.

Saved in every checkpoint as plain data and tensors (the checkpoint loads with weights_only=True).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_states() -> dict:
    """Python's, NumPy's, torch's CPU and every visible CUDA device's generator states."""
    states = {
        "python": random.getstate(),
        "numpy": _numpy_state_as_tensors(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(_as_python_state(states["python"]))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(position), int(has_gauss), float(cached)))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _numpy_state_as_tensors(state) -> list:
    # checkpoints are loaded with weights_only=True, which admits tensors but not NumPy arrays
    name, keys, position, has_gauss, cached = state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]


def _as_python_state(state):
    # a checkpoint round trip may turn the inner tuple into a list; random.setstate wants tuples
    version, internal, gauss = state
    return version, tuple(internal), gauss

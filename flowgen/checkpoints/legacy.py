"""What runs written by earlier versions of flowgen mean today: the renamed configuration keys and weights.

One table per kind, so that a rename is one entry here and every path that reads an old run (restoring a
checkpoint for the tools, resuming it, the benchmark's ``benchmark.weights``) reads it the same way:

- Glow's number of scales L was ``model.levels``; it is ``model.scales`` (``num_levels`` is K, the number
  of pixel levels, and the two must not share a name).
- The multi-scale flows kept their per-scale flows at ``levels.<l>.``; they are at ``scales.<l>.``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# (the model classes it applies to, the old key, the new key) of model configurations
MODEL_KEY_RENAMES = [(("flowgen.models.Glow", "flowgen.models.glow.Glow"), "levels", "scales")]
# (old, new) patterns of state-dict keys
STATE_KEY_RENAMES = [(re.compile(r"(^|\.)levels\.(?=\d)"), r"\1scales.")]


def upgrade_run_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run configuration (plain dict) with its renamed keys under their present names (in place)."""
    model = cfg.get("model")
    if isinstance(model, dict):
        for targets, old, new in MODEL_KEY_RENAMES:
            if model.get("_target_") in targets and old in model and new not in model:
                model[new] = model.pop(old)
    return cfg


def upgrade_state_dict(state: Mapping[str, Any], expected: Iterable[str]) -> dict[str, Any]:
    """``state`` with every old key that the model expects under its new name renamed; other keys as they are."""
    expected = set(expected)
    upgraded = {}
    for key, value in state.items():
        if key not in expected:
            for pattern, replacement in STATE_KEY_RENAMES:
                renamed = pattern.sub(replacement, key)
                if renamed in expected:
                    key = renamed
                    break
        upgraded[key] = value
    return upgraded

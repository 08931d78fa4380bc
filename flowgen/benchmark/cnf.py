"""Measurements of continuous normalizing flows (``scripts/cnf_benchmark.py``; the README's "Continuous flows").

``tolerance_table``  a trained CNF's exact-trace bpd on a split against the solver's tolerance: bpd, its
                     estimator's standard error, NFE per solve and seconds (``flowgen.evaluation.evaluate_split``).
``sampling_speed``   images per second against the NFE of the sampling solve (adaptive and fixed-step solvers).
(The 2-D playground's CNF beside zuko's: ``flowgen.playground.peer``.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
from torch import nn

from flowgen.evaluation import evaluate_split


def tolerance_table(model: nn.Module, dequantizer: nn.Module, batches: Iterable, tolerances: list[float],
                    class_conditional: bool = False, seed: int = 0) -> list[dict]:
    """One row per tolerance (rtol = atol): the split's bpd with the model's evaluation trace, its standard
    error, NFE per solve and the seconds the scoring took.  ``batches`` is re-iterated for every row."""
    rows = []
    for tolerance in tolerances:
        with model.solver_settings(rtol=tolerance, atol=tolerance):
            score = evaluate_split(model, dequantizer, batches, class_conditional, seed=seed)
        rows.append({"tolerance": tolerance, "bpd": score.bpd, "bpd_std_error": score.bpd_std_error,
                     "nfe": score.nfe, "seconds": score.seconds, "recon_error": score.recon_error})
    return rows


@torch.no_grad()
def sampling_speed(model: nn.Module, solvers: list[dict], num_images: int = 64, temperature: float = 1.0,
                   seed: int = 0) -> list[dict]:
    """Images per second of ``model.sample`` with each solver setting ({"solver": "rk4", "step_size": 0.1}, ...):
    one warm-up call of 2 images, then ``num_images`` at once; the NFE is the model's count of that solve."""
    rows = []
    for options in solvers:
        model.sample(2, temperature, generator=torch.Generator().manual_seed(seed), **options)
        start = time.perf_counter()
        model.sample(num_images, temperature, generator=torch.Generator().manual_seed(seed), **options)
        seconds = time.perf_counter() - start
        rows.append({**options, "nfe": model.nfe, "seconds": seconds, "images_per_sec": num_images / seconds})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (floats to 4 significant digits); a key some rows lack is left blank there."""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r[k]) if k in r else "" for k in keys) + " |" for r in rows]
    return "\n".join(lines)

"""Measurements of continuous normalizing flows (``scripts/cnf_benchmark.py``; the README's "Continuous flows").

``tolerance_table``  a trained CNF's exact-trace bpd on a split against the solver's tolerance: bpd, its
                     estimator's standard error, NFE per solve and seconds (``flowgen.evaluation.evaluate_split``).
``sampling_speed``   images per second against the NFE of the sampling solve (adaptive and fixed-step solvers).
``playground_peer``  the 2-D playground's CNF (by maximum likelihood and by flow matching) beside zuko's CNF
                     (``zuko.flows.CNF``, FFJORD with the exact trace), same data, steps, batch and learning-rate
                     schedule: test NLL (nats per point) and training time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from flowgen.evaluation import evaluate_split
from flowgen.playground.densities import sample_density
from flowgen.playground.flows2d import build_cnf
from flowgen.playground.model import FlowDensity2d
from flowgen.playground.training import mean_nll, train


def tolerance_table(model: nn.Module, dequantizer: nn.Module, batches: Iterable, tolerances: list[float],
                    class_conditional: bool = False, seed: int = 0) -> list[dict]:
    """One row per tolerance (rtol = atol): the split's bpd with the model's evaluation trace, its standard
    error, NFE per solve and the seconds the scoring took.  ``batches`` is re-iterated for every row."""
    rows = []
    saved = model.flow.solver
    try:
        for tolerance in tolerances:
            model.set_solver(rtol=tolerance, atol=tolerance)
            score = evaluate_split(model, dequantizer, batches, class_conditional, seed=seed)
            rows.append({"tolerance": tolerance, "bpd": score.bpd, "bpd_std_error": score.bpd_std_error,
                         "nfe": score.nfe, "seconds": score.seconds, "recon_error": score.recon_error})
    finally:
        model.flow.solver = saved
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


class _ZukoDensity(nn.Module):
    """zuko's CNF behind the playground's training interface (``training_loss``, ``log_prob``, ``objective``)."""

    objective = "likelihood"

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow().log_prob(x)

    def training_loss(self, x: torch.Tensor) -> torch.Tensor:
        return -self.log_prob(x)


def playground_peer(density: str = "moons", steps: int = 300, batch_size: int = 256, lr: float = 2e-3,
                    hidden: int = 64, test_points: int = 5000, seed: int = 0,
                    log: Callable[[str], None] = print) -> list[dict]:
    """flowgen's 2-D CNF by maximum likelihood and by flow matching, and zuko's CNF, each trained ``steps`` Adam
    steps on fresh samples of ``density`` (the playground's loop): rows of test NLL, train and test seconds."""
    import zuko  # the peer: pip install -e ".[benchmark]"

    contenders: dict[str, Callable[[], nn.Module]] = {
        "flowgen CNF, maximum likelihood (exact trace, dopri5 1e-5)":
            lambda: FlowDensity2d(build_cnf(1, hidden), "likelihood"),
        "flowgen CNF, flow matching (scored by dopri5 1e-5)":
            lambda: FlowDensity2d(build_cnf(1, hidden), "flow_matching"),
        "zuko CNF, maximum likelihood (exact trace, atol 1e-6 rtol 1e-5)":
            lambda: _ZukoDensity(zuko.flows.CNF(2, hidden_features=(hidden,) * 3)),
    }
    test = sample_density(density, test_points, np.random.default_rng(seed + 1))
    rows = []
    for name, make in contenders.items():
        torch.manual_seed(seed)
        model = make()
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        train(model, lambda n, rng=rng: sample_density(density, n, rng), steps, batch_size, lr)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        nll = mean_nll(model, test)
        test_seconds = time.perf_counter() - start
        parameters = sum(p.numel() for p in model.parameters())
        rows.append({"model": name, "parameters": parameters, "test_nll": nll, "train_seconds": train_seconds,
                     "test_seconds": test_seconds})
        log(f"{name}: NLL {nll:.4f} nats, trained in {train_seconds:.1f} s, scored in {test_seconds:.1f} s")
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (floats to 4 significant digits)."""
    keys = list(rows[0])

    def cell(v) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)

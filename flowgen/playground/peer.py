"""The 2-D playground's CNF beside zuko's (``zuko.flows.CNF``: FFJORD with the exact trace), a pip-installable peer.

``playground_peer`` trains flowgen's 2-D CNF by maximum likelihood and by flow matching, and zuko's CNF by
maximum likelihood, with the playground's loop (the same fresh samples of the toy density, steps, batch and
learning-rate schedule), and reports each one's test NLL (nats per point) and seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from flowgen.data.densities2d import sample_density
from flowgen.flows.vector import build_cnf
from flowgen.playground.model import FlowDensity2d
from flowgen.playground.training import mean_nll, train


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

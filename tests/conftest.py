"""Shared test helpers: tiny float64 flows with non-trivial parameters."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from flowgen.flows.actnorm import ActNorm

# `make test` runs the suite in pytest-xdist workers: they share the machine's cores between
# them, and so do the train.py subprocesses they start (which inherit OMP_NUM_THREADS).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-tensor tests (use with pytest.mark.usefixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def perturb_parameters(module: nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Add noise to every parameter so zero-initialised layers stop being the identity."""
    generator = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(std * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device))


def initialize_actnorms(module: nn.Module, x: torch.Tensor, cond=None, **kwargs) -> None:
    """Run one training-mode forward so every ActNorm performs its data-dependent init."""
    module.train()
    with torch.no_grad():
        module(x, cond, **kwargs) if cond is not None else module(x, **kwargs)
    assert all(bool(m.initialized) for m in module.modules() if isinstance(m, ActNorm))


def flatten_latents(z) -> torch.Tensor:
    """A latent tensor or a list of per-level latents -> (B, D)."""
    if isinstance(z, (list, tuple)):
        return torch.cat([t.flatten(1) for t in z], dim=1)
    return z.flatten(1)


def jacobian_logdets(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of fn at each sample of x, from the full autograd Jacobian (float64)."""
    out = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1]

        def single(inp):
            return flatten_latents(fn(inp)).flatten()

        jac = torch.autograd.functional.jacobian(single, xb).reshape(xb.numel(), xb.numel())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


# ---- trained runs shared by the CLI tests (a few steps on digits, once per session) ---------------

@dataclass
class TrainedRun:
    root: Path  # the tmp project directory the run was launched in (logs/, data/)
    run_dir: Path
    stdout: str


def _train_once(tmp_path_factory, name: str, extra: list[str]) -> TrainedRun:
    from tests.train_runner import FAST, run_dir, run_entry

    root = tmp_path_factory.mktemp(name)
    args = ["logger=csv", f"run_name={name}", "model.hidden_channels=16", *FAST,
            "trainer.limit_test_batches=null", *extra]
    run = run_entry("train.py", args, root)
    assert run.returncode == 0, run.output[-3000:]
    return TrainedRun(root, run_dir(root, name), run.stdout)


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory) -> TrainedRun:
    """Glow on digits for 6 steps, with an EMA of the weights; tested on the whole test split."""
    return _train_once(tmp_path_factory, "digits", ["ema_decay=0.9"])


@pytest.fixture(scope="session")
def trained_conditional(tmp_path_factory) -> TrainedRun:
    """A class-conditional Glow on digits with variational dequantization, 6 steps."""
    return _train_once(tmp_path_factory, "conditional",
                       ["model.num_classes=10", "dequantization=variational", "test=false"])

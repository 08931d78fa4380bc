"""Shared test helpers: tiny float64 flows with non-trivial parameters."""

from __future__ import annotations

import torch
from torch import nn

from flowgen.flows.actnorm import ActNorm


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

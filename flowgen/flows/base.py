"""The layer contract shared by every invertible layer.

Every flow layer maps data towards the latent space in ``forward`` and back in ``inverse``:

    forward(x, cond=None) -> (z, logdet)    logdet = log |det dz/dx|      shape (B,)
    inverse(z, cond=None) -> (x, logdet)    logdet = log |det dx/dz|      = -forward's
    invert(z, cond=None)  -> x              the same x, no log-determinant work

``invert`` is what sampling, reconstruction and invertible backprop call: they never use the
log-determinant, and a coupling's costs a pass over its activations (a spline's, several).

The log-determinant is always accumulated in float32 (float64 when the input is float64),
whatever precision the activations run in, so that likelihood sums never lose bits to bf16.
Composition sums log-determinants; nothing else is needed to build a model.
"""

from __future__ import annotations

import torch
from torch import nn

from flowgen.errors import InvalidValueError
from flowgen.flows.memory import MEMORY_MODES, forward_with_memory


def logdet_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (exactness tests), float32 for everything else (bf16, fp16)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def zero_logdet(x: torch.Tensor) -> torch.Tensor:
    """A (B,) zero log-determinant in the accumulation dtype of ``x``."""
    return torch.zeros(x.shape[0], dtype=logdet_dtype(x), device=x.device)


def sum_except_batch(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum all dimensions but the first, accumulating in ``dtype`` (default: logdet dtype)."""
    dtype = dtype or logdet_dtype(t)
    return t.to(dtype).flatten(1).sum(dim=1)


class Flow(nn.Module):
    """Base class of an invertible layer; subclasses implement ``forward`` and ``inverse``."""

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):  # pragma: no cover
        raise NotImplementedError

    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None = None):  # pragma: no cover
        raise NotImplementedError

    def invert(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x = f^{-1}(z) alone.  Layers whose log-determinant is cheap (a number per channel)
        inherit this; layers that would spend a pass over the activations on it override it."""
        return self.inverse(z, cond)[0]

    def reconstruct(self, z: torch.Tensor, cond: torch.Tensor | None = None, input_grad: bool = True):
        """For invertible backprop (``flowgen.flows.memory``): (x, z', logdet') with x = f^{-1}(z) a leaf
        (requiring grad when ``input_grad``) and (z', logdet') = f(x) recomputed with its graph.
        Couplings override it to run their conditioner once instead of twice."""
        with torch.no_grad():
            x = self.invert(z, cond)
        x = x.detach().requires_grad_(input_grad)
        return (x, *self(x, cond))


class FlowSequence(Flow):
    """Composition f = f_n ∘ ... ∘ f_1:  log|det J_f| = Σ_i log|det J_{f_i}|.

    ``memory`` chooses how backprop through the sequence stores activations (values and
    gradients agree to float32 round-off; see ``flowgen.flows.memory``): "standard" keeps every
    layer's activations, "checkpoint" recomputes each layer's internals in backward, and
    "invertible" stores only the sequence's output and reconstructs every layer's input
    from its output with the layer's inverse, so activation memory does not grow with depth.
    """

    def __init__(self, flows: list[nn.Module], memory: str = "standard"):
        super().__init__()
        if memory not in MEMORY_MODES:
            raise InvalidValueError(f"unknown memory {memory!r}; choose one of {', '.join(MEMORY_MODES)}")
        self.flows = nn.ModuleList(flows)
        self.memory = memory

    def forward(self, x, cond=None):
        return forward_with_memory(self.memory, self.flows, x, cond, zero_logdet(x))

    def inverse(self, z, cond=None):
        logdet = zero_logdet(z)
        for flow in reversed(self.flows):
            z, ld = flow.inverse(z, cond)
            logdet = logdet + ld
        return z, logdet

    def invert(self, z, cond=None):
        for flow in reversed(self.flows):
            z = flow.invert(z, cond)
        return z

    def __len__(self) -> int:
        return len(self.flows)

    def __iter__(self):
        return iter(self.flows)


def no_autocast(x: torch.Tensor):
    """Context that turns autocast off on ``x``'s device: the invertible path stays in float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)

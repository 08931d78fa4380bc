"""Memory-efficient backpropagation through a sequence of invertible layers.

Standard backprop stores, for every layer, the tensors its backward needs: the input of each
ActNorm and 1x1 convolution and, inside every coupling, all hidden activations of its
conditioner network (several tensors of ``hidden_channels`` channels).  Activation memory
therefore grows linearly with the depth K, and for Glow it is dominated by the conditioners.
``FlowSequence(layers, memory=...)`` offers two ways out; values and gradients are those of
standard backprop (to float32 round-off), only what is stored changes:

``checkpoint``
    Every layer that has parameters runs under ``torch.utils.checkpoint`` (non-reentrant):
    only the layer's input is kept and its internals (the conditioner's activations) are
    recomputed in backward.  Memory still grows with depth, by one activation per layer
    instead of several; the price is one more forward per layer.

``invertible`` (the reversible backprop of Gomez et al. 2017, "The Reversible Residual Network")
    A flow's input can be computed from its output, so nothing inside the sequence has to be
    stored.  ``InvertibleSequence`` is one autograd node for the whole sequence:

      forward   z_0 = x;  z_i, ld_i = f_i(z_{i-1})  under no_grad;  save ONLY z_n
                returns (z_n, logdet_0 + Σ_i ld_i)
      backward  given g_z = dL/dz_n and g_ld = dL/dlogdet (shape (B,)), for i = n … 1:
                  x̂ = f_i^{-1}(z_i)                             exact inverse, no grad
                  ẑ, ld̂ = f_i(x̂)                                recomputed with grad
                  (g_x, g_θi) = vjp of (ẑ, ld̂) with cotangents (g_z, g_ld)
                  g_z = g_x;  z_{i-1} = x̂
                every ld_i enters the sum with weight 1, so each layer gets the same g_ld.

    The parameter gradients are *returned* from ``backward`` (the parameters are inputs of
    the node), so autograd accumulates them into ``.grad`` itself: DDP's gradient hooks,
    gradient accumulation and clipping see nothing unusual.  Backward holds one layer's
    graph at a time, so activation memory is O(1) in depth: the sequence's output (which the
    split or prior after it keeps anyway) plus the largest single layer's activations while
    it is recomputed.  The price is one inverse and one forward per layer in backward: a
    training step of Glow (L=3, K=8, width 64, 32x32) took 1.5x as long on a CPU
    (checkpoint: 1.35x).

Why reconstruction is exact enough: every layer's inverse is closed form.  ActNorm and the
1x1 convolution are affine maps undone with a few float32 roundings per element; a coupling
leaves its identity half untouched bit for bit, so its conditioner sees exactly the input it
saw in the forward and returns exactly the same shift and scale, and only the transformed
half picks up a rounding or two.  The maps are well conditioned (bounded coupling scales,
ActNorm-normalised activations), so x̂ is off by a few ulps per layer and the drift grows
about linearly with depth: on a 2 x 49-layer Glow the gradients match standard backprop's to
~3e-6 relative, while standard float32 backprop itself is ~1e-5 from the float64 gradient.
Reconstructing in float64 was measured and gains only ~1.4x: most of the error is the
forward's own float32 rounding of each z_i, which no inverse can undo.

Autocast: the state at forward time (on or off, device type, dtype) is recorded and
re-entered for the inverse and the recompute (backward runs outside the caller's autocast
context), so the conditioners run in the same precision as in the forward; without this a
bf16 coupling's inverse would use float32 shifts and miss its input.  The layers turn
autocast off for their invertible arithmetic themselves.

Layers with data-dependent initialisation (ActNorm) set themselves up on their first
training call, possibly through another code path than later calls; a recompute must repeat
the forward exactly, so on the first step the sequence runs once under no_grad to initialise
(see ``forward_with_memory``).  Layers must be deterministic (no dropout), which exact
invertibility needs anyway.  The conditioning tensor ``cond`` is an input of the node and
gets its gradient (summed over layers) when it requires one.  Double backward is not supported.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

MEMORY_MODES = ("standard", "checkpoint", "invertible")


def run_flows(flows: nn.ModuleList, x: torch.Tensor, cond: torch.Tensor | None, logdet: torch.Tensor):
    """The plain loop: z = f_n(…f_1(x)), logdet + Σ_i log|det J_{f_i}|."""
    for flow in flows:
        x, ld = flow(x, cond)
        logdet = logdet + ld
    return x, logdet


class DataDependentInit(nn.Module):
    """A layer that initialises itself from its first training batch (ActNorm): the sequence must run
    that batch once without recording before it can recompute (``forward_with_memory``)."""

    def _is_initialized(self) -> bool:  # pragma: no cover
        """Whether the first batch has been seen, as a Python bool (no device sync once True)."""
        raise NotImplementedError


# Per sequence, its layers with a data-dependent initialisation (ActNorm, also inside the
# conditioners), found once: walking hundreds of submodules every step costs milliseconds.
_initialising: weakref.WeakKeyDictionary[nn.ModuleList, list[nn.Module]] = weakref.WeakKeyDictionary()


def _pending_initialisation(flows: nn.ModuleList) -> bool:
    """True while a layer with data-dependent initialisation has not seen its first training batch."""
    layers = _initialising.get(flows)
    if layers is None:
        layers = _initialising[flows] = [m for m in flows.modules() if isinstance(m, DataDependentInit)]
    return any(m.training and not m._is_initialized() for m in layers)


def _has_trainable_parameters(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def checkpointed_flows(flows: nn.ModuleList, x, cond, logdet):
    """Like ``run_flows``, but each layer with trainable parameters keeps only its input."""
    for flow in flows:
        if _has_trainable_parameters(flow):
            x, ld = checkpoint(flow, x, cond, use_reentrant=False)
        else:
            x, ld = flow(x, cond)  # squeeze, fixed permutation: nothing to recompute
        logdet = logdet + ld
    return x, logdet


def _add(total: torch.Tensor | None, g: torch.Tensor | None) -> torch.Tensor | None:
    """Accumulate a gradient that may be None (a parameter shared by layers, or ``cond``)."""
    if g is None:
        return total
    return g if total is None else total + g


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class InvertibleSequence(torch.autograd.Function):
    """One autograd node for a whole sequence of invertible layers (see the module docstring).

    Called as ``InvertibleSequence.apply(flows, x, cond, logdet, *params)`` where ``params``
    are the sequence's trainable parameters; returns (z, logdet + Σ log|det J|).
    """

    @staticmethod
    def forward(ctx, flows, x, cond, logdet, *params):
        ctx.flows = flows
        ctx.autocast = _autocast_state(x.device.type)
        ctx.param_index = {id(p): i for i, p in enumerate(params)}
        with torch.no_grad():
            z, logdet = run_flows(flows, x, cond, logdet)
        ctx.save_for_backward(z, cond)  # the output (and the conditioning input), nothing else
        return z, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z, grad_logdet):
        z, cond = ctx.saved_tensors
        flows, index = ctx.flows, ctx.param_index
        if grad_z is None:
            grad_z = torch.zeros_like(z)
        cond_grad = cond is not None and ctx.needs_input_grad[2]
        if cond_grad:
            cond = cond.detach().requires_grad_(True)
        grad_params: list[torch.Tensor | None] = [None] * len(index)
        grad_cond = None
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            for i in reversed(range(len(flows))):
                flow = flows[i]
                need_x = i > 0 or ctx.needs_input_grad[1]
                params = [p for p in flow.parameters() if id(p) in index]
                if not (need_x or params or cond_grad):
                    break  # the first layer, and nothing before it wants a gradient
                with torch.enable_grad():  # this layer's input from its output, and its graph only
                    x, z_re, ld = flow.reconstruct(z, cond, need_x)
                pairs = [(z_re, grad_z)]
                if grad_logdet is not None:
                    pairs.append((ld, grad_logdet))  # every layer's log-det has weight 1 in the sum
                outputs, cotangents = zip(*[(o, g) for o, g in pairs if o.requires_grad], strict=True)
                inputs = ([x] if need_x else []) + params + ([cond] if cond_grad else [])
                grads = list(torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True))
                if need_x:
                    grad_z = grads.pop(0)
                if cond_grad:
                    grad_cond = _add(grad_cond, grads.pop())
                for p, g in zip(params, grads, strict=True):
                    grad_params[index[id(p)]] = _add(grad_params[index[id(p)]], g)
                z = x.detach()
        if not ctx.needs_input_grad[1]:
            grad_z = None
        if not ctx.needs_input_grad[3]:
            grad_logdet = None
        return None, grad_z, grad_cond, grad_logdet, *grad_params


def invertible_flows(flows: nn.ModuleList, x, cond, logdet):
    """Like ``run_flows``, with activation memory independent of the number of layers."""
    params = [p for p in flows.parameters() if p.requires_grad]  # each once, even if shared
    return InvertibleSequence.apply(flows, x, cond, logdet, *params)


def forward_with_memory(mode: str, flows: nn.ModuleList, x, cond, logdet):
    """Run ``flows`` on x in memory mode ``mode``; the plain loop when no gradient is needed."""
    if mode == "standard" or not torch.is_grad_enabled() or len(flows) == 0:
        return run_flows(flows, x, cond, logdet)
    if not (x.requires_grad or (cond is not None and cond.requires_grad) or _has_trainable_parameters(flows)):
        return run_flows(flows, x, cond, logdet)
    if _pending_initialisation(flows):
        # A layer's first training call initialises it and may take another code path than
        # later calls (ActNormConv2d runs conv and ActNorm apart, then fused), but a recompute
        # in backward must repeat the forward's exact computation.  So on the very first step
        # the sequence runs once without grad just to initialise, then for real.
        with torch.no_grad():
            run_flows(flows, x, cond, logdet)
    if mode == "checkpoint":
        return checkpointed_flows(flows, x, cond, logdet)
    return invertible_flows(flows, x, cond, logdet)

"""Flow diagnostics: where the bits go, part by part, and how far the layers' scales have moved.

The per-image bound of ``flowgen.likelihood`` splits exactly into the named parts of log p(y)
that every model offers (``FlowModel.log_prob_parts``: each scale's or block's log-det, each
prior term) plus the dequantization term (D = C·H·W, K pixel levels):

    bpd = Σ_parts part_bpd + dequantization_bpd

    part_bpd            = -part / (D ln 2)      (a log-det part is < 0 where its layers expand volume)
    dequantization_bpd  = (log q(u|x) + D log K) / (D ln 2)     (= log2 K for uniform noise)

Logged as ``diagnostics/<part>_bpd`` (e.g. ``diagnostics/scale0/logdet_bpd``, ``diagnostics/block3/logdet_bpd``,
``diagnostics/prior_bpd``) with ``<part>_bpd_fraction = part_bpd / bpd``, the share of the total.
Next to these, for every group of elementwise log-derivatives the model reports (the log-scale
s = log |∂z_i/∂x_i| of each element a coupling or autoregressive layer transforms; ActNorm's
log-scales), their min / mean / max as ``diagnostics/<group>_log_scale_{min,mean,max}``.

Everything comes from ONE no-grad ``log_prob_parts`` pass, so no hook stays registered and the
memory mode of the model plays no part.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from flowgen.errors import InvalidValueError
from flowgen.likelihood import bits_per_dim, log_likelihood_bound, nats_to_bpd
from flowgen.training.periodic import EveryNSteps

PREFIX = "diagnostics/"


@torch.no_grad()
def flow_diagnostics(model: nn.Module, y: torch.Tensor, num_levels: int, log_q: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The diagnostics of the module docstring as 0-d tensors (means over the batch), named ``diagnostics/...``.

    y: dequantized model inputs (B, C, H, W); log_q: log q(u|x) of their noise (None for uniform);
    num_levels: K.  Call it with the model in eval mode (a training-mode pass would initialise ActNorm).
    """
    num_dims = math.prod(y.shape[1:])
    parts = model.log_prob_parts(y, labels)
    log_p = parts.total()
    bpd = bits_per_dim(log_likelihood_bound(log_p, num_dims, num_levels, log_q), num_dims).mean()
    # the bound's terms other than log p(y): log q(u|x) + D log K
    dequantization_nats = -log_likelihood_bound(torch.zeros_like(log_p), num_dims, num_levels, log_q)
    metrics = {f"{PREFIX}bpd": bpd, f"{PREFIX}dequantization_bpd": nats_to_bpd(dequantization_nats, num_dims).mean()}
    for name, term in parts.terms.items():
        part_bpd = nats_to_bpd(-term, num_dims).mean()
        metrics[f"{PREFIX}{name}_bpd"] = part_bpd
        metrics[f"{PREFIX}{name}_bpd_fraction"] = part_bpd / bpd
    for name, s in parts.log_derivatives.items():
        metrics[f"{PREFIX}{name}_log_scale_min"] = s.min()
        metrics[f"{PREFIX}{name}_log_scale_mean"] = s.mean()
        metrics[f"{PREFIX}{name}_log_scale_max"] = s.max()
    return metrics


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block; each gets back its own mode afterwards."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class FlowDiagnostics(EveryNSteps):
    """Every ``every_n_steps`` optimizer steps, log ``flow_diagnostics`` of the weights being trained on the
    first ``num_images`` images of the current batch to every logger (rank 0 only, at the global step).

    The pass runs in eval mode without grad, in the module's dtype (outside any autocast), on dequantization
    noise from its own generator (seeded with ``seed``), so training is untouched: not its weights, not its
    ActNorm state, not the global RNG that draws the training noise.  Steps in between cost one integer test.
    """

    def __init__(self, every_n_steps: int = 100, num_images: int = 32, seed: int = 0):
        super().__init__(every_n_steps, "diagnostics")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise InvalidValueError(f"diagnostics.num_images must be an int >= 1, got {num_images!r}")
        self.num_images = num_images
        self.seed = seed

    def measure(self, pl_module, batch) -> dict[str, float]:
        """The diagnostics of ``pl_module.model`` on the head of ``batch`` (integer pixels, labels), as floats."""
        x, labels = batch[0][: self.num_images], batch[1][: self.num_images]
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        with eval_mode(pl_module.model, pl_module.dequantizer), torch.no_grad():
            y, log_q = pl_module.dequantizer(x, generator)
            metrics = flow_diagnostics(pl_module.model, y, pl_module.num_levels, log_q,
                                       labels if pl_module.class_conditional else None)
        values = torch.stack([v.detach().double() for v in metrics.values()]).tolist()  # one host sync
        return dict(zip(metrics, values, strict=True))

    def measure_now(self, trainer, pl_module, batch) -> dict[str, float]:
        return self.measure(pl_module, batch)

"""Flow diagnostics: where each level's bits go, and how far its scales have moved.

The per-image bound of ``flowgen.likelihood`` splits exactly into one log-det and one prior term
per level l = 0..L-1 of a multi-scale flow, plus the dequantization term (D = C·H·W, K levels):

    bpd = Σ_l logdet_bpd_l + Σ_l prior_bpd_l + dequantization_bpd

    logdet_bpd_l        = -Σ_{layers of level l} log|det J| / (D ln 2)    (< 0 where the level expands volume)
    prior_bpd_l         = -log p(z_l | h_l) / (D ln 2)                      (the top prior for the last level)
    dequantization_bpd  = (log q(u|x) + D log K) / (D ln 2)                 (= log2 K for uniform noise)

and ``prior_bpd_fraction_l = prior_bpd_l / bpd``.  Next to these, per level: the log-scale
s = log |∂z_i/∂x_i| of every element a coupling transforms (Glow: s = log σ(h + 2) < 0; RealNVP:
s = α·tanh(h); spline: the log-slope of the spline at x_i; additive couplings have none), as
min/mean/max, and the min/max of the ActNorm log-scales (z = (x + b)·exp(s)).

Everything comes from ONE no-grad pass over the levels (the walk of ``MultiScaleFlow.encode``,
layer by layer), so no hook stays registered and the memory mode of the levels plays no part.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from flowgen.flows.actnorm import ActNorm
from flowgen.flows.base import zero_logdet
from flowgen.flows.coupling import Coupling
from flowgen.likelihood import bits_per_dim, log_likelihood_bound, nats_to_bpd

PREFIX = "diagnostics/"


@dataclass
class LevelTerms:
    """What one level contributes, on a batch of B images."""

    logdet: torch.Tensor  # (B,) Σ log|det J| of the level's layers
    log_prior: torch.Tensor  # (B,) log-density of the level's latent under its prior
    coupling_log_scale: torch.Tensor | None  # log-scale of every transformed element, flat; None: additive only
    actnorm_log_scale: torch.Tensor | None  # every ActNorm log-scale of the level, flat; None: no ActNorm


@torch.no_grad()
def level_terms(model: nn.Module, y: torch.Tensor, labels: torch.Tensor | None = None) -> list[LevelTerms]:
    """Walk a multi-scale flow's levels on model inputs y as ``encode`` does, keeping each level's terms apart."""
    terms = []
    h = y
    for i, level in enumerate(model.levels):
        logdet, scales = zero_logdet(h), []
        for layer in level:
            if isinstance(layer, Coupling):
                s = layer.log_scales(h)
                if s is not None:
                    scales.append(s.to(logdet.dtype))
            h, ld = layer(h)
            logdet = logdet + ld
        if i < len(model.splits):
            h, _, log_prior = model.splits[i](h)
        else:
            log_prior = model.top_prior.log_prob(h, labels)
        actnorms = [layer.log_scale.detach().flatten() for layer in level if isinstance(layer, ActNorm)]
        terms.append(LevelTerms(logdet, log_prior, torch.cat(scales) if scales else None,
                                torch.cat(actnorms) if actnorms else None))
    return terms


def flow_diagnostics(model: nn.Module, y: torch.Tensor, num_levels: int, log_q: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The diagnostics of the module docstring as 0-d tensors (means over the batch), named ``diagnostics/...``.

    y: dequantized model inputs (B, C, H, W); log_q: log q(u|x) of their noise (None for uniform);
    num_levels: K.  Call it with the model in eval mode (a training-mode pass would initialise ActNorm).
    """
    num_dims = math.prod(y.shape[1:])
    levels = level_terms(model, y, labels)
    log_p = sum(t.logdet + t.log_prior for t in levels)
    bpd = bits_per_dim(log_likelihood_bound(log_p, num_dims, num_levels, log_q), num_dims).mean()
    # the bound's terms other than log p(y): log q(u|x) + D log K
    dequantization_nats = -log_likelihood_bound(torch.zeros_like(log_p), num_dims, num_levels, log_q)
    metrics = {f"{PREFIX}bpd": bpd, f"{PREFIX}dequantization_bpd": nats_to_bpd(dequantization_nats, num_dims).mean()}
    for i, t in enumerate(levels):
        name = f"{PREFIX}level{i}/"
        prior_bpd = nats_to_bpd(-t.log_prior, num_dims).mean()
        metrics[name + "logdet_bpd"] = nats_to_bpd(-t.logdet, num_dims).mean()
        metrics[name + "prior_bpd"] = prior_bpd
        metrics[name + "prior_bpd_fraction"] = prior_bpd / bpd
        if t.coupling_log_scale is not None:
            s = t.coupling_log_scale
            metrics[name + "coupling_log_scale_min"] = s.min()
            metrics[name + "coupling_log_scale_mean"] = s.mean()
            metrics[name + "coupling_log_scale_max"] = s.max()
        if t.actnorm_log_scale is not None:
            s = t.actnorm_log_scale
            metrics[name + "actnorm_log_scale_min"] = s.min()
            metrics[name + "actnorm_log_scale_max"] = s.max()
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


class FlowDiagnostics(L.Callback):
    """Every ``every_n_steps`` optimizer steps, log ``flow_diagnostics`` of the weights being trained on the
    first ``num_images`` images of the current batch to every logger (rank 0 only, at the global step).

    The pass runs in eval mode without grad, in the module's dtype (outside any autocast), on dequantization
    noise from its own generator (seeded with ``seed``), so training is untouched: not its weights, not its
    ActNorm state, not the global RNG that draws the training noise.  Steps in between cost one integer test.
    """

    def __init__(self, every_n_steps: int = 100, num_images: int = 32, seed: int = 0):
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"diagnostics.every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"diagnostics.num_images must be an int >= 1, got {num_images!r}")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.seed = seed
        self._last_step = -1  # with gradient accumulation several batches end at the same global step
        self.last_metrics: dict[str, float] = {}

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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps != 0 or step == self._last_step:
            return
        self._last_step = step
        if not trainer.is_global_zero or not trainer.loggers:
            return  # the pass has no collective: the other ranks need not run it
        self.last_metrics = self.measure(pl_module, batch)
        for logger in trainer.loggers:
            logger.log_metrics(self.last_metrics, step=step)

r"""Any flow on the logit of the rescaled pixels (RealNVP, Dinh et al. 2017, section 4.1), as one model.

``LogitPreprocessed(flow, α)`` is the model contract on the dequantized input y ∈ [-1/2, 1/2)^D of a
flow that models z = logit(α + (1 - 2α)(y + 1/2)) (``flowgen.likelihood.logit_map``):

    forward(y)  = flow.forward(z),      logdet  = log |det ∂z/∂y| + flow's logdet
    log p(y)    = log p_flow(z) + log |det ∂z/∂y|                 (a named term, ``preprocessing/logit``)
    sample / inverse / invert:  flow's z, then y = (σ(z) - α)/(1 - 2α) - 1/2

so the training module, evaluation, sampling, OOD scores, typicality, latents and attributes, which
use the contract only, count the map's log-determinant and map samples back to pixels without
knowing it is there; any family (Glow, RealNVP, TarFlow, ...) is wrapped the same way.  The
accounting is in flowgen/likelihood.py's docstring.  ``with_preprocessing`` is what ``build_module``
calls with the run's ``preprocessing.logit_alpha`` (null: the flow itself, its state_dict unchanged).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from flowgen.likelihood import check_logit_alpha, inverse_logit_map, logit_log_derivatives, logit_map
from flowgen.models.base import FlowModel, Latents, LogProbParts

TERM = "preprocessing/logit"  # the name of the map's log-determinant among the log-density terms


class LogitPreprocessed(FlowModel):
    """``flow`` applied to z = logit(α + (1 - 2α)(y + 1/2)); y is the dequantized image in [-1/2, 1/2)^D."""

    def __init__(self, flow: FlowModel, alpha: float):
        super().__init__()
        self.alpha = check_logit_alpha(alpha)
        self.flow = flow

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.flow.input_shape

    @property
    def num_classes(self) -> int | None:
        return self.flow.num_classes

    def forward(self, x: torch.Tensor, y=None) -> tuple[Latents, torch.Tensor]:
        z, logdet = logit_map(x, self.alpha)
        latents, flow_logdet = self.flow(z, y)
        return latents, logdet + flow_logdet

    def inverse(self, latents: Latents, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        z, flow_logdet = self.flow.inverse(latents, y)
        inverse_logdet = -logit_log_derivatives(z, self.alpha).flatten(1).sum(1)
        return inverse_logit_map(z, self.alpha), flow_logdet + inverse_logdet

    def invert(self, latents: Latents, y=None) -> torch.Tensor:
        return inverse_logit_map(self.flow.invert(latents, y), self.alpha)

    def log_prob(self, x: torch.Tensor, y=None) -> torch.Tensor:
        z, logdet = logit_map(x, self.alpha)
        return self.flow.log_prob(z, y) + logdet

    def log_prob_parts(self, x: torch.Tensor, y=None) -> LogProbParts:
        z, logdet = logit_map(x, self.alpha)
        parts = self.flow.log_prob_parts(z, y)
        derivatives = {TERM: logit_log_derivatives(z, self.alpha).flatten(), **parts.log_derivatives}
        return LogProbParts({TERM: logdet, **parts.terms}, derivatives)

    def log_prob_estimate(self, x: torch.Tensor, y=None, generator=None):
        z, logdet = logit_map(x, self.alpha)
        estimate = self.flow.log_prob_estimate(z, y, generator)
        return replace(estimate, log_prob=estimate.log_prob + logdet)

    def training_loss(self, y: torch.Tensor, labels=None):
        """The flow's loss on z; a likelihood (``log_prob``) gains the map's log-determinant, any other loss
        (flow matching's regression) is the flow's own, on z."""
        z, logdet = logit_map(y, self.alpha)
        loss = self.flow.training_loss(z, labels)
        return loss if loss.log_prob is None else replace(loss, log_prob=loss.log_prob + logdet)

    def sample(self, n: int, temperature: float = 1.0, y=None, generator=None, **options) -> torch.Tensor:
        return inverse_logit_map(self.flow.sample(n, temperature, y, generator, **options), self.alpha)

    def sampling_options(self) -> list[str]:
        return self.flow.sampling_options()

    def compile_units(self) -> list[torch.nn.Module]:
        return self.flow.compile_units()

    @torch.no_grad()
    def reconstruction_errors(self, x: torch.Tensor) -> dict[str, float]:
        z, _ = logit_map(x, self.alpha)
        error = (inverse_logit_map(z, self.alpha) - x.to(z.dtype)).abs().max().item()
        return {TERM: error, **self.flow.reconstruction_errors(z)}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"


def with_preprocessing(model: FlowModel, logit_alpha: float | None) -> FlowModel:
    """``model`` on the logit of the rescaled pixels when ``logit_alpha`` is set, else ``model`` itself."""
    return model if logit_alpha is None else LogitPreprocessed(model, logit_alpha)

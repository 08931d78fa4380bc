"""The model contract: what every image flow offers, and all that the rest of flowgen may use.

A flow maps an image x (the dequantized model input, shape ``input_shape``) to latents z by a
bijection f and scores it by the change of variables:

    log p(x | y) = log p_Z(f(x) | y) + log |det ∂f/∂x|

Every family (multi-scale coupling flows, masked autoregressive flows, TarFlow, ...) implements

    input_shape                       (C, H, W)
    num_classes                       labels of a class-conditional prior, None when unconditional
    forward(x, y=None) -> (latents, logdet)   the bijection; latents: one tensor or a list of tensors
    inverse(latents, y=None) -> (x, logdet)   its exact inverse and log |det ∂x/∂z|
    invert(latents, y=None)  -> x             the inverse without log-determinant work
    log_prob(x, y=None)      -> (B,)          log p(x | y) in nats
    sample(n, temperature=1.0, y=None, generator=None) -> x
    log_prob_parts(x, y=None) -> LogProbParts the named additive terms of log p(x | y)
    sampling_options()       -> list[str]     the keyword-only options ``sample`` takes (default: read
                                              from its signature; a wrapper passes its flow's on)

Labels y are optional everywhere: a family whose bijection reads them (TarFlow's class embedding)
uses its unconditional ("null class") map without them; one whose prior alone reads them
(Glow's class-conditional top prior) ignores them in ``forward``/``inverse``.  Encoding and
decoding with the same y (or none) are exact inverses either way.

Two more methods let a family whose likelihood is estimated, or which trains by another loss, say so
(the defaults suit every family whose log p is exact and trained by maximum likelihood):

    log_prob_estimate(x, y=None, generator=None) -> LogProbEstimate   log p(x | y), its standard error
                                      (0 when exact; a CNF's Hutchinson trace estimate has one) and the
                                      solver's counters (a CNF's number of function evaluations, "nfe")
    training_loss(y, labels) -> TrainingLoss   what training minimises: log p(y | labels) (the training
                                      module turns it into the bpd bound), or a loss that is no likelihood
                                      (flow matching's regression), plus penalties and counters to log

``log_prob_parts`` splits log p(x) into named terms (each scale's or block's log-det, each prior
term) that add up to ``log_prob`` exactly, plus the elementwise log-derivatives of the layers
(for diagnostics).  Two more methods have defaults that a family may refine:

    compile_units()              the sub-modules ``performance.compile=step`` compiles one by one
    reconstruction_errors(x)     max |f_part^{-1}(f_part(h)) - h| per part: where invertibility is lost

The training module, evaluation, sampling, latents, attributes, diagnostics, the invertibility
monitor, compile and the benchmark use these and nothing else, so a new family is a new file
here and a config, never an edit to one of them.  Latents are passed back to ``inverse`` and
``invert`` exactly as ``forward`` returned them; code that works on them (interpolation, attribute
directions) goes through ``latent_list`` / ``like_latents``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from flowgen.errors import InvalidValueError

Latents = torch.Tensor | list[torch.Tensor]


@dataclass
class LogProbParts:
    """Named additive terms of log p(x | y), each (B,) in nats, and elementwise log-derivatives.

    terms: ``{"scale0/logdet": ..., "scale0/prior": ..., ...}``; Σ terms == log_prob(x, y).
    log_derivatives: ``{"scale0/coupling": flat tensor, ...}``, the log |∂z_i/∂x_i| of every element
        a group of layers transforms elementwise (log-scales of affine maps, log-slopes of splines),
        for the diagnostics' min/mean/max; groups without any (additive, permutations) are absent.
    """

    terms: dict[str, torch.Tensor]
    log_derivatives: dict[str, torch.Tensor] = field(default_factory=dict)

    def total(self) -> torch.Tensor:
        """Σ of the terms: log p(x | y), (B,)."""
        return torch.stack(list(self.terms.values())).sum(0)


@dataclass
class LogProbEstimate:
    """log p(x | y) (B,) in nats, its standard error (B,) (zeros when exact), and counters of the
    computation ({"nfe": function evaluations} for an ODE solve; {} for a closed-form family)."""

    log_prob: torch.Tensor
    std_error: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainingLoss:
    """What training minimises on a batch of dequantized inputs y, per image (B,).

    log_prob: log p(y | labels) in nats: the training module minimises the bpd bound built from it; or None
        when the family trains by ``loss``, which is no likelihood (logged as ``train/<name>``).
    penalty: added to the minimised objective (per image), e.g. regularisers of a CNF's dynamics; None: none.
    metrics: scalars logged as ``train/<key>`` (a CNF's "nfe", its regularisers ...).
    """

    log_prob: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    name: str = "loss"
    penalty: torch.Tensor | None = None
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if (self.log_prob is None) == (self.loss is None):
            raise InvalidValueError("a TrainingLoss holds either log_prob (a likelihood) or loss, not both or neither")


def latent_list(latents: Latents) -> list[torch.Tensor]:
    """The latents as a list of tensors (one tensor becomes a list of one)."""
    return [latents] if isinstance(latents, torch.Tensor) else list(latents)


def like_latents(parts: list[torch.Tensor], template: Latents) -> Latents:
    """``parts`` in the form of ``template``: one tensor if the model's latents are one tensor."""
    return parts[0] if isinstance(template, torch.Tensor) else list(parts)


def labels_for(y, n: int, device: torch.device) -> torch.Tensor | None:
    """Labels as a (n,) long tensor on ``device`` (one label is repeated n times), or None."""
    if y is None:
        return None
    y = torch.as_tensor(y, device=device).long().flatten()
    if y.numel() == 1 and n > 1:
        y = y.expand(n)
    if y.numel() != n:
        raise InvalidValueError(f"got {y.numel()} labels for {n} samples")
    return y


def check_temperature(temperature: float) -> None:
    if not temperature >= 0:
        raise InvalidValueError(f"temperature must be >= 0, got {temperature}")


class FlowModel(nn.Module):
    """Base class of every image flow; see the module docstring for the contract."""

    num_classes: int | None = None
    in_channels: int
    image_size: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    def forward(self, x: torch.Tensor, y=None) -> tuple[Latents, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def inverse(self, latents: Latents, y=None) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def invert(self, latents: Latents, y=None) -> torch.Tensor:
        return self.inverse(latents, y)[0]

    def log_prob_parts(self, x: torch.Tensor, y=None) -> LogProbParts:  # pragma: no cover
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """log p(x | y) in nats, shape (B,); families override it with a pass that keeps no parts."""
        return self.log_prob_parts(x, y).total()

    def log_prob_estimate(self, x: torch.Tensor, y=None, generator=None) -> LogProbEstimate:
        """log p(x | y) with its standard error and counters; exact families: ``log_prob`` with zero error.
        ``generator`` (one, or one per image) feeds a family's random estimator, so a score is reproducible."""
        log_p = self.log_prob(x, y)
        return LogProbEstimate(log_p, torch.zeros_like(log_p))

    def training_loss(self, y: torch.Tensor, labels=None) -> TrainingLoss:
        """What training minimises (``TrainingLoss``); by default maximum likelihood: log p(y | labels)."""
        return TrainingLoss(log_prob=self.log_prob(y, labels))

    def sample(self, n: int, temperature: float = 1.0, y=None, generator=None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def sampling_options(self) -> list[str]:
        """The keyword-only options of ``sample`` beyond the contract's (TarFlow: guidance, inverse_method,
        denoise, ...); [] for a family that has none (Glow, RealNVP)."""
        parameters = inspect.signature(self.sample).parameters.values()
        return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]

    def compile_units(self) -> list[nn.Module]:
        """Sub-modules whose ``forward`` ``performance.compile=step`` compiles one by one; [] when the
        family has none (then only ``performance.compile=model`` applies)."""
        return []

    @torch.no_grad()
    def reconstruction_errors(self, x: torch.Tensor) -> dict[str, float]:
        """max |f_part^{-1}(f_part(h)) - h| for each part of the flow on its own input h; {} when the
        family does not split into parts (then only the end-to-end error is known)."""
        return {}


class NullClassConditioning:
    """Class conditioning with a learned null class ∅ = ``num_classes`` (TarFlow, CNF): the unconditional
    map reads ∅, and in training each label is dropped to ∅ with probability ``label_drop`` (what
    classifier-free guidance needs). A model using it sets ``num_classes`` and ``label_drop``."""

    num_classes: int | None
    label_drop: float
    training: bool

    def _labels(self, y, n: int, device: torch.device) -> torch.Tensor | None:
        """(n,) labels for the network: y, or ∅ where y is None; None for an unconditional model."""
        if self.num_classes is None:
            return None
        labels = labels_for(y, n, device)
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device) if labels is None else labels

    def _training_labels(self, y, n: int, device: torch.device) -> torch.Tensor | None:
        """The labels of the training objective: in training mode each is dropped to ∅ with prob. label_drop."""
        labels = self._labels(y, n, device)
        if labels is None or not self.training or self.label_drop == 0:
            return labels
        drop = torch.rand(n, device=device) < self.label_drop
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

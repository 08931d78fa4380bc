"""The multi-scale architecture shared by Glow and RealNVP (RealNVP section 3.6).

    x ──scale 0──▶ h_0 ──split──▶ h_0'  ──scale 1──▶ … ──scale L-1──▶ z_{L-1} ~ top prior
                              └─▶ z_0 ~ p(z_0 | h_0')        (one factored latent per split)

Each scale is a ``FlowSequence`` (squeezes and flow steps); after every scale but the last,
``Split`` factors out half of the channels.  The density of x is exact:

    log p(x) = Σ_l log p(z_l | h_l') + log p_top(z_{L-1}) + Σ_layers log|det J|

Sampling runs the same road backwards from the top: draw the top latent, invert the last
scale, draw the factored latent from its conditional prior, concatenate, invert the scale
below, and so on.  Temperature T scales the standard deviation of every scale's prior.
"""

from __future__ import annotations

import torch
from torch import nn

from flowgen.errors import InvalidValueError
from flowgen.flows.actnorm import ActNorm
from flowgen.flows.base import FlowSequence, zero_logdet
from flowgen.flows.coupling import Coupling
from flowgen.flows.prior import TopPrior
from flowgen.flows.split import Split
from flowgen.models.base import FlowModel, LogProbParts, check_temperature, labels_for


class MultiScaleFlow(FlowModel):
    """Scales of flows with factor-out between them and Gaussian priors on every latent.

    In the model contract's terms (``flowgen.models.base``) the parts of log p(x) are, for each
    scale l = 0..L-1, ``scale{l}/logdet`` (Σ log|det J| of its layers) and ``scale{l}/prior`` (the
    split prior of the latent it factors out; the top prior for the last scale).
    """

    def __init__(self, scales: list[FlowSequence], splits: list[Split], top_prior: TopPrior,
                 in_channels: int, image_size: int):
        super().__init__()
        if len(splits) != len(scales) - 1:
            raise InvalidValueError(
                f"need one split between consecutive scales: {len(scales)} scales, {len(splits)} splits")
        self.scales = nn.ModuleList(scales)
        self.splits = nn.ModuleList(splits)
        self.top_prior = top_prior
        self.in_channels = in_channels
        self.image_size = image_size

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights written when the per-scale flows were called ``levels`` (flowgen.checkpoints.legacy)
        for key in [k for k in state_dict if k.startswith(prefix + "levels.")]:
            state_dict[prefix + "scales." + key[len(prefix + "levels."):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def num_classes(self) -> int | None:
        embedding = self.top_prior.class_embedding
        return None if embedding is None else embedding.num_classes

    # -- data -> latents -------------------------------------------------------------------
    def _bijection(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """x -> (latents z_0..z_{L-1}, Σ log|det J| (B,), Σ of the split priors' log-densities (B,))."""
        zs, logdet, log_prior = [], zero_logdet(x), zero_logdet(x)
        h = x
        for i, scale in enumerate(self.scales):
            h, ld = scale(h)
            logdet = logdet + ld
            if i < len(self.splits):
                h, z, lp = self.splits[i](h)
                zs.append(z)
                log_prior = log_prior + lp
        zs.append(h)
        return zs, logdet, log_prior

    def encode(self, x: torch.Tensor, y=None) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """x -> (latents z_0..z_{L-1}, Σ log|det J| (B,), Σ prior log-densities (B,)); labels y for a
        class-conditional top prior."""
        zs, logdet, log_prior = self._bijection(x)
        return zs, logdet, log_prior + self.top_prior.log_prob(zs[-1], y)

    def forward(self, x: torch.Tensor, y=None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x -> (latents, log|det dz/dx|): the flow's bijection, one latent per scale.  It never reads
        the labels y (only the top prior's density does), so a class-conditional model encodes any image."""
        zs, logdet, _ = self._bijection(x)
        return zs, logdet

    def log_prob(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """log p(x) in nats, shape (B,): prior log-density of the latents plus log|det J|."""
        _, logdet, log_prior = self.encode(x, y)
        return log_prior + logdet

    def log_prob_parts(self, x: torch.Tensor, y=None) -> LogProbParts:
        """The walk of ``encode`` layer by layer, keeping each scale's log-det and prior term apart,
        with the log-derivatives of its couplings and the log-scales of its ActNorms."""
        terms, log_derivatives = {}, {}
        h = x
        for i, scale in enumerate(self.scales):
            logdet, couplings = zero_logdet(h), []
            for layer in scale:
                if isinstance(layer, Coupling):
                    s = layer.log_scales(h)
                    if s is not None:
                        couplings.append(s.to(logdet.dtype))
                h, ld = layer(h)
                logdet = logdet + ld
            if i < len(self.splits):
                h, _, log_prior = self.splits[i](h)
            else:
                log_prior = self.top_prior.log_prob(h, y)
            terms[f"scale{i}/logdet"], terms[f"scale{i}/prior"] = logdet, log_prior
            actnorms = [layer.log_scale.flatten() for layer in scale if isinstance(layer, ActNorm)]
            if couplings:
                log_derivatives[f"scale{i}/coupling"] = torch.cat(couplings)
            if actnorms:
                log_derivatives[f"scale{i}/actnorm"] = torch.cat(actnorms).to(logdet.dtype)
        return LogProbParts(terms, log_derivatives)

    def compile_units(self) -> list[nn.Module]:
        """Every flow step and every split: identical steps share one compiled graph."""
        return [layer for scale in self.scales for layer in scale] + list(self.splits)

    @torch.no_grad()
    def reconstruction_errors(self, x: torch.Tensor) -> dict[str, float]:
        """max |f_l^{-1}(f_l(h_l)) - h_l| for each scale l on its own input h_l."""
        errors = {}
        h = x
        for i, scale in enumerate(self.scales):
            out, _ = scale(h)
            errors[f"scale{i}"] = float((scale.invert(out).float() - h.float()).abs().max())
            h = self.splits[i](out)[0] if i < len(self.splits) else out
        return errors

    # -- latents -> data -------------------------------------------------------------------
    def decode(self, zs: list[torch.Tensor | None] | None = None, n: int | None = None, y=None,
               temperature: float = 1.0, generator=None, logdet: bool = True
               ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """Top-down inverse.  Latents that are None (or all of them, with ``n``) are drawn from
        their priors at ``temperature``.  Returns (x, the latents used, log|det dx/dz|); with
        ``logdet=False`` the log-determinant is None and no layer spends work on it (``invert``)."""
        num_scales = len(self.scales)
        if zs is None:
            if n is None:
                raise InvalidValueError("decode needs latents zs or a number of samples n")
            zs = [None] * num_scales
        if len(zs) != num_scales:
            raise InvalidValueError(f"expected {num_scales} latents (one per scale), got {len(zs)}")
        used = list(zs)
        h = zs[-1]
        if h is None:
            if n is None:
                raise InvalidValueError("decode needs the top latent or a number of samples n")
            h = self.top_prior.sample(n, temperature, y, generator)
        used[-1] = h
        total = zero_logdet(h) if logdet else None
        for i in reversed(range(num_scales)):
            if i < len(self.splits):
                h, used[i] = self.splits[i].inverse(h, zs[i], temperature, generator)
            if logdet:
                h, ld = self.scales[i].inverse(h)
                total = total + ld
            else:
                h = self.scales[i].invert(h)
        return h, used, total

    def inverse(self, zs: list[torch.Tensor], y=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents -> (x, log|det dx/dz|); the exact inverse of ``forward``."""
        x, _, logdet = self.decode(zs, y=y)
        return x, logdet

    def invert(self, zs: list[torch.Tensor], y=None) -> torch.Tensor:
        """Latents -> x alone, with no log-determinant work (reconstruction, interpolation, editing)."""
        return self.decode(zs, y=y, logdet=False)[0]

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, y=None, generator=None, return_latents: bool = False):
        """Draw n images at ``temperature`` (T multiplies every scale's prior std; T=0 gives the means)."""
        check_temperature(temperature)
        y = labels_for(y, n, next(self.parameters()).device)
        x, zs, _ = self.decode(n=n, y=y, temperature=temperature, generator=generator, logdet=False)
        return (x, zs) if return_latents else x

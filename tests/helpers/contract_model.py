"""A flow that implements the model contract (flowgen.models.base) and nothing else: no scales, no
levels, no splits, one latent tensor.  Every tool must run on it (tests/test_model_contract.py).

    z = (x + b) ⊙ exp(s)                    b, s ∈ R^{C×H×W} learned
    log|det ∂z/∂x| = Σ s
    p(z | y) = N(z; μ_y, I)                 μ_y a learned class mean (0 without classes)
"""

from __future__ import annotations

import torch
from torch import nn

from flowgen.flows.base import logdet_dtype, no_autocast
from flowgen.flows.prior import gaussian_log_prob
from flowgen.models.base import FlowModel, LogProbParts, check_temperature, labels_for


class PixelwiseFlow(FlowModel):
    def __init__(self, in_channels: int, image_size: int, num_classes: int | None = None):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.bias = nn.Parameter(torch.zeros(self.input_shape))
        self.log_scale = nn.Parameter(torch.zeros(self.input_shape))
        self.class_means = nn.Embedding(num_classes, self.bias.numel()) if num_classes else None
        if self.class_means is not None:
            nn.init.zeros_(self.class_means.weight)

    def _logdet(self, x):
        return self.log_scale.to(logdet_dtype(x)).sum().expand(x.shape[0])

    def forward(self, x, y=None):
        with no_autocast(x):
            return (x + self.bias.to(x.dtype)) * self.log_scale.to(x.dtype).exp(), self._logdet(x)

    def inverse(self, latents, y=None):
        with no_autocast(latents):
            x = latents * (-self.log_scale.to(latents.dtype)).exp() - self.bias.to(latents.dtype)
            return x, -self._logdet(latents)

    def _prior_mean(self, z, y):
        if self.class_means is None or y is None:
            return torch.zeros_like(z)
        return self.class_means(labels_for(y, z.shape[0], z.device)).view_as(z).to(z.dtype)

    def log_prob_parts(self, x, y=None):
        z, logdet = self(x)
        mean = self._prior_mean(z, y)
        return LogProbParts({"pixelwise/logdet": logdet, "prior": gaussian_log_prob(z, mean, torch.zeros_like(z))},
                            {"pixelwise": self.log_scale.detach().flatten().to(logdet.dtype)})

    @torch.no_grad()
    def sample(self, n, temperature=1.0, y=None, generator=None):
        check_temperature(temperature)
        device = self.bias.device
        eps = torch.randn((n, *self.input_shape), generator=generator, device=device)
        z = self._prior_mean(eps, y) + temperature * eps
        return self.invert(z, y)

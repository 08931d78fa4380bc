r"""Variational dequantization (Flow++, Ho et al. 2019): a conditional flow q(u | x) on the noise.

The noise u ∈ (0, 1)^D is a learned, pixel-dependent transformation of uniform noise:

    u0 ~ U(0, 1)^D,    e = logit(u0),    e' = f(e; h(x)),    u = σ(e'),

where h(x) is a small conv net on the normalised pixels x/(K-1) - 1/2 (computed once per
draw) and f is a stack of affine checkerboard couplings (RealNVP's bounded scale α·tanh),
each conditioned on h(x).  The logit/sigmoid pair lets the couplings act on all of R^D while
u stays in the unit cube.  By the change of variables, with log U(u0) = 0,

    log q(u | x) = log U(u0) - log|det ∂u/∂u0|
                 = -[ Σ log σ'(e') + log|det ∂f/∂e| - Σ log σ'(e) ],
    log σ'(t)    = log σ(t) + log σ(-t),

since ∂e/∂u0 = 1/(u0 (1 - u0)) = 1/σ'(e).  The training objective is the variational bound

    log P(x) >= E_{u0}[ log p_Y((x + u)/K - 1/2) - log q(u | x) ] - D log K,

differentiable in the parameters of both the model and q (u is a reparametrised sample).
Every coupling's conditioner ends in a zero-initialised convolution, so at initialisation
f is exactly the identity: u = u0, log q = 0, and the objective is the uniform one on the
same noise; training can only tighten the bound from there.

Numerics: this density is part of the likelihood, so the whole noise flow (the conditioners
included) runs in float32 with autocast off, whatever the trainer's precision.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from flowgen.dequantization.base import Dequantization, uniform_noise
from flowgen.errors import InvalidValueError
from flowgen.flows.base import Flow, FlowSequence, no_autocast, sum_except_batch
from flowgen.flows.coupling import Coupling
from flowgen.flows.nets import ResNetConditioner
from flowgen.flows.noise import Generators


def log_sigmoid_derivative(t: torch.Tensor) -> torch.Tensor:
    """log σ'(t) = log σ(t) + log σ(-t), stable for any t (no exp overflow, no log 0)."""
    return F.logsigmoid(t) + F.logsigmoid(-t)


def open_unit_bounds(dtype: torch.dtype) -> tuple[float, float]:
    """(2**-p, 1 - 2**-p) with 2**-p = eps/2: the float just above 0 on the rand grid and the largest float below 1.

    float32: (2**-24, 1 - 2**-24);  float64: (2**-53, 1 - 2**-53).
    """
    tiny = torch.finfo(dtype).eps / 2
    return tiny, 1.0 - tiny


class NoiseFlow(Flow):
    """The bijection u0 ↦ u of (0,1)^D, conditioned on the integer pixels x (pass them as ``cond``).

        forward(u0, cond=x) -> (u,  log|det ∂u/∂u0|)      u  = σ(f(logit(u0); h(x)))
        inverse(u,  cond=x) -> (u0, log|det ∂u0/∂u|)      u0 = σ(f⁻¹(logit(u); h(x)))

    With a uniform base density on the cube, log q(u | x) = -forward's logdet = inverse's
    logdet (``log_prob``).  Conditioners are RealNVP's ResNet (GroupNorm, see
    flowgen.flows.nets.ResNetConditioner) rather than Glow's ActNorm network: GroupNorm
    normalises each image by itself with no data-dependent initialisation, so q has no state
    that depends on which batch it saw first (nothing to all-reduce, nothing the training
    code's ActNorm initialisation pass must reach, no refusal of a zero-variance first batch),
    and it is the same density in train and eval mode, image by image.  ``num_blocks``
    residual blocks per conditioner (default 1) keep q cheap next to the model.

    ``forward`` clamps u to at most the largest float below 1: σ rounds to exactly 1.0 for
    e' above ~17 in float32, and u must stay in [0, 1).  The clamp moves only values that
    rounding already put on 1.0 (a set of negligible measure).
    """

    def __init__(
        self,
        num_levels: int,
        channels: int,
        hidden_channels: int = 32,
        num_couplings: int = 4,
        feature_channels: int = 16,
        num_blocks: int = 1,
    ):
        super().__init__()
        for name, value in (("channels", channels), ("hidden_channels", hidden_channels),
                            ("num_couplings", num_couplings), ("feature_channels", feature_channels),
                            ("num_blocks", num_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
            raise InvalidValueError(f"num_levels (K) must be an integer >= 2, got {num_levels!r}")
        self.num_levels, self.channels = num_levels, channels
        # h(x): features of the pixels shared by every coupling
        self.feature_net = nn.Sequential(
            nn.Conv2d(channels, feature_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(feature_channels, feature_channels, 3, padding=1),
            nn.ReLU(),
        )
        conditioner = partial(ResNetConditioner, hidden_channels=hidden_channels, num_blocks=num_blocks)
        self.couplings = FlowSequence([
            Coupling(channels, conditioner, transform="affine", scale="tanh", mask="checkerboard",
                     parity=i % 2, cond_channels=feature_channels)
            for i in range(num_couplings)
        ])

    def features(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """h(x) from the normalised pixels x/(K-1) - 1/2 ∈ [-1/2, 1/2]."""
        if x is None:
            raise InvalidValueError("NoiseFlow is conditional: pass the integer pixels x as cond")
        if x.shape[1] != self.channels:
            raise InvalidValueError(f"NoiseFlow was built for {self.channels} channel(s), got images with {x.shape[1]}")
        return self.feature_net(x.to(dtype) / (self.num_levels - 1) - 0.5)

    def forward(self, u0, cond=None):
        with no_autocast(u0):
            h = self.features(cond, u0.dtype)
            e = torch.log(u0) - torch.log1p(-u0)  # logit
            e_out, logdet_f = self.couplings(e, h)
            u = torch.clamp(torch.sigmoid(e_out), max=open_unit_bounds(u0.dtype)[1])
            logdet = sum_except_batch(log_sigmoid_derivative(e_out)) + logdet_f \
                - sum_except_batch(log_sigmoid_derivative(e))
            return u, logdet

    def inverse(self, u, cond=None):
        with no_autocast(u):
            h = self.features(cond, u.dtype)
            e_out = torch.log(u) - torch.log1p(-u)
            e, logdet_f_inv = self.couplings.inverse(e_out, h)
            u0 = torch.sigmoid(e)
            logdet = sum_except_batch(log_sigmoid_derivative(e)) + logdet_f_inv \
                - sum_except_batch(log_sigmoid_derivative(e_out))
            return u0, logdet

    def log_prob(self, u: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """log q(u | x) = log U(u0) + log|det ∂u0/∂u| = inverse's logdet, for u in (0, 1)^D."""
        return self.inverse(u, cond)[1]


class VariationalDequantization(Dequantization):
    """Flow++ dequantization: u ~ q(u | x) given by a ``NoiseFlow`` of uniform noise (module docstring).

    Its parameters are ordinary nn.Parameters trained jointly with the model through the
    bound E[log p(y) - log q(u|x)] - D log K; ``forward`` returns (y, log q(u|x)).
    ``flow_options``: the ``NoiseFlow``'s sizes (hidden_channels, num_couplings, feature_channels, num_blocks).
    """

    def __init__(self, num_levels: int, channels: int, **flow_options):
        super().__init__(num_levels)
        self.flow = NoiseFlow(num_levels, channels, **flow_options)

    def draw_noise(self, x: torch.Tensor, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 unless the module was converted to float64 (exactness tests)
        dtype = torch.float64 if self.flow.feature_net[0].weight.dtype == torch.float64 else torch.float32
        with no_autocast(x):
            # torch.rand can return exactly 0 (logit(0) = -inf); the clamp moves only that one
            # grid value (probability 2**-24 per pixel in float32) to the next one, 2**-24.
            # The upper bound is torch.rand's own maximum in float32, so it never binds there.
            u0 = uniform_noise(x, generator, dtype)
            u0 = torch.clamp(u0, *open_unit_bounds(dtype))
            u, logdet = self.flow(u0, x)
        return u, -logdet  # log q(u|x) = log U(u0) - log|det ∂u/∂u0|, with log U(u0) = 0

    def log_q(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log q(u | x) of a given noise u ∈ (0, 1)^D (through the exact inverse)."""
        return self.flow.log_prob(u, x)

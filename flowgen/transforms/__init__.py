"""Elementwise bijections as objects, shared by coupling, masked-autoregressive and TarFlow layers.

A layer's conditioner network predicts, for every element x_i it transforms, ``num_params``
unconstrained numbers h_i; the transform maps x_i with them:

    additive (NICE)        z = x + t                          log z'(x) = 0
    affine, sigmoid (Glow) z = (x + t) · σ(h_s + 2)           log z'(x) = log σ(h_s + 2)
    affine, tanh (RealNVP) z = x · exp(α · tanh(h_s)) + t     log z'(x) = α · tanh(h_s)     (α learned)
    affine, exp (MAF, TarFlow)
                           z = (x + t) · exp(h_s)             log z'(x) = h_s               (unbounded;
                                                              TarFlow's (x - μ)·exp(-a) with μ = -t, a = -h_s)
    spline (NSF)           z = RQS_h(x)                       log z'(x) = log RQS_h'(x)     (``transforms.splines``)

Every transform is the identity at h = 0 except Glow's sigmoid scale, which starts at
σ(2) ≈ 0.88, as in openai/glow: a zero-initialised conditioner starts every layer at (or near)
the identity.  The parameters come as one tensor ``params`` of shape (*x.shape, num_params):
the layer rearranges its network's output so that the last axis holds one element's numbers.

    forward(x, params)  -> (z, log z'(x))           elementwise, same shape as x
    inverse(z, params)  -> (x, log x'(z))           = (f^{-1}(z), -log f'(x))
    invert(z, params)   -> x                        the inverse alone, no log-derivative work
    log_derivative(x, params) -> log f'(x)          for diagnostics

A log-derivative that is identically zero (additive) is returned as None, so that callers
skip a pass over the activations.  The arithmetic runs in the dtype of x; callers keep it in
float32 (autocast off) as the numerics policy asks.  Adding a transform is one class here,
one entry in ``TRANSFORMS`` and one case in tests/test_transforms.py.

May import: torch, ``flowgen.errors``, ``flowgen.checks``; imported by flows, models, the playground and the schemas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flowgen.errors import InvalidValueError
from flowgen.transforms.splines import num_spline_params, rational_quadratic_spline

AFFINE_SCALES = ("sigmoid", "tanh", "exp")


@dataclass(frozen=True)
class TransformOptions:
    """Everything a layer may tell a transform about itself; each transform reads what it needs.

    scale: the affine scale parametrisation (``AFFINE_SCALES``).
    alpha_shape: shape of the α of the tanh scale, broadcast against x (e.g. (C, 1, 1): one α per
        channel of an image; (D,): one per coordinate of a vector).
    alpha: the tanh scale's α at initialisation (the bound |log scale| < α); ``learn_alpha=False``
        keeps it fixed (a buffer), as the 2-D playground's scale bound.
    spline_bins, spline_bound: K bins on [-B, B] of the spline; the identity outside.
    """

    scale: str = "sigmoid"
    alpha_shape: tuple[int, ...] = (1,)
    alpha: float = 1.0
    learn_alpha: bool = True
    spline_bins: int = 8
    spline_bound: float = 3.0


class ElementwiseTransform(nn.Module):
    """Base class: a monotone bijection of each element given its own parameters (module docstring)."""

    num_params: int

    @classmethod
    def from_options(cls, options: TransformOptions) -> ElementwiseTransform:
        return cls()

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError  # pragma: no cover

    def inverse(self, z: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError  # pragma: no cover

    def invert(self, z: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return self.inverse(z, params)[0]

    def log_derivative(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor | None:
        return self.forward(x, params)[1]


class Additive(ElementwiseTransform):
    """z = x + t (NICE): volume preserving, log z'(x) = 0 (returned as None)."""

    num_params = 1

    def forward(self, x, params):
        return x + params[..., 0], None

    def inverse(self, z, params):
        return z - params[..., 0], None


class Affine(ElementwiseTransform):
    """z = (x + t)·e^s (sigmoid, exp) or x·e^s + t (tanh), log z'(x) = s; s from ``scale`` (module docstring)."""

    num_params = 2

    def __init__(self, scale: str = "sigmoid", alpha_shape: tuple[int, ...] = (1,), alpha: float = 1.0,
                 learn_alpha: bool = True):
        super().__init__()
        if scale not in AFFINE_SCALES:
            raise InvalidValueError(f"unknown affine scale {scale!r}; choose one of {', '.join(AFFINE_SCALES)}")
        self.scale = scale
        if scale == "tanh":
            if not float(alpha) > 0:
                raise InvalidValueError(f"the tanh scale's alpha must be > 0, got {alpha!r}")
            initial = torch.full(tuple(alpha_shape), float(alpha))
            if learn_alpha:
                self.alpha = nn.Parameter(initial)
            else:
                self.register_buffer("alpha", initial)

    @classmethod
    def from_options(cls, options):
        return cls(options.scale, options.alpha_shape, options.alpha, options.learn_alpha)

    def shift_and_log_scale(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, raw = params[..., 0], params[..., 1]
        if self.scale == "sigmoid":
            return shift, F.logsigmoid(raw + 2.0)
        if self.scale == "tanh":
            return shift, self.alpha.to(raw.dtype) * torch.tanh(raw)
        return shift, raw

    def forward(self, x, params):
        shift, log_scale = self.shift_and_log_scale(params)
        if self.scale == "tanh":
            return x * log_scale.exp() + shift, log_scale
        return (x + shift) * log_scale.exp(), log_scale

    def inverse(self, z, params):
        shift, log_scale = self.shift_and_log_scale(params)
        return self._invert(z, shift, log_scale), -log_scale

    def invert(self, z, params):
        return self._invert(z, *self.shift_and_log_scale(params))

    def _invert(self, z, shift, log_scale):
        inverse_scale = (-log_scale).exp()
        if self.scale == "tanh":
            return (z - shift) * inverse_scale
        return z * inverse_scale - shift


class Spline(ElementwiseTransform):
    """z = RQS_h(x): monotone rational-quadratic spline with K bins on [-B, B], the identity outside."""

    def __init__(self, bins: int = 8, bound: float = 3.0):
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2 or not float(bound) > 0:
            raise InvalidValueError(f"a spline needs spline_bins >= 2 and spline_bound > 0, got {bins!r} and {bound!r}")
        self.bins, self.bound = bins, float(bound)
        self.num_params = num_spline_params(bins)

    @classmethod
    def from_options(cls, options):
        return cls(options.spline_bins, options.spline_bound)

    def _spline(self, x, params, inverse: bool, derivative: bool = True):
        k = self.bins
        return rational_quadratic_spline(x, params[..., :k], params[..., k : 2 * k], params[..., 2 * k :],
                                         bound=self.bound, inverse=inverse, derivative=derivative)

    def forward(self, x, params):
        return self._spline(x, params, inverse=False)

    def inverse(self, z, params):
        return self._spline(z, params, inverse=True)

    def invert(self, z, params):
        return self._spline(z, params, inverse=True, derivative=False)[0]


# the one registry of transform names: models, configs (schema enums) and the benchmark read it
TRANSFORMS: dict[str, type[ElementwiseTransform]] = {"affine": Affine, "additive": Additive, "spline": Spline}


def make_transform(name: str, options: TransformOptions | None = None) -> ElementwiseTransform:
    """The transform registered as ``name``, built from the options it reads."""
    if name not in TRANSFORMS:
        raise InvalidValueError(f"unknown transform {name!r}; choose one of {', '.join(TRANSFORMS)}")
    return TRANSFORMS[name].from_options(options or TransformOptions())

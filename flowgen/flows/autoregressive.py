"""Masked autoregressive flows on (B, D) vectors: MAF (Papamakarios et al. 2017) and IAF (Kingma et al. 2016).

An ordering π of the D elements (``order``: π(k) is the element that comes k-th) and a MADE
conditioner h (Germain et al. 2015) give every element i its transform's parameters from the
elements before it in that order only:  h_i(v) = h_i(v_<i),  where "<i" means "earlier in π".
With f_h any elementwise transform of ``flowgen.transforms`` (additive, affine, spline):

    MAF   forward  (data → latent, density)   z_i = f(x_i; h_i(x_<i))         ONE pass of h
          inverse  (latent → data, sampling)  x_i = f^{-1}(z_i; h_i(x_<i))    D passes, element by element

    IAF   inverse  (latent → data, sampling)  x_i = f(z_i; h_i(z_<i))         ONE pass of h
          forward  (data → latent, density)   z_i = f^{-1}(x_i; h_i(z_<i))    D passes, element by element

so an IAF layer is exactly the inverse of a MAF layer with the same conditioner: MAF makes the
density cheap and sampling D times dearer, IAF the opposite.  In both, output i depends on its own
input and on the elements before it only, so the Jacobian is triangular (in the order π) and

    MAF   log|det ∂z/∂x| =  Σ_i log f'(x_i; h_i(x_<i))
    IAF   log|det ∂z/∂x| = -Σ_i log f'(z_i; h_i(z_<i))       = Σ_i log (f^{-1})'(x_i; h_i(z_<i))

and ``inverse`` returns minus these.  The sequential direction runs D passes: pass k computes h from
the current estimate, in which the elements π(0..k-1) are already exact, so element π(k)'s
parameters are exact too and π(k) is written; after pass D-1 every parameter is exact and the last
pass's output (and its log-derivatives) is the answer.  Elements not yet solved keep 0 (never a value
a wrong parameter produced), so a huge or infinite intermediate cannot reach a solved element as
0 · inf = NaN through a masked weight.  ``invert`` (sampling, reconstruction) sums no log-derivatives:
MAF's D passes use the transform's ``invert``; IAF's one pass is the transform's forward, which
returns its elementwise log-derivative with the value (one op for affine), left unused.

MADE (``MADE`` below): masked linear layers.  Input element i gets the degree m(i) = 1 + its position
in π; hidden units get degrees cycling through 1..D-1 (deterministic, so a layer is the same on
every rank and after reloading); a hidden unit of degree m sees the units below it of degree <= m,
an output of element i sees the hidden units of degree < m(i).  So output i is a function of the
inputs of degree < m(i): the elements before i.  A context ``cond`` (B, C) enters the first layer
with degree 0; with a context the hidden degrees cycle through 0..D-1, so that the first element
(whose outputs see only degree-0 units) depends on the context too.  The last layer is
zero-initialised: every parameter is 0 and the layer starts as the identity (Glow's sigmoid scale:
at the contraction σ(2) ≈ 0.88, see ``flowgen.transforms``).

Output layout: MADE's D·P outputs (P = ``transform.num_params``) hold parameter p of element i at
p·D + i (parameter-major, as ``Coupling``'s channels), rearranged to (B, D, P) for the transform.

Numerics: the conditioner may run under autocast (bf16); its output is cast to the input's dtype
and the elementwise maps and log-derivative sums run with autocast off (float32, float64 in tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from flowgen.errors import InvalidValueError
from flowgen.flows.base import Flow, no_autocast, sum_except_batch, zero_logdet
from flowgen.transforms import TRANSFORMS, ElementwiseTransform, TransformOptions, make_transform

DIRECTIONS = ("maf", "iaf")


def input_order(dim: int, order: None | str | torch.Tensor | list[int]) -> torch.Tensor:
    """π as a (D,) long tensor: None = 0, 1, ..., D-1; "reverse" = D-1, ..., 0; or a permutation of 0..D-1."""
    if order is None:
        return torch.arange(dim)
    if isinstance(order, str):
        if order != "reverse":
            raise InvalidValueError(f"unknown order {order!r}; give None, 'reverse' or a permutation of 0..{dim - 1}")
        return torch.arange(dim - 1, -1, -1)
    perm = torch.as_tensor(order).long().flatten()
    if perm.numel() != dim or not torch.equal(perm.sort().values, torch.arange(dim)):
        raise InvalidValueError(f"order must be a permutation of 0..{dim - 1}, got {perm.tolist()}")
    return perm


def made_degrees(order: torch.Tensor, hidden: int, context: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input degrees (D,), hidden degrees (H,)): m(π(k)) = k + 1; hidden cycle through lo..D-1, lo = 0 with a
    context (units that see only the context, feeding the first element) else 1."""
    dim = order.numel()
    inputs = torch.empty(dim, dtype=torch.long)
    inputs[order] = torch.arange(1, dim + 1)
    low = 0 if context else 1
    high = max(dim - 1, low)  # D = 1 without a context: one degree, units the output never sees
    return inputs, low + torch.arange(hidden) % (high - low + 1)


class MaskedLinear(nn.Linear):
    """y = (W ⊙ M) v + b with a fixed 0/1 mask M (out, in): the connections MADE forbids stay zero."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return F.linear(v, self.weight * self.mask.to(self.weight.dtype), self.bias)


class MADE(nn.Module):
    """The masked conditioner: (B, D) [+ context (B, C)] → (B, D·P) with output p·D + i a function of v_<i only.

    ``num_hidden_layers`` masked layers of width ``hidden`` with SiLU (smooth, so the learned density
    is smooth), then a zero-initialised masked output layer.
    """

    def __init__(self, order: torch.Tensor, hidden: int, num_params: int, num_hidden_layers: int = 2,
                 cond_features: int = 0):
        super().__init__()
        dim = order.numel()
        self.dim, self.num_params, self.cond_features = dim, num_params, cond_features
        inputs, degrees = made_degrees(order, hidden, context=cond_features > 0)
        # the context has degree 0: every unit of degree >= 0 (all of them) may see it
        below = torch.cat([inputs, torch.zeros(cond_features, dtype=torch.long)])
        layers: list[nn.Module] = []
        for _ in range(num_hidden_layers):
            layers += [MaskedLinear(below.numel(), hidden, degrees[:, None] >= below[None, :]), nn.SiLU()]
            below = degrees
        outputs = inputs.repeat(num_params)  # output p·D + i belongs to element i
        self.out = MaskedLinear(below.numel(), dim * num_params, outputs[:, None] > below[None, :])
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.hidden = nn.Sequential(*layers)

    def forward(self, v: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            v = torch.cat([v, cond.to(v.dtype)], dim=1)
        return self.out(self.hidden(v))


class MaskedAutoregressive(Flow):
    """A MAF or IAF layer (module docstring) with any transform of ``flowgen.transforms`` on (B, D) vectors.

    transform: a name in ``TRANSFORMS``, which ``options`` configures (affine scale, spline bins and bound),
        or a ready ``ElementwiseTransform`` (then no options).
        The default affine scale is "tanh" (RealNVP's α·tanh(h), one learned α per element): the layer
        starts exactly at the identity and every layer's log-scale stays within ±|α|, which keeps deep
        stacks and the D-pass inversion stable.  MAF's own unbounded exp(h) (``scale="exp"``) and Glow's
        σ(h + 2) are options.
    direction: "maf" (density in one pass) or "iaf" (sampling in one pass).
    order: the autoregressive order π: None (0..D-1), "reverse", or a permutation of 0..D-1 (tensor or list);
        alternate it between stacked layers so that every element gets to condition on every other.
    cond_features: width C of an optional context ``cond`` (B, C) that every element's parameters see.
    """

    def __init__(self, dim: int, hidden: int, transform: str | ElementwiseTransform = "affine", direction: str = "maf",
                 num_hidden_layers: int = 2, order: None | str | torch.Tensor | list[int] = None,
                 options: TransformOptions | None = None, cond_features: int = 0):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise InvalidValueError(f"dim must be an integer >= 1, got {dim!r}")
        if direction not in DIRECTIONS:
            raise InvalidValueError(f"unknown direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
        if isinstance(transform, ElementwiseTransform):
            if options is not None:
                raise InvalidValueError("give options with a transform name, not with a ready transform")
        elif transform not in TRANSFORMS:
            raise InvalidValueError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
        if isinstance(num_hidden_layers, bool) or not isinstance(num_hidden_layers, int) or num_hidden_layers < 1:
            raise InvalidValueError(f"num_hidden_layers must be an integer >= 1, got {num_hidden_layers!r}")
        if isinstance(cond_features, bool) or not isinstance(cond_features, int) or cond_features < 0:
            raise InvalidValueError(f"cond_features must be an integer >= 0, got {cond_features!r}")
        # every degree must occur among the hidden units, or some element loses some of its predecessors
        needed = dim if cond_features else dim - 1
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < max(needed, 1):
            raise InvalidValueError(f"hidden must be an integer >= {max(needed, 1)} for dim={dim}, got {hidden!r}")
        self.dim, self.direction = dim, direction
        self.register_buffer("order", input_order(dim, order), persistent=False)
        if not isinstance(transform, ElementwiseTransform):
            transform = make_transform(transform, options or TransformOptions(scale="tanh", alpha_shape=(dim,)))
        self.transform = transform
        self.made = MADE(self.order, hidden, self.transform.num_params, num_hidden_layers, cond_features)

    # -- the conditioner and the elementwise map ---------------------------------------------------
    def _params(self, v: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """(B, D, P) parameters of every element from v's earlier elements, in v's dtype (the net may run in bf16)."""
        if (cond is None) != (self.made.cond_features == 0):
            raise InvalidValueError(f"this layer takes a context of {self.made.cond_features} features; got "
                             f"{'none' if cond is None else tuple(cond.shape)}")
        h = self.made(v, cond).to(v.dtype)
        return rearrange(h, "b (p d) -> b d p", p=self.transform.num_params)

    def _logdet(self, v: torch.Tensor, log_derivative: torch.Tensor | None) -> torch.Tensor:
        if log_derivative is None:  # additive: volume preserving
            return zero_logdet(v)
        return sum_except_batch(log_derivative)

    def _check(self, v: torch.Tensor) -> None:
        if v.dim() != 2 or v.shape[1] != self.dim:
            raise InvalidValueError(f"expected (B, {self.dim}) vectors, got shape {tuple(v.shape)}")

    # -- one pass: f (MAF forward, IAF inverse) ----------------------------------------------------
    def _one_pass(self, v, cond, derivative: bool):
        """w = f(v; h(v)) and log f'(v) (None if not asked for, or additive)."""
        params = self._params(v, cond)
        with no_autocast(v):
            w, log_derivative = self.transform(v, params)  # the transforms offer no forward without it
            return w, log_derivative if derivative else None

    # -- D passes: f^{-1} (MAF inverse, IAF forward) -----------------------------------------------
    def _sequential(self, w, cond, derivative: bool):
        """v with w = f(v; h(v)), element by element in the order π; and log (f^{-1})'(w) (None if not asked)."""
        v = torch.zeros_like(w)
        for k in range(self.dim - 1):
            params = self._params(v, cond)
            with no_autocast(w):
                solved = self.transform.invert(w, params)  # exact at π(0..k); the rest is discarded
            i = self.order[k : k + 1]
            v = v.index_copy(1, i, solved.index_select(1, i))
        params = self._params(v, cond)  # now every parameter is exact
        with no_autocast(w):
            if derivative:
                return self.transform.inverse(w, params)
            return self.transform.invert(w, params), None

    # -- the layer contract ------------------------------------------------------------------------
    def _map(self, v, cond, one_pass: bool, derivative: bool):
        """The transform of v in one pass (given every input, the parameters are exact at once) or in D."""
        self._check(v)
        return (self._one_pass if one_pass else self._sequential)(v, cond, derivative=derivative)

    def forward(self, x, cond=None):
        """x → z: MAF in one pass, IAF in D passes; logdet = log|det ∂z/∂x| (module docstring)."""
        z, log_derivative = self._map(x, cond, one_pass=self.direction == "maf", derivative=True)
        with no_autocast(x):
            return z, self._logdet(x, log_derivative)

    def inverse(self, z, cond=None):
        """z → x: MAF in D passes, IAF in one pass; logdet = log|det ∂x/∂z| = minus forward's."""
        x, log_derivative = self._map(z, cond, one_pass=self.direction == "iaf", derivative=True)
        with no_autocast(z):
            return x, self._logdet(z, log_derivative)

    def invert(self, z, cond=None):
        """x alone (sampling): the transform's ``invert`` (MAF) or forward value (IAF), no log-derivative sum."""
        return self._map(z, cond, one_pass=self.direction == "iaf", derivative=False)[0]

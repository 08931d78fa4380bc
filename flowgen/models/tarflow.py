r"""TarFlow (Zhai et al., "Normalizing Flows are Capable Generative Models", ICML 2025).

A masked autoregressive flow whose conditioner is a causal transformer over image patches.

Tokens.  The image x (C, H, W) is cut into p x p patches, row by row, giving a sequence of
T = (H/p)(W/p) tokens of dimension d = C·p·p (``patchify``; ``unpatchify`` undoes it exactly).

Flow block k (k = 0 is applied first, on the data side).  In the block's order (the patch order
for even k, reversed for odd k, so that every token gets to condition on every other one) the
block maps the tokens h_0..h_{T-1} to z_0..z_{T-1} with an elementwise transform f of
``flowgen.transforms``:

    z_0 = f(h_0; θ_0)                   θ_0: learned, depends on no data (zero-initialised)
    z_i = f(h_i; θ_i),  θ_i = W_out · Transformer(W_in h_{<i} + e_pos + e_class)_{i-1},   i = 1..T-1

The transformer is causal (pre-norm layers of attention + MLP, ``scaled_dot_product_attention``
with a causal mask), and its outputs are shifted by one token: the output at position i-1, which
has seen h_0..h_{i-1}, parametrises token i.  So z_i depends on h_{<=i} only, the Jacobian is block
lower-triangular in the block's order with diagonal blocks diag(f'(h_ij)), and

    log|det ∂z/∂h| = Σ_i Σ_j log f'(h_ij; θ_ij).

ml-tarflow (apple/ml-tarflow, transformer_flow.py) pads the shifted outputs with zeros, i.e. its
first token is always transformed by the identity; here θ_0 is a learned parameter vector that
starts at zero (the identity for every transform but Glow's sigmoid scale), so the model starts
exactly where ml-tarflow's does and may learn a per-element affine/spline map of the first token.
W_out (weight and bias) is zero-initialised, so every block starts as the identity (ml-tarflow
zeroes only the weight).  The default transform is ml-tarflow's affine z = (h - μ)·exp(-a),
which is ``flowgen.transforms``' affine with scale "exp" (shift t = -μ, log-scale -a).  Positional
embeddings belong to the positions of the block's sequence (ml-tarflow flips them with the tokens:
the same family of maps, parametrised differently).

The model:  x → patchify → block 0 → … → block K-1 → unpatchify → z ~ N(0, I), and

    log p(x | c) = log N(z; 0, I) + Σ_k log|det ∂h_{k+1}/∂h_k|.

Class conditioning (``num_classes``): every block adds a class embedding e_class(c) to every
token; index ``num_classes`` is the null class ∅, a learned row (an unconditional model sharing the
weights; ml-tarflow uses the mean of the class embeddings in its place).
In training mode ``log_prob`` replaces each label by ∅ with probability ``label_drop`` (classifier-
free guidance training); ``forward``/``inverse`` are the exact bijection for the labels given
(∅ when y is None).

Inverse (sampling).  Each block's inverse is sequential, token after token in the block's order:

    h_0 = f^{-1}(z_0; θ_0),    h_i = f^{-1}(z_i; θ_i(h_{<i})),   i = 1..T-1.

``inverse_method`` chooses how:
  "sequential"          T-1 transformer passes of ONE token each, with a key/value cache: the keys and
                        values of h_0..h_{i-1} are kept per layer, so step i costs one token's work.
                        Exact (equal to the uncached inverse to float rounding).  The default.
  "sequential_uncached" the same recursion, recomputing the transformer on the whole prefix h_{<i} at
                        every step (O(T²) token passes): the reference the cached one is tested against.
  "jacobi"              fixed-point iteration of all tokens of a segment in parallel (Song et al. 2021;
                        Gauss-Seidel-Jacobi of Liu & Qin 2025 with ``jacobi_segments`` > 1): the
                        sequence is cut into S segments, solved one after the other (Gauss-Seidel);
                        within segment [a, b), with h_{<a} already solved and the initial guess h^0 = z,
                            h^{n+1}_{a:b} = f^{-1}(z_{a:b}; θ_{a:b}(h^n_{<b})),
                        one full causal pass per iteration.  Because θ_i depends on h_{<i} only, after
                        n iterations the first n tokens of the segment are exact: the iteration
                        reaches the sequential inverse in at most b - a iterations (the default cap,
                        ``jacobi_max_iterations=None``), and stops earlier once max |h^{n+1} - h^n| <=
                        ``jacobi_tolerance``: a step-size test, not an error bound, so with a tolerance
                        > 0 the result is approximate (tests: within 100x the tolerance of the
                        sequential inverse; measured below 0.2x).  Unsolved iterates that overflow
                        are restarted from z (``_tame``), which never changes a solved token.

Classifier-free guidance (sampling only, as ml-tarflow's ``MetaBlock.reverse``): the transform
parameters of every token are predicted for the label c and for ∅ and combined,

    θ̃_i = θ_i(c) + w_i (θ_i(c) - θ_i(∅)),   w_i = w, or w·i/(T-1) with ``guidance_annealed``,

(i: position in the block's order; θ_0 has no label, so w has no effect on it).  w = 0 is plain
conditional sampling.  The guided sampler is not the inverse of ``forward`` any more.

Noise augmentation and denoising.  A model trained on inputs with Gaussian noise of std σ
(``noise_std``, see ``flowgen.dequantization.gaussian_noise`` for the likelihood bound) samples noisy images;
``denoise`` moves a sample to the posterior mean of the clean input by Tweedie's formula,
x + σ² ∇_x log p(x | c), with the model's own score (ml-tarflow's evaluate_fid.py / sample.ipynb).

Numerics: the transformer may run under autocast (bf16); its outputs are cast to float32 (float64
for float64 inputs) and the elementwise maps, log-derivative sums and the prior run with autocast
off.  Memory: ``memory="checkpoint"`` recomputes each block's transformer in backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from flowgen.errors import InvalidValueError
from flowgen.flows.base import logdet_dtype, no_autocast, sum_except_batch, zero_logdet
from flowgen.flows.prior import standard_normal_log_prob
from flowgen.models.base import (
    FlowModel,
    LogProbParts,
    NullClassConditioning,
    check_temperature,
    latent_list,
)
from flowgen.models.validation import check_choice, check_image_size, check_positive
from flowgen.transforms import AFFINE_SCALES, TRANSFORMS, TransformOptions, make_transform

INVERSE_METHODS = ("sequential", "sequential_uncached", "jacobi")
TARFLOW_MEMORY_MODES = ("standard", "checkpoint")
JACOBI_GUESS_BOUND = 1e4  # |value| beyond which a not yet solved Jacobi iterate is restarted (model units)


# ---------------------------------------------------------------------------------- patches


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, C·p·p): patches row by row, each patch's numbers channel-major."""
    return rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=patch_size, q=patch_size)


def unpatchify(tokens: torch.Tensor, patch_size: int, image_size: int) -> torch.Tensor:
    """(B, T, C·p·p) -> (B, C, H, W): the exact inverse of ``patchify``."""
    n = image_size // patch_size
    return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=n, w=n, p=patch_size, q=patch_size)


# ---------------------------------------------------------------------------------- the transformer


class KVCache:
    """Keys and values of the tokens a block has seen so far, per layer, in preallocated buffers.

    The sequential inverse feeds one token per step; attention of that token needs the keys and
    values of all earlier ones, which never change once computed (causality), so they are kept.
    """

    def __init__(self, num_layers: int, capacity: int):
        self.capacity, self.length = capacity, 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new token's (B, heads, 1, d) key and value; return all keys and values so far."""
        if self.keys[layer] is None:
            shape = (*k.shape[:2], self.capacity, k.shape[-1])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        self.keys[layer][:, :, self.length] = k[:, :, 0]
        self.values[layer][:, :, self.length] = v[:, :, 0]
        return self.keys[layer][:, :, : self.length + 1], self.values[layer][:, :, : self.length + 1]

    def advance(self) -> None:
        """The step's token went through every layer: the next one goes one position further."""
        self.length += 1


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which token i attends to tokens <= i (softmax(q kᵀ/√d_head) v)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(h), "b t (three n d) -> three b n t d", three=3, n=self.num_heads)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # one new token that attends to every cached one and itself: no mask
            k, v = cache.extend(layer, k, v)
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b n t d -> b t (n d)"))


class TransformerLayer(nn.Module):
    """Pre-norm layer: h + Attn(LN(h)), then h + MLP(LN(h)) with MLP = Linear -> GELU -> Linear."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, h: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        h = h + self.attention(self.norm1(h), cache, layer)
        return h + self.mlp(self.norm2(h))


# ---------------------------------------------------------------------------------- one flow block


@dataclass(frozen=True)
class InverseOptions:
    """How a block is inverted (module docstring): method, guidance and the Jacobi settings."""

    method: str = "sequential"
    guidance: float = 0.0
    guidance_annealed: bool = False
    jacobi_segments: int = 1
    jacobi_max_iterations: int | None = None
    jacobi_tolerance: float = 1e-5


class TarFlowBlock(nn.Module):
    """One autoregressive flow block on token sequences (B, T, d) given in patch order.

    forward(x, cond=None) -> (z, log|det ∂z/∂x|)     one causal transformer pass
    inverse(z, cond=None) -> (x, log|det ∂x/∂z|)     sequential (or Jacobi), see the module docstring
    invert(z, cond=None)  -> x
    ``cond``: labels (B,) long, ∅ = ``num_classes``; ignored by an unconditional block.
    """

    def __init__(self, token_dim: int, num_tokens: int, width: int, num_layers: int, num_heads: int,
                 mlp_ratio: int, transform: str, transform_options: TransformOptions, reverse: bool,
                 num_classes: int | None = None):
        super().__init__()
        self.token_dim, self.num_tokens, self.reverse, self.num_classes = token_dim, num_tokens, reverse, num_classes
        self.transform = make_transform(transform, transform_options)
        self.num_params = self.transform.num_params
        self.proj_in = nn.Linear(token_dim, width)
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, width) * 1e-2)  # ml-tarflow's init
        # rows 0..num_classes-1: the classes; row num_classes: the null class ∅
        self.class_embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=1e-2)
        self.layers = nn.ModuleList([TransformerLayer(width, num_heads, mlp_ratio) for _ in range(num_layers)])
        self.proj_out = nn.Linear(width, token_dim * self.num_params)
        nn.init.zeros_(self.proj_out.weight)  # zero-initialised: the block starts as the identity
        nn.init.zeros_(self.proj_out.bias)
        self.first_params = nn.Parameter(torch.zeros(token_dim, self.num_params))  # θ_0 of the first token

    # -- the block's order: patch order, or reversed in alternate blocks ------------------------
    def order(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch order <-> block order (reversing is its own inverse)."""
        return tokens.flip(1) if self.reverse else tokens

    # -- the conditioner ----------------------------------------------------------------------
    def _embed(self, h: torch.Tensor, positions: slice, cond: torch.Tensor | None) -> torch.Tensor:
        e = self.proj_in(h) + self.pos_embed[positions]
        if self.class_embed is not None:
            e = e + self.class_embed(cond)[:, None]
        return e

    def _raw_params(self, e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """proj_out of the transformer's output, (B, L, d, P) in ``dtype`` (float32 even under autocast)."""
        return rearrange(self.proj_out(e), "b t (p d) -> b t d p", p=self.num_params).to(dtype)

    def net_params(self, h: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The transformer on all of h (B, L, d), block order: output j (B, L, d, P) parametrises token j+1."""
        e = self._embed(h, slice(0, h.shape[1]), cond)
        for layer in self.layers:
            e = layer(e)
        return self._raw_params(e, logdet_dtype(h))

    def token_params(self, h: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """θ_0..θ_{L-1} of the tokens h (B, L, d) in block order: θ_0, then one causal pass over h_0..h_{L-2}
        (the output after h_{L-1} would parametrise a token beyond h, so h_{L-1} does not go in)."""
        first = self.first_params.to(logdet_dtype(h)).expand(h.shape[0], 1, -1, -1)
        if h.shape[1] == 1:
            return first
        return torch.cat([first, self.net_params(h[:, :-1], cond)], dim=1)

    def _step_params(self, h_prev: torch.Tensor, cond: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """θ_i from the one new token h_{i-1} (B, d) and the cache of h_{<i-1}: (B, d, P)."""
        position = cache.length
        e = self._embed(h_prev[:, None], slice(position, position + 1), cond)
        for index, layer in enumerate(self.layers):
            e = layer(e, cache, index)
        cache.advance()
        return self._raw_params(e, logdet_dtype(h_prev))[:, 0]

    def _guidance_weights(self, options: InverseOptions, positions: torch.Tensor) -> torch.Tensor | float:
        if not options.guidance_annealed:
            return options.guidance
        return options.guidance * positions.to(torch.float64) / max(self.num_tokens - 1, 1)

    def _guided(self, params: torch.Tensor, options: InverseOptions, positions: torch.Tensor) -> torch.Tensor:
        """θ(c) + w (θ(c) - θ(∅)) from params of the doubled batch [c; ∅] (first axis), positions on axis 1."""
        conditional, unconditional = params.chunk(2)
        w = self._guidance_weights(options, positions)
        if isinstance(w, torch.Tensor):
            w = w.to(params.device, params.dtype).view(1, -1, *([1] * (params.dim() - 2)))
        return conditional + w * (conditional - unconditional)

    # -- data -> latent -------------------------------------------------------------------------
    def transform_tokens(self, x: torch.Tensor, cond: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z, elementwise log f'(h) in block order, or None for additive): the block without the sum."""
        h = self.order(x)
        params = self.token_params(h, cond)
        with no_autocast(h):
            z, log_derivative = self.transform(h.to(params.dtype), params)
        return self.order(z), log_derivative

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_derivative = self.transform_tokens(x, cond)
        if log_derivative is None:
            return z, zero_logdet(z)
        with no_autocast(z):
            return z, sum_except_batch(log_derivative)

    # -- latent -> data -------------------------------------------------------------------------
    def solve(self, z: torch.Tensor, cond: torch.Tensor | None = None, options: InverseOptions = InverseOptions()
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, θ): the tokens (block order) whose forward is z (block order) and their parameters."""
        guided = options.guidance != 0 and cond is not None and self.class_embed is not None
        if guided:  # one batch [c; ∅]: conditional and unconditional parameters from the same pass
            cond = torch.cat([cond, torch.full_like(cond, self.num_classes)])
        if options.method == "jacobi":
            return self._solve_jacobi(z, cond, options, guided)
        return self._solve_sequential(z, cond, options, guided, cached=options.method == "sequential")

    def _solve_sequential(self, z, cond, options, guided, cached):
        batch, length, _ = z.shape
        cache = KVCache(len(self.layers), length) if cached else None
        params = [self.first_params.to(logdet_dtype(z)).expand(batch, -1, -1)]
        with no_autocast(z):
            tokens = [self.transform.invert(z[:, 0], params[0])]
        for i in range(1, length):
            if cached:  # only h_{i-1} goes through the transformer; h_{<i-1} are in the cache
                h_prev = tokens[-1]
                theta = self._step_params(torch.cat([h_prev, h_prev]) if guided else h_prev, cond, cache)
            else:  # the reference: the whole prefix h_{<i}, every step
                prefix = torch.stack(tokens, dim=1)
                theta = self.net_params(torch.cat([prefix, prefix]) if guided else prefix, cond)[:, -1]
            if guided:
                theta = self._guided(theta[:, None], options, torch.tensor([i]))[:, 0]
            params.append(theta)
            with no_autocast(z):
                tokens.append(self.transform.invert(z[:, i], theta))
        return torch.stack(tokens, dim=1), torch.stack(params, dim=1)

    def _solve_jacobi(self, z, cond, options, guided):
        length = z.shape[1]
        segments = min(options.jacobi_segments, length)
        bounds = [round(s * length / segments) for s in range(segments + 1)]
        h = z.clone()  # the initial guess: the block as the identity
        params = None
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            iterations = options.jacobi_max_iterations or (b - a)
            for n in range(iterations):
                guess = self._tame(h[:, :b], z[:, :b], solved=a + n)
                theta = self.token_params(torch.cat([guess, guess]) if guided else guess, cond)
                if guided:
                    theta = self._guided(theta, options, torch.arange(b))
                with no_autocast(z):
                    new = self.transform.invert(z[:, a:b], theta[:, a:b])
                change = (new - h[:, a:b]).abs().max()
                h = torch.cat([h[:, :a], new, h[:, b:]], dim=1)
                if change <= options.jacobi_tolerance:
                    break
            params = theta if params is None else torch.cat([params[:, :a], theta[:, a:b]], dim=1)
        return h, params

    @staticmethod
    def _tame(h: torch.Tensor, z: torch.Tensor, solved: int) -> torch.Tensor:
        """The iterate with its unsolved tokens (from ``solved`` on) reset to z where they overflowed or left
        [-JACOBI_GUESS_BOUND, JACOBI_GUESS_BOUND].  Attention masks later tokens with weight 0, but 0 · inf
        is NaN: a wild guess of a later token would reach the solved ones.  The solved tokens are never
        touched, and a token not yet solved may start from any guess, so exactness is unaffected."""
        unsolved = h[:, solved:]
        if unsolved.shape[1] == 0:
            return h
        wild = ~torch.isfinite(unsolved) | (unsolved.abs() > JACOBI_GUESS_BOUND)
        return torch.cat([h[:, :solved], torch.where(wild, z[:, solved:], unsolved)], dim=1)

    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None = None, options: InverseOptions = InverseOptions()
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x = forward^{-1}(z) and log|det ∂x/∂z| = -Σ log f'(x; θ)."""
        zb = self.order(z)
        h, params = self.solve(zb, cond, options)
        with no_autocast(zb):
            _, log_derivative = self.transform.inverse(zb, params)
            logdet = zero_logdet(zb) if log_derivative is None else sum_except_batch(log_derivative)
        return self.order(h), logdet

    def invert(self, z: torch.Tensor, cond: torch.Tensor | None = None, options: InverseOptions = InverseOptions()
               ) -> torch.Tensor:
        return self.order(self.solve(self.order(z), cond, options)[0])


# ---------------------------------------------------------------------------------- the model


class TarFlow(NullClassConditioning, FlowModel):
    """TarFlow: ``num_blocks`` causal-transformer autoregressive flow blocks on p x p patches (module docstring).

    in_channels, image_size: the data; patch_size: p (image_size must be a multiple, with >= 2 patches).
    width, layers_per_block, num_heads, mlp_ratio: each block's transformer (ml-tarflow: head dim 64, ratio 4).
    transform: "affine" | "additive" | "spline" (``flowgen.transforms``); affine_scale: "exp" (TarFlow's
        unbounded exp, the default) | "tanh" | "sigmoid"; spline_bins, spline_bound: the spline's.
    num_classes: class-conditional blocks with a null class for guidance; label_drop: probability that
        ``log_prob`` in training mode replaces a label by the null class (ml-tarflow: 0.1).
    noise_std: σ of the Gaussian noise the model is trained with (model units: the input y lies in
        [-1/2, 1/2)); the model only uses it for ``denoise``, the dequantizer adds the noise.
    Sampling defaults (keyword arguments of ``sample`` override them): guidance (w), guidance_annealed,
        inverse_method, jacobi_segments, jacobi_max_iterations, jacobi_tolerance, denoise (None: when
        noise_std > 0).  ``inverse``/``invert`` use inverse_method and the Jacobi settings too.
    memory: "standard" | "checkpoint" (each block's transformer recomputed in backward).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        patch_size: int,
        width: int,
        num_blocks: int,
        layers_per_block: int,
        num_heads: int,
        num_classes: int | None = None,
        transform: str = "affine",
        mlp_ratio: int = 4,
        affine_scale: str = "exp",
        spline_bins: int = 8,
        spline_bound: float = 3.0,
        noise_std: float = 0.0,
        label_drop: float = 0.0,
        guidance: float = 0.0,
        guidance_annealed: bool = False,
        inverse_method: str = "sequential",
        jacobi_segments: int = 1,
        jacobi_max_iterations: int | None = None,
        jacobi_tolerance: float = 1e-5,
        denoise: bool | None = None,
        memory: str = "standard",
    ):
        super().__init__()
        check_positive(in_channels=in_channels, patch_size=patch_size, width=width, num_blocks=num_blocks,
                       layers_per_block=layers_per_block, num_heads=num_heads, mlp_ratio=mlp_ratio,
                       jacobi_segments=jacobi_segments)
        check_image_size(image_size, patch_size, f"TarFlow cuts the image into {patch_size}x{patch_size} patches")
        if image_size == patch_size:
            raise InvalidValueError(f"patch_size={patch_size} leaves one patch of a {image_size}x{image_size} image; "
                             "TarFlow needs at least 2 tokens, use a smaller patch_size")
        if width % num_heads:
            raise InvalidValueError(f"width={width} is not divisible by num_heads={num_heads}")
        if num_classes is not None:
            check_positive(num_classes=num_classes)
        if jacobi_max_iterations is not None:
            check_positive(jacobi_max_iterations=jacobi_max_iterations)
        check_choice("transform", transform, tuple(TRANSFORMS))
        check_choice("affine_scale", affine_scale, AFFINE_SCALES)
        check_choice("inverse_method", inverse_method, INVERSE_METHODS)
        if memory == "invertible":
            raise InvalidValueError("memory='invertible' does not suit TarFlow: rebuilding a block's input needs its "
                             "sequential inverse (one transformer pass per token); use memory='checkpoint'")
        check_choice("memory", memory, TARFLOW_MEMORY_MODES)
        for name, value in (("noise_std", noise_std), ("jacobi_tolerance", jacobi_tolerance)):
            if not (math.isfinite(value) and value >= 0):
                raise InvalidValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 <= label_drop < 1:
            raise InvalidValueError(f"label_drop must be in [0, 1), got {label_drop!r}")
        if not math.isfinite(guidance):
            raise InvalidValueError(f"guidance must be a finite number, got {guidance!r}")
        if guidance != 0 and num_classes is None:
            raise InvalidValueError("guidance needs a class-conditional model (num_classes); set guidance=0")

        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.num_classes = num_classes
        self.num_tokens = (image_size // patch_size) ** 2
        self.token_dim = in_channels * patch_size**2
        self.noise_std, self.label_drop, self.memory = float(noise_std), float(label_drop), memory
        self.denoise_samples = noise_std > 0 if denoise is None else bool(denoise)
        self.inverse_options = InverseOptions(inverse_method, float(guidance), bool(guidance_annealed),
                                              jacobi_segments, jacobi_max_iterations, float(jacobi_tolerance))
        # one learned α per token element for the tanh scale
        options = TransformOptions(scale=affine_scale, alpha_shape=(self.token_dim,), spline_bins=spline_bins,
                                   spline_bound=spline_bound)
        self.blocks = nn.ModuleList([
            TarFlowBlock(self.token_dim, self.num_tokens, width, layers_per_block, num_heads, mlp_ratio,
                         transform, options, reverse=k % 2 == 1, num_classes=num_classes)
            for k in range(num_blocks)
        ])

    # -- data -> latents ----------------------------------------------------------------------------
    def _run_block(self, block: TarFlowBlock, h: torch.Tensor, labels: torch.Tensor | None):
        if self.memory == "checkpoint" and torch.is_grad_enabled():
            return checkpoint(block, h, labels, use_reentrant=False)
        return block(h, labels)

    def _tokens_to_latent(self, x: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (latent tokens (B, T, d), Σ_k log|det| of the blocks (B,)) for the given block labels."""
        h, logdet = patchify(x, self.patch_size), zero_logdet(x)
        for block in self.blocks:
            h, ld = self._run_block(block, h, labels)
            logdet = logdet + ld
        return h, logdet

    def forward(self, x: torch.Tensor, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (z image-shaped (B, C, H, W), log|det ∂z/∂x| (B,)): the bijection for labels y (∅ when None)."""
        h, logdet = self._tokens_to_latent(x, self._labels(y, x.shape[0], x.device))
        return unpatchify(h, self.patch_size, self.image_size), logdet

    def _log_prob(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h, logdet = self._tokens_to_latent(x, labels)
        return standard_normal_log_prob(h) + logdet

    def log_prob(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """log p(x | y) in nats, (B,), of the (dequantized, possibly noisy) input x; ∅ when y is None.
        In training mode labels are dropped to ∅ with probability ``label_drop``."""
        return self._log_prob(x, self._training_labels(y, x.shape[0], x.device))

    def log_prob_parts(self, x: torch.Tensor, y=None) -> LogProbParts:
        """Terms "block{k}/logdet" and "prior" (Σ = log_prob), log-derivatives "block{k}" (none for additive)."""
        labels = self._training_labels(y, x.shape[0], x.device)
        terms, log_derivatives = {}, {}
        h = patchify(x, self.patch_size)
        for k, block in enumerate(self.blocks):
            h, log_derivative = block.transform_tokens(h, labels)
            if log_derivative is None:
                terms[f"block{k}/logdet"] = zero_logdet(h)
            else:
                with no_autocast(h):
                    terms[f"block{k}/logdet"] = sum_except_batch(log_derivative)
                log_derivatives[f"block{k}"] = log_derivative.flatten()
        terms["prior"] = standard_normal_log_prob(h)
        return LogProbParts(terms, log_derivatives)

    # -- latents -> data ----------------------------------------------------------------------------
    def _options(self, **overrides) -> InverseOptions:
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "method" in overrides:
            check_choice("inverse_method", overrides["method"], INVERSE_METHODS)
        return replace(self.inverse_options, **overrides)

    def _tokens(self, latents) -> torch.Tensor:
        parts = latent_list(latents)
        if len(parts) != 1:
            raise InvalidValueError(f"TarFlow has one latent tensor, got {len(parts)}")
        return patchify(parts[0], self.patch_size)

    def inverse(self, latents, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        """z -> (x, log|det ∂x/∂z|): the inverse of ``forward`` for labels y (no guidance)."""
        h = self._tokens(latents)
        labels = self._labels(y, h.shape[0], h.device)
        options, logdet = self._options(guidance=0.0), zero_logdet(h)
        for block in reversed(self.blocks):
            h, ld = block.inverse(h, labels, options)
            logdet = logdet + ld
        return unpatchify(h, self.patch_size, self.image_size), logdet

    def invert(self, latents, y=None) -> torch.Tensor:
        """z -> x alone (no log-determinant work)."""
        return self._decode(self._tokens(latents), y, self._options(guidance=0.0))

    def _decode(self, h: torch.Tensor, y, options: InverseOptions) -> torch.Tensor:
        labels = self._labels(y, h.shape[0], h.device)
        for block in reversed(self.blocks):
            h = block.invert(h, labels, options)
        return unpatchify(h, self.patch_size, self.image_size)

    def denoise(self, x: torch.Tensor, y=None, noise_std: float | None = None) -> torch.Tensor:
        """Tweedie's formula E[x_clean | x] = x + σ² ∇_x log p(x | y) with the model's own score.

        The gradient is taken even when the caller is under no_grad or inference_mode; the parameters
        get no gradient.  σ defaults to the model's ``noise_std`` (σ = 0: x unchanged).
        """
        sigma = self.noise_std if noise_std is None else float(noise_std)
        if sigma == 0:
            return x
        labels = self._labels(y, x.shape[0], x.device)
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            (score,) = torch.autograd.grad(self._log_prob(x, labels).sum(), x)
        return (x + sigma**2 * score).detach()

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, y=None, generator=None, *, guidance: float | None = None,
               guidance_annealed: bool | None = None, inverse_method: str | None = None,
               jacobi_segments: int | None = None, jacobi_max_iterations: int | None = None,
               jacobi_tolerance: float | None = None, denoise: bool | None = None) -> torch.Tensor:
        """n images: z ~ N(0, T² I) inverted through the blocks (module docstring: inverse methods and
        guidance θ(c) + w(θ(c) - θ(∅))), then, if ``denoise``, one Tweedie step x + σ² ∇ log p(x | y).

        Keyword options default to the values given at construction.  Guidance needs labels y; without
        them the samples come from the null class and w has no effect.
        """
        check_temperature(temperature)
        options = self._options(guidance=guidance, guidance_annealed=guidance_annealed, method=inverse_method,
                                jacobi_segments=jacobi_segments, jacobi_max_iterations=jacobi_max_iterations,
                                jacobi_tolerance=jacobi_tolerance)
        if options.guidance != 0 and self.num_classes is None:
            raise InvalidValueError("guidance needs a class-conditional model (num_classes)")
        param = self.blocks[0].first_params
        z = torch.randn((n, *self.input_shape), generator=generator, device=param.device, dtype=param.dtype)
        x = self._decode(patchify(z * temperature, self.patch_size), y, options)
        if self.denoise_samples if denoise is None else denoise:
            x = self.denoise(x, y)
        return x

    # -- what consumers may refine ----------------------------------------------------------------
    def compile_units(self) -> list[nn.Module]:
        return list(self.blocks)

    @torch.no_grad()
    def reconstruction_errors(self, x: torch.Tensor) -> dict[str, float]:
        """max |block⁻¹(block(h)) - h| of each block on its own input h (∅ labels), with ``inverse_method``."""
        labels, errors = self._labels(None, x.shape[0], x.device), {}
        h = patchify(x, self.patch_size)
        for k, block in enumerate(self.blocks):
            z, _ = block(h, labels)
            errors[f"block{k}"] = (block.invert(z, labels, self.inverse_options) - h).abs().max().item()
            h = z
        return errors

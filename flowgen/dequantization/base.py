"""What every dequantizer shares: the contract, S-sample draws, and y that never leaves x's bin.

A dequantizer turns integer pixels x ∈ {0, …, K-1}^D into a model input and the log-density
of the noise it drew (see flowgen/likelihood.py for the bound these two terms enter):

    forward(x, generator=None) -> (y, log_q)      y = (x + u)/K - 1/2 ∈ [-1/2, 1/2)^D  (float32, shape of x)
                                  log_q = log q(u | x)                 (float32, shape (B,))

with u ∈ [0, 1)^D drawn from q(· | x).  ``draw_noise(x) -> (u, log_q)`` is the same draw
before the rescaling, and ``sample_noise(x, S)`` stacks S independent draws for the
importance-weighted bound.  A ``torch.Generator`` (on x's device) makes a draw reproducible
without touching the global RNG; a sequence of generators, one per image, makes each image's
noise independent of the batch it is in (evaluation: the same number on 1 or N processes).

Why y is clamped to a per-level table.  In float32, y = (x + u)/K - 1/2 is rounded two or
three times, and within a few ulps of a bin edge the rounding can carry y into the
neighbouring bin: torch.rand's largest value u = 1 - 2**-24 gives x + u == x + 1 exactly
for every x >= 1, so ``quantize(y) == x + 1`` (255 of the 256 levels at K = 256).  Each level
x has a float32 interval [lo_x, hi_x] of model inputs that quantize to x; y is clamped into
it.  The clamp moves only values lying within a few ulps (~1e-7) of an edge, i.e. it acts on
rounding artefacts, and afterwards ``quantize(y, K) == x`` holds exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from flowgen.errors import InvalidValueError
from flowgen.flows.noise import Generators, noise_like
from flowgen.likelihood import dequantize, quantize

# one generator for the batch, one per image, or None for the global RNG


def uniform_noise(x: torch.Tensor, generator: Generators = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[0, 1) noise shaped like x, drawn from ``generator`` (per image when it is a sequence)."""
    return noise_like(torch.rand, x, generator, dtype)


def level_bounds(num_levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (lo, hi), each (K,): model inputs in [-1/2, 1/2) at the edges of each level's bin that quantize to it.

    Starts from the ideal edges x/K - 1/2 and (x+1)/K - 1/2 - δ and moves inwards in steps of
    δ = 2**-25 (one ulp of |y| in [1/4, 1/2), the coarsest y grid) until ``quantize`` agrees, a
    few steps at most; so [lo_x, hi_x] misses at most a few δ of the true float32 bin.
    """
    step = 2.0**-25
    levels = torch.arange(num_levels)
    lo = dequantize(levels, torch.zeros(num_levels), num_levels)
    hi = dequantize(levels, torch.ones(num_levels), num_levels) - step  # below 1/2 for x = K-1 too
    for _ in range(64):
        low, high = quantize(lo, num_levels) < levels, quantize(hi, num_levels) > levels
        if not (low.any() or high.any()):
            break
        lo = torch.where(low, lo + step, lo)
        hi = torch.where(high, hi - step, hi)
    else:  # pragma: no cover - float32 rounding is never off by 64 steps
        raise RuntimeError(f"could not find the float32 bin edges for {num_levels} levels")
    assert bool((lo <= hi).all()) and float(hi.max()) < 0.5 and float(lo.min()) >= -0.5
    return lo, hi


class Dequantization(nn.Module):
    """Base class: stores K, checks the pixels, rescales u into y and draws S samples."""

    noise_std = 0.0  # σ of the Gaussian noise added after the dequantization noise (TarFlow; uniform only)

    def __init__(self, num_levels: int):
        super().__init__()
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
            raise InvalidValueError(f"num_levels (K) must be an integer >= 2, got {num_levels!r}")
        self.num_levels = num_levels
        self._bounds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per device; not state

    def draw_noise(self, x: torch.Tensor, generator: Generators = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """(u ∈ [0,1)^D shaped like x, log q(u|x) of shape (B,))."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_pixels(x)
        u, log_q = self.draw_noise(x, generator)
        return self.model_input(x, u), log_q.float()

    def sample_noise(self, x: torch.Tensor, num_samples: int, generator: Generators = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """S independent draws per image: y of shape (S, B, C, H, W), log_q of shape (S, B).

        One ``forward`` per sample, so memory stays that of a single draw whatever S is.  With one
        generator per image, draw s of image i is the s-th draw of generator i, whatever the batch.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise InvalidValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        draws = [self(x, generator) for _ in range(num_samples)]
        return torch.stack([y for y, _ in draws]), torch.stack([log_q for _, log_q in draws])

    def check_pixels(self, x: torch.Tensor, values: bool | None = None) -> None:
        """Integer pixels in {0..K-1}: anything else is a data/config mismatch, not a model input.

        Reading the range back is a host synchronisation on an accelerator, so by default the
        values are checked only on the CPU (``FlowModule`` checks every batch there, before it is
        moved to the device); ``values=True`` forces the check anywhere.
        """
        if x.dim() != 4:
            raise InvalidValueError(
                f"dequantization expects integer images of shape (B, C, H, W), got {tuple(x.shape)}")
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"dequantization expects integer pixels (uint8/long levels), got dtype {x.dtype}")
        if values is None:
            values = x.device.type == "cpu"
        if not values or (x.dtype == torch.uint8 and self.num_levels >= 256) or x.numel() == 0:
            return  # every uint8 value is a valid level when K >= 256
        low, high = (int(v) for v in torch.aminmax(x))
        if low < 0 or high >= self.num_levels:
            raise InvalidValueError(
                f"pixel levels span {low}..{high} but num_levels is {self.num_levels}; "
                "the data's n_bits/num_levels and the dequantization's num_levels must agree"
            )

    def model_input(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """y = (x + u)/K - 1/2 in float32, clamped into x's bin so that quantize(y, K) == x exactly."""
        y = dequantize(x, u.float(), self.num_levels)
        lo, hi = self._level_bounds(y.device)
        idx = x.long()
        return torch.clamp(y, lo[idx], hi[idx])

    def bin_centres(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic model input of integer images: every pixel at the centre of its bin, u = 1/2."""
        return self.model_input(x, torch.full(x.shape, 0.5, device=x.device))

    def _level_bounds(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._bounds:
            self._bounds[key] = tuple(t.to(device) for t in level_bounds(self.num_levels))
        return self._bounds[key]

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}"

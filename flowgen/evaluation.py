"""Scoring a trained flow: the dequantized likelihood bounds per image, over a whole split.

One implementation serves the training module's validation/test steps and ``evaluate.py``:

    per draw s = 1..S:   w_s = log p_Y(y_s) - log q(u_s | x),  y_s = (x + u_s)/K - 1/2, u_s ~ q(· | x)
    ELBO   = mean_s w_s - D log K                       (uniform: the average over S draws of u)
    IW     = logmeanexp_s w_s - D log K  >=  ELBO       (equal at S = 1; -> log P(x) as S grows)

both from the same draws (terms in ``flowgen.likelihood``).  The noise of the image with
dataset index i comes from its own generator seeded with (seed, i), so a score is reproducible
and does not depend on, or move, the global RNG, nor on the batch size or on how images are
shared out among DDP ranks: the same checkpoint, data and seed give the same number anywhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from flowgen.errors import InvalidValueError
from flowgen.flows.noise import Generators
from flowgen.likelihood import bits_per_dim, importance_weighted_bound, log_likelihood_bound


def image_generators(device: torch.device | str, seed: int, indices: Iterable[int] | torch.Tensor
                     ) -> list[torch.Generator]:
    """One noise generator per image, seeded with (seed, dataset index), on ``device``."""
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    return [torch.Generator(device=device).manual_seed(_mix(seed, int(i))) for i in indices]


def _mix(seed: int, index: int) -> int:
    """A well-spread 64-bit seed for the pair (seed, index): splitmix64's finaliser of seed·2^32 + index.

    The CPU generator keeps only the low 32 bits of a seed, so the pair is hashed rather than
    packed (packed, every run seed would share its images' noise)."""
    z = (((seed & 0xFFFFFFFF) << 32) | (index & 0xFFFFFFFF)) + 0x9E3779B97F4A7C15
    z &= 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def likelihood_bounds(
    model: nn.Module,
    dequantizer: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_samples: int = 1,
    generator: Generators = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ELBO, IW bound, first draw's y) for integer images x: two (B,) float32 tensors of log P(x) bounds in nats.

    ``labels`` go to the model's class-conditional prior (None for an unconditional model);
    ``generator``: one for the batch, or one per image (``image_generators``).
    """
    bounds = likelihood_estimates(model, dequantizer, x, labels, num_samples, generator)
    return bounds.elbo, bounds.iw, bounds.y


@dataclass
class BoundEstimates:
    """``likelihood_estimates``' results for a batch: the two bounds (B,) in nats, the first draw's y, the ELBO's
    standard error (B,) in nats from the model's estimator of log p (zeros for an exact log p; a CNF's
    Hutchinson trace), and the model's counters averaged over its S calls ({"nfe": ...} for a CNF)."""

    elbo: torch.Tensor
    iw: torch.Tensor
    y: torch.Tensor
    elbo_std_error: torch.Tensor
    stats: dict[str, float]


def likelihood_estimates(model: nn.Module, dequantizer: nn.Module, x: torch.Tensor, labels: torch.Tensor | None = None,
                         num_samples: int = 1, generator: Generators = None) -> BoundEstimates:
    """``likelihood_bounds`` with the standard error of the ELBO and the model's counters.

    log p(y_s) comes from ``model.log_prob_estimate``, fed the same generators after the dequantization noise
    (so a random estimator's draws are per image and reproducible too).  The draws' errors are independent:
    se(ELBO) = sqrt(Σ_s se_s²) / S.
    """
    num_dims = math.prod(x.shape[1:])
    num_levels = dequantizer.num_levels
    y, log_q = dequantizer.sample_noise(x, num_samples, generator)  # (S, B, C, H, W), (S, B)
    estimates = [model.log_prob_estimate(y_s, labels, generator) for y_s in y]
    log_p = torch.stack([e.log_prob for e in estimates])  # (S, B)
    elbo = log_likelihood_bound(log_p, num_dims, num_levels, log_q).mean(dim=0)
    iw = importance_weighted_bound(log_p, log_q, num_dims, num_levels)
    std_error = torch.stack([e.std_error.double() for e in estimates]).pow(2).sum(0).sqrt() / num_samples
    stats = {k: sum(e.stats[k] for e in estimates) / num_samples for k in estimates[0].stats}
    return BoundEstimates(elbo, iw, y[0], std_error.float(), stats)


@torch.no_grad()
def reconstruction_error(model: nn.Module, y: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """max |decode(encode(y)) - y| over the batch, a 0-d float tensor (the flow's numerical invertibility)."""
    zs, _ = model(y, labels)
    y_rec = model.invert(zs, labels)
    return (y_rec.float() - y.float()).abs().max()


@dataclass
class SplitScore:
    """What ``evaluate_split`` measured; per-image values are kept in dataset order."""

    num_images: int
    num_dims: int
    num_samples: int
    bpd: float  # from the ELBO (the averaged uniform bound, or the variational ELBO)
    bpd_iw: float  # from the importance-weighted bound with the same draws
    nll_nats: float
    recon_error: float
    images_per_sec: float
    seconds: float
    per_image_bpd: torch.Tensor = field(repr=False)
    per_image_bpd_iw: torch.Tensor = field(repr=False)
    labels: torch.Tensor | None = field(default=None, repr=False)
    # an estimated log p (a CNF's Hutchinson trace): the standard error of ``bpd`` from the estimator alone,
    # sqrt(Σ_i se_i²) / N, and per image; 0 / None for an exact log p
    bpd_std_error: float = 0.0
    per_image_bpd_std_error: torch.Tensor | None = field(default=None, repr=False)
    nfe: float | None = None  # a CNF's function evaluations per log-density solve, averaged over the batches

    def summary(self) -> dict:
        """The scalar results (JSON-ready)."""
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, torch.Tensor) and v is not None}


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    dequantizer: nn.Module,
    batches: Iterable,
    class_conditional: bool = False,
    num_samples: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_batch=None,
    precision: str = "32-true",
) -> SplitScore:
    """Score every image of ``batches`` (an iterable of (pixels, labels, dataset indices)), in order.

    ``on_batch(num_images)`` is called after each batch (a progress bar).  Images per second
    counts the bound computation only (data loading and the reconstruction check excluded).
    ``precision`` (Lightning's names) runs the bounds and the reconstruction under autocast, as
    training with that precision does: the conditioners in low precision, the sums in float32.
    """
    device = torch.device(device)
    autocast = autocast_context(device, precision)
    model.eval()
    dequantizer.eval()
    elbos, iws, all_labels, errors, nfes = [], [], [], [], []
    recon = torch.zeros((), device=device)
    seconds = 0.0
    num_dims = None
    for x, labels, indices in batches:
        x, labels = x.to(device), labels.to(device)
        num_dims = math.prod(x.shape[1:])
        _synchronize(device)
        start = time.perf_counter()
        with autocast:
            bounds = likelihood_estimates(model, dequantizer, x, labels if class_conditional else None,
                                          num_samples, image_generators(device, seed, indices))
        elbo, iw, y = bounds.elbo, bounds.iw, bounds.y
        _synchronize(device)
        seconds += time.perf_counter() - start
        errors.append(bounds.elbo_std_error.cpu())
        if "nfe" in bounds.stats:
            nfes.append(bounds.stats["nfe"])
        with autocast:
            recon = torch.maximum(recon, reconstruction_error(model, y, labels if class_conditional else None))
        elbos.append(elbo.cpu())
        iws.append(iw.cpu())
        all_labels.append(labels.cpu())
        if on_batch is not None:
            on_batch(x.shape[0])
    if not elbos:
        raise InvalidValueError("the split has no images to evaluate")
    elbo, iw = torch.cat(elbos), torch.cat(iws)
    per_image_bpd, per_image_bpd_iw = bits_per_dim(elbo, num_dims), bits_per_dim(iw, num_dims)
    per_image_error = torch.cat(errors).double() / (num_dims * math.log(2))  # nats -> bits per dimension
    estimated = bool(per_image_error.ne(0).any())
    return SplitScore(
        num_images=elbo.numel(),
        num_dims=num_dims,
        num_samples=num_samples,
        bpd=per_image_bpd.double().mean().item(),
        bpd_iw=per_image_bpd_iw.double().mean().item(),
        nll_nats=-elbo.double().mean().item(),
        recon_error=float(recon),
        images_per_sec=elbo.numel() / max(seconds, 1e-9),
        seconds=seconds,
        per_image_bpd=per_image_bpd,
        per_image_bpd_iw=per_image_bpd_iw,
        labels=torch.cat(all_labels),
        bpd_std_error=per_image_error.pow(2).sum().sqrt().item() / elbo.numel(),
        per_image_bpd_std_error=per_image_error.float() if estimated else None,
        nfe=sum(nfes) / len(nfes) if nfes else None,
    )


PRECISIONS = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast_context(device: torch.device, precision: str):
    """The autocast region of a Lightning precision name (a no-op context for 32-true)."""
    if precision not in PRECISIONS:
        raise InvalidValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is torch.float16 and device.type != "cuda":
        raise InvalidValueError("precision=16-mixed needs a CUDA device; on the CPU use bf16-mixed")
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""Working in a flow's latent space: reconstruction and interpolation between images.

A flow maps an image y to its latents z = f(y) (one tensor, or one per scale of a multi-scale
flow: z = (z_1, ..., z_L)), and f^{-1}(f(y)) = y up to float rounding.  Interpolation moves
between the latents of two images, tensor by tensor, and decodes every point:

    linear:     z(t) = (1 - t) z_a + t z_b
    spherical:  z(t) = sin((1 - t) ω) / sin ω · z_a + sin(t ω) / sin ω · z_b,   cos ω = <z_a, z_b> / (|z_a| |z_b|)

Spherical interpolation keeps |z(t)| near the norms of the endpoints; high-dimensional Gaussian
latents concentrate on a shell, and the linear midpoint falls inside it (lower norm, blurrier
decodings).
"""

from __future__ import annotations

import torch
from torch import nn

from flowgen.errors import InvalidValueError
from flowgen.models.base import latent_list, like_latents

METHODS = ("linear", "spherical")


@torch.no_grad()
def reconstruct(model: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """decode(encode(y)): the model input back through the exact inverse."""
    zs, _ = model(y)
    return model.invert(zs)


def interpolation_weights(steps: int) -> torch.Tensor:
    """t = 0, 1/(steps-1), ..., 1 (float64)."""
    if steps < 2:
        raise InvalidValueError(f"interpolation needs steps >= 2 (the two end points), got {steps}")
    return torch.linspace(0.0, 1.0, steps, dtype=torch.float64)


def interpolate_vectors(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, method: str) -> torch.Tensor:
    """Points between two tensors of the same shape, (len(t), *a.shape); exact at t = 0 and t = 1."""
    if method not in METHODS:
        raise InvalidValueError(f"interpolation={method!r}; choose one of {', '.join(METHODS)}")
    a64, b64 = a.double().flatten(), b.double().flatten()
    t = t.to(a64.device)[:, None]
    if method == "spherical":
        cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(1e-30)
        omega = torch.arccos(cos.clamp(-1.0, 1.0))
        if float(omega.sin()) > 1e-6:  # (anti)parallel latents have no unique great circle: fall back to linear
            out = (torch.sin((1 - t) * omega) * a64 + torch.sin(t * omega) * b64) / omega.sin()
            return out.to(a.dtype).reshape(-1, *a.shape)
    out = (1 - t) * a64 + t * b64
    return out.to(a.dtype).reshape(-1, *a.shape)


@torch.no_grad()
def interpolate(model: nn.Module, y_a: torch.Tensor, y_b: torch.Tensor, steps: int = 8,
                method: str = "spherical") -> torch.Tensor:
    """Decodings of ``steps`` latents from image y_a (C, H, W) to image y_b, shape (steps, C, H, W)."""
    t = interpolation_weights(steps)
    zs_a, _ = model(y_a.unsqueeze(0))
    zs_b, _ = model(y_b.unsqueeze(0))
    path = [interpolate_vectors(za[0], zb[0], t, method)
            for za, zb in zip(latent_list(zs_a), latent_list(zs_b), strict=True)]
    return model.invert(like_latents(path, zs_a))

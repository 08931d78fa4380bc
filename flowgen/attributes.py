"""Semantic manipulation in a flow's latent space (Glow paper, Kingma & Dhariwal 2018, section 5).

Two groups of images, P (with an attribute: a class, or a CelebA attribute marked 1) and N
(without it: the other classes, or the attribute marked -1), give one direction per level l:

    d_l = 1/|P| Σ_{x ∈ P} z_l(x) - 1/|N| Σ_{x ∈ N} z_l(x),       z(x) = (z_1, ..., z_L) = f(x)

and an image is edited by moving its latent along d and decoding:

    x(α) = f^{-1}(z(x) + α d),      x(0) = f^{-1}(f(x)) = x

The latents are taken without labels: Glow's bijection never reads them (only its top prior's
density does), and a family whose bijection does (TarFlow) then uses its unconditional map, the
same for encoding and decoding, so x(0) = x holds for every model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from flowgen.models.base import latent_list, like_latents

# group membership of one image: with the attribute, without it, or in neither group (ignored)
POSITIVE, NEGATIVE, NEITHER = 1, 0, -1


class EmptyGroupError(ValueError):
    """One of the two groups had no image, so its mean latent does not exist."""

    def __init__(self, counts: tuple[int, int]) -> None:
        self.counts = counts
        empty = "positive" if counts[0] == 0 else "negative"
        super().__init__(f"the {empty} group has no images ({counts[0]} positive, {counts[1]} negative)")


def encode(model: nn.Module, y: torch.Tensor) -> list[torch.Tensor]:
    """z = f(y) as a list of latent tensors (one per scale of a multi-scale flow), for a batch of model
    inputs y (B, C, H, W); f reads no label."""
    zs, _ = model(y)
    return latent_list(zs)


def class_groups(labels: torch.Tensor, positive: int, versus: int | None = None) -> torch.Tensor:
    """Membership by class: POSITIVE where label == positive; NEGATIVE where label == versus
    (every other label when ``versus`` is None); NEITHER otherwise."""
    negative = labels != positive if versus is None else labels == versus
    groups = torch.full_like(labels, NEITHER, dtype=torch.long)
    groups[negative] = NEGATIVE
    groups[labels == positive] = POSITIVE
    return groups


def binary_attribute_groups(values: torch.Tensor) -> torch.Tensor:
    """Membership by a binary attribute column: POSITIVE where the value is 1, NEGATIVE where it is
    -1 or 0 (CelebA's list_attr_celeba.txt writes -1; torchvision's CelebA maps it to 0)."""
    return torch.where(values > 0, POSITIVE, NEGATIVE).long()


@torch.no_grad()
def mean_latent_difference(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                           ) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """d_l for every latent tensor l from batches (y, groups): model inputs (B, C, H, W) and memberships (B,).

    Returns (d, (|P|, |N|)), d a list of per-latent tensors of one image's latent shape in the
    latents' dtype. The sums are accumulated in float64 so the batching changes the result by
    float64 rounding only. Raises EmptyGroupError when P or N is empty.
    """
    sums: dict[int, list[torch.Tensor]] = {}
    counts = {POSITIVE: 0, NEGATIVE: 0}
    dtype = None
    for y, groups in batches:
        zs = encode(model, y)
        if not sums:
            dtype = zs[0].dtype
            sums = {g: [torch.zeros(z.shape[1:], dtype=torch.float64, device=z.device) for z in zs] for g in counts}
        groups = groups.to(zs[0].device)
        for group, level_sums in sums.items():
            members = groups == group
            counts[group] += int(members.sum())
            for total, z in zip(level_sums, zs, strict=True):
                total += z[members].double().sum(0)
    if counts[POSITIVE] == 0 or counts[NEGATIVE] == 0:
        raise EmptyGroupError((counts[POSITIVE], counts[NEGATIVE]))
    direction = [(p / counts[POSITIVE] - n / counts[NEGATIVE]).to(dtype)
                 for p, n in zip(sums[POSITIVE], sums[NEGATIVE], strict=True)]
    return direction, (counts[POSITIVE], counts[NEGATIVE])


def direction_norm(direction: list[torch.Tensor]) -> float:
    """|d|: the Euclidean norm of the direction over all latent tensors together."""
    return float(torch.cat([d.double().flatten() for d in direction]).norm())


def shift_latents(zs: list[torch.Tensor], direction: list[torch.Tensor], alphas) -> list[torch.Tensor]:
    """z + α d for every α, per latent tensor: one image's latents (1, *shape) -> (len(alphas), *shape)."""
    edited = []
    for z, d in zip(zs, direction, strict=True):
        alpha = torch.as_tensor(alphas, dtype=z.dtype, device=z.device).reshape(-1, *([1] * d.dim()))
        edited.append(z + alpha * d.to(z.device, z.dtype))
    return edited


@torch.no_grad()
def manipulate(model: nn.Module, y: torch.Tensor, direction: list[torch.Tensor], alphas) -> torch.Tensor:
    """f^{-1}(f(y) + α d) for every α: one model input y (C, H, W) -> (len(alphas), C, H, W)."""
    zs, _ = model(y.unsqueeze(0))
    return model.invert(like_latents(shift_latents(latent_list(zs), direction, alphas), zs))

"""Toy 2-D densities to fit: samplers of (n, 2) float32 points, all inside about [-4, 4]².

    moons            the two interleaved half circles of sklearn.datasets.make_moons (noise 0.05),
                     centred and scaled by 2.5
    eight_gaussians  an equal mixture of N(3 (cos kπ/4, sin kπ/4), 0.3² I), k = 0..7
    checkerboard     uniform on the 8 dark squares of a 4 x 4 board covering [-4, 4]²
    pinwheel         5 Gaussian arms, r ~ N(2, 0.5²) along an arm and N(0, 0.15²) across it,
                     each point turned by a further 0.3 r radians (the twist)
    spirals          two interleaved Archimedean spirals r = 0.42 t, t = 3π √u, u ~ U(0, 1),
                     plus N(0, 0.12² I)
    rings            three concentric circles of radii 1.2, 2.4, 3.6 (points in proportion to the
                     circumference) plus N(0, 0.08² I)

Every sampler draws from a ``numpy.random.Generator``, so a seed fixes the data.  The data are
continuous (not quantised), so log p is a true density and no dequantisation is needed.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import make_moons

from flowgen.errors import InvalidValueError


def moons(n: int, rng: np.random.Generator) -> np.ndarray:
    points, _ = make_moons(n, noise=0.05, random_state=int(rng.integers(2**31)))
    return (points - np.array([0.5, 0.25])) * 2.5


def eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    angle = rng.integers(0, 8, n) * np.pi / 4
    centres = 3.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return centres + 0.3 * rng.standard_normal((n, 2))


def checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    column = rng.integers(0, 4, n)
    row = 2 * rng.integers(0, 2, n) + column % 2  # (row + column) even: a dark square
    return np.stack([column, row], axis=1) * 2.0 - 4.0 + 2.0 * rng.random((n, 2))


def pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    along = rng.normal(2.0, 0.5, n)
    across = rng.normal(0.0, 0.15, n)
    angle = rng.integers(0, 5, n) * 2 * np.pi / 5 + 0.3 * along
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([along * cos - across * sin, along * sin + across * cos], axis=1)


def spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    t = 3 * np.pi * np.sqrt(rng.random(n))  # √u: uniform along the arc rather than in t
    sign = np.where(rng.random(n) < 0.5, 1.0, -1.0)  # the second spiral is the first turned by π
    points = 0.42 * t[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1) * sign[:, None]
    return points + 0.12 * rng.standard_normal((n, 2))


def rings(n: int, rng: np.random.Generator) -> np.ndarray:
    radius = 1.2 * rng.choice([1, 2, 3], size=n, p=[1 / 6, 2 / 6, 3 / 6])  # mass ∝ circumference
    angle = 2 * np.pi * rng.random(n)
    return radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1) + 0.08 * rng.standard_normal((n, 2))


DENSITIES = {
    "moons": moons,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "pinwheel": pinwheel,
    "spirals": spirals,
    "rings": rings,
}


def sample_density(name: str, n: int, rng: np.random.Generator) -> torch.Tensor:
    """n points of the toy density ``name`` as a (n, 2) float32 tensor."""
    if name not in DENSITIES:
        raise InvalidValueError(f"unknown density {name!r}; choose one of {', '.join(DENSITIES)}")
    return torch.from_numpy(DENSITIES[name](n, rng)).float()

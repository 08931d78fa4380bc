"""The playground's two figures, written as PNGs.

``evolution_figure``: how the flow turns the Gaussian into the data, one block at a time.  Column k
shows h_{n-k}, the variable after k of the n inverse blocks, from z ~ N(0, I) (k = 0) to the model's
x (k = n), then the data.  Top row: the same Gaussian points pushed through the blocks, coloured
by their angle in z so one can follow where each part of the Gaussian goes.  Bottom row: the exact
density p_{n-k} of that variable on a grid (``FlowDensity2d.stage_log_prob``), and a histogram of
the data under the data's points.

``density_figure``: the data, the learned density exp(log p(x)) as a heat map, and samples of the
model, side by side on the same square.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flowgen.playground.grid import density_on_grid
from flowgen.playground.model import FlowDensity2d

PANEL_INCHES = 1.9
DPI = 80
HEAT_MAP = "magma"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _square(ax, extent: float) -> None:
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _scatter(ax, points: torch.Tensor, extent: float, colour="tab:blue", cmap=None) -> None:
    points = points.numpy()
    ax.scatter(points[:, 0], points[:, 1], s=1.5, c=colour, cmap=cmap, linewidths=0, rasterized=True)
    _square(ax, extent)


def _heat_map(ax, density: np.ndarray, extent: float) -> None:
    ax.imshow(density, origin="lower", extent=(-extent, extent, -extent, extent), cmap=HEAT_MAP,
              interpolation="nearest")
    _square(ax, extent)


def _save(plt, fig, path: Path) -> Path:
    """Write ``fig`` as a 256-colour palette PNG: these figures look the same and take a third of the bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    image.save(path, optimize=True)
    return path


def _stage_title(k: int, n: int) -> str:
    if k == 0:
        return "z ~ N(0, I)"
    return f"{k} layer{'s' if k > 1 else ''}" + (" = x" if k == n else "")


def evolution_figure(model: FlowDensity2d, data: torch.Tensor, path: Path, extent: float, grid_size: int,
                     points: int = 2000, seed: int = 0, title: str = "") -> Path:
    """Gaussian → data, block by block (see the module docstring); returns ``path``."""
    plt = _pyplot()
    n = len(model.blocks)
    z = torch.randn(points, 2, generator=torch.Generator().manual_seed(seed))
    angle = torch.atan2(z[:, 1], z[:, 0]).numpy()
    stages = model.stages(z)
    fig, axes = plt.subplots(2, n + 2, figsize=(PANEL_INCHES * (n + 2), 2 * PANEL_INCHES + 0.4), squeeze=False)
    for k, h in enumerate(stages):
        _scatter(axes[0, k], h, extent, colour=angle, cmap="twilight")
        density = density_on_grid(lambda y, j=n - k: model.stage_log_prob(y, j), extent, grid_size)
        _heat_map(axes[1, k], density, extent)
        axes[0, k].set_title(_stage_title(k, n), fontsize=9)
    _scatter(axes[0, n + 1], data[:points], extent, colour="tab:gray")
    axes[0, n + 1].set_title("data", fontsize=9)
    # half the heat maps' resolution: twice the points per bin, so the data's histogram is less noisy
    histogram, _, _ = np.histogram2d(data[:, 1].numpy(), data[:, 0].numpy(), bins=max(grid_size // 2, 1),
                                     range=[[-extent, extent], [-extent, extent]])
    _heat_map(axes[1, n + 1], histogram, extent)
    axes[0, 0].set_ylabel("samples", fontsize=9)
    axes[1, 0].set_ylabel("density", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, path)


def density_figure(model: FlowDensity2d, data: torch.Tensor, path: Path, extent: float, grid_size: int,
                   points: int = 2000, seed: int = 0, title: str = "") -> Path:
    """Data | learned density exp(log p(x)) | model samples; returns ``path``."""
    plt = _pyplot()
    density = density_on_grid(model.log_prob, extent, grid_size)
    samples = model.sample(points, generator=torch.Generator().manual_seed(seed))
    fig, axes = plt.subplots(1, 3, figsize=(3 * 2.6, 2.9))
    _scatter(axes[0], data[:points], extent, colour="tab:gray")
    axes[0].set_title("data", fontsize=9)
    _heat_map(axes[1], density, extent)
    axes[1].set_title("learned density exp(log p(x))", fontsize=9)
    _scatter(axes[2], samples, extent, colour="tab:blue")
    axes[2].set_title("samples of the flow", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, path)

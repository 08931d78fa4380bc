"""Drawing images from a flow: temperature-scaled samples as pixel intensities, and grids of them."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.utils import make_grid

from flowgen.errors import InvalidValueError
from flowgen.likelihood import to_unit_interval

# what sample.py makes: grids of samples here; interpolations and reconstructions (flowgen/latents.py)
SAMPLE_MODES = ("sample", "interpolate", "reconstruct")


def sampling_options(model: nn.Module) -> list[str]:
    """The keyword-only options of the model's ``sample`` beyond the contract's (TarFlow: guidance,
    inverse_method, denoise, ...); [] for a family that has none (Glow, RealNVP).
    ``FlowModel.sampling_options``; for a wrapper (``LogitPreprocessed``) those of the flow it wraps."""
    return model.sampling_options()


def check_sampling_options(model: nn.Module, options: dict) -> None:
    """A ValueError in one line for an option the model's ``sample`` does not take."""
    known = sampling_options(model)
    unknown = [key for key in options if key not in known]
    if unknown:
        offer = f"its options are {', '.join(known)}" if known else "it takes none"
        raise InvalidValueError(
            f"sampling.{unknown[0]}: {type(model).__name__}.sample has no option {unknown[0]!r}; {offer}")


@torch.no_grad()
def sample_pixels(model: nn.Module, num_levels: int, n: int, temperature: float, labels=None,
                  generator: torch.Generator | None = None, options: dict | None = None) -> torch.Tensor:
    """n images at ``temperature`` as intensities in [0, 1] (the centre of each pixel's level), shape (n, C, H, W).

    ``options``: keyword options of the model's ``sample`` (``sampling_options``).  The model is put in
    eval mode for the draw and restored afterwards.
    """
    options = dict(options or {})
    check_sampling_options(model, options)
    was_training = model.training
    model.eval()
    try:
        y = model.sample(n, temperature=temperature, y=labels, generator=generator, **options)
    finally:
        model.train(was_training)
    return to_unit_interval(y, num_levels)


def temperature_rows(model: nn.Module, num_levels: int, n: int, temperatures, labels=None, seed: int = 0,
                     device: torch.device | str = "cpu", options: dict | None = None) -> torch.Tensor:
    """len(temperatures) * n images, row r at temperatures[r], every row from the SAME noise ε (seeded)."""
    rows = []
    for temperature in temperatures:
        generator = torch.Generator(device=device).manual_seed(seed)
        rows.append(sample_pixels(model, num_levels, n, float(temperature), labels, generator, options))
    return torch.cat(rows)


def image_grid(images: torch.Tensor, num_per_row: int, upscale: int = 1) -> torch.Tensor:
    """(3, H', W') grid in [0, 1] with a 1-pixel white border, optionally enlarged ``upscale`` times (nearest)."""
    grid = make_grid(images.float().cpu(), nrow=num_per_row, padding=1, pad_value=1.0)
    if upscale > 1:
        grid = grid.repeat_interleave(upscale, dim=1).repeat_interleave(upscale, dim=2)
    return grid

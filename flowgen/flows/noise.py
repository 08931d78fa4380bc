"""Noise shaped like a batch, drawn per image when each image has its own generator.

Dequantization noise, the Hutchinson probes of a continuous flow and the evaluation's per-image draws all
need the same property: image i's noise comes from generator i, whatever batch it is in, so that a score
does not depend on the batch size or on the number of devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowgen.errors import InvalidValueError

# one generator for the batch, one per image, or None (the global generator)
Generators = torch.Generator | Sequence[torch.Generator] | None


def noise_like(draw, x: torch.Tensor, generator: Generators = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Noise shaped like x from ``draw`` (torch.rand, torch.randn), drawn from ``generator``; with a sequence
    of generators, image i's noise comes from generator i, whatever the batch it is in."""
    if generator is None or isinstance(generator, torch.Generator):
        return draw(x.shape, device=x.device, dtype=dtype, generator=generator)
    if len(generator) != x.shape[0]:
        raise InvalidValueError(f"{len(generator)} generators for a batch of {x.shape[0]} images")
    return torch.stack([draw(x.shape[1:], device=x.device, dtype=dtype, generator=g) for g in generator])

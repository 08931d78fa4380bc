"""The 2-D playground: coupling and masked autoregressive flows on toy 2-D densities, trained in seconds
and drawn layer by layer.

Owns: the toy densities, the 2-D model wrapper, its training loop, the grid integral and the figures.
May import: ``flowgen.flows``, ``flowgen.transforms``, ``flowgen.errors``, ``flowgen.checks``. Imported only by its
command (``flowgen.cli.playground_2d``).
"""

from flowgen.playground.densities import DENSITIES, sample_density
from flowgen.playground.flows2d import COUPLINGS, AffineCoupling, SplineCoupling, VectorActNorm, build_flow
from flowgen.playground.model import FlowDensity2d

__all__ = [
    "COUPLINGS",
    "DENSITIES",
    "AffineCoupling",
    "FlowDensity2d",
    "SplineCoupling",
    "VectorActNorm",
    "build_flow",
    "sample_density",
]

"""Multi-scale flow architectures assembled from ``flowgen.flows``."""

from flowgen.models.glow import Glow
from flowgen.models.multiscale import MultiScaleFlow
from flowgen.models.realnvp import RealNVP

__all__ = ["Glow", "MultiScaleFlow", "RealNVP"]

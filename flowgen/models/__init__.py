"""Image flow families, each implementing the model contract of ``flowgen.models.base``: the multi-scale
coupling flows Glow and RealNVP, and TarFlow (causal-transformer autoregressive flow blocks)."""

from flowgen.models.base import FlowModel
from flowgen.models.glow import Glow
from flowgen.models.multiscale import MultiScaleFlow
from flowgen.models.realnvp import RealNVP
from flowgen.models.tarflow import TarFlow

__all__ = ["FlowModel", "Glow", "MultiScaleFlow", "RealNVP", "TarFlow"]

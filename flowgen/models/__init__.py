"""Image flow families, each implementing the model contract of ``flowgen.models.base``: the multi-scale
coupling flows Glow and RealNVP, TarFlow (causal-transformer autoregressive flow blocks) and the continuous
normalizing flow CNF (an ODE, trained by maximum likelihood or flow matching).

Owns: the model contract (``base.py``) and one file per family. May import: ``flowgen.flows``,
``flowgen.transforms``, ``flowgen.likelihood``, ``flowgen.errors``, ``flowgen.checks``; never training, data or
anything above.
"""

from flowgen.models.base import FlowModel
from flowgen.models.cnf import CNF
from flowgen.models.glow import Glow
from flowgen.models.multiscale import MultiScaleFlow
from flowgen.models.realnvp import RealNVP
from flowgen.models.tarflow import TarFlow

__all__ = ["CNF", "FlowModel", "Glow", "MultiScaleFlow", "RealNVP", "TarFlow"]

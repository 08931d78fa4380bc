"""Invertible layers with the uniform contract forward(x, cond) -> (z, logdet), inverse(z, cond) -> (x, logdet).

Owns: the invertible layers and their equations. May import: ``flowgen.transforms``, ``flowgen.errors``,
``flowgen.checks``, torch and einops; never dequantization, models, training or anything above.
"""

from flowgen.flows.actnorm import ActNorm
from flowgen.flows.autoregressive import DIRECTIONS, MADE, MaskedAutoregressive, MaskedLinear
from flowgen.flows.base import Flow, FlowSequence
from flowgen.flows.coupling import Coupling
from flowgen.flows.invconv import InvConv1x1, InvConv1x1LU
from flowgen.flows.memory import MEMORY_MODES, InvertibleSequence
from flowgen.flows.nets import GlowConditioner, ResNetConditioner, ZeroConv2d
from flowgen.flows.permutation import ReversePermutation, ShufflePermutation
from flowgen.flows.prior import SplitPrior, TopPrior, gaussian_log_prob, gaussian_sample
from flowgen.flows.split import Split
from flowgen.flows.squeeze import Squeeze

__all__ = [
    "ActNorm",
    "DIRECTIONS",
    "MADE",
    "MaskedAutoregressive",
    "MaskedLinear",
    "Coupling",
    "Flow",
    "FlowSequence",
    "GlowConditioner",
    "InvConv1x1",
    "InvConv1x1LU",
    "InvertibleSequence",
    "MEMORY_MODES",
    "ResNetConditioner",
    "ReversePermutation",
    "ShufflePermutation",
    "Split",
    "SplitPrior",
    "Squeeze",
    "TopPrior",
    "ZeroConv2d",
    "gaussian_log_prob",
    "gaussian_sample",
]

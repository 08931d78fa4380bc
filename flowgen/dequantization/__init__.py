"""Dequantization: integer pixels -> model input y = (x + u)/K - 1/2 and log q(u|x).

``uniform``: u ~ U[0,1)^D, log q = 0.  ``variational``: Flow++'s learned q(u|x).

Owns: the noise u and log q(u|x). May import: ``flowgen.flows`` (the variational noise flow),
``flowgen.likelihood``, ``flowgen.errors``, ``flowgen.checks``.
"""

from flowgen.dequantization.base import Dequantization, level_bounds
from flowgen.dequantization.uniform import UniformDequantization
from flowgen.dequantization.variational import NoiseFlow, VariationalDequantization

DEQUANTIZATIONS = ("uniform", "variational")

__all__ = [
    "DEQUANTIZATIONS",
    "Dequantization",
    "NoiseFlow",
    "UniformDequantization",
    "VariationalDequantization",
    "level_bounds",
]

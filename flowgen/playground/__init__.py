"""The 2-D playground: coupling, masked autoregressive and continuous flows (``flowgen.flows.vector``) fitted
to toy 2-D densities (``flowgen.data.densities2d``) in seconds, checked by a grid integral and drawn layer by
layer.

Owns: the 2-D model wrapper and its two objectives, its training loop, the grid integral, the figures and
the side-by-side with zuko's CNF. May import: ``flowgen.flows``, ``flowgen.transforms``, ``flowgen.data``,
``flowgen.errors``, ``flowgen.checks``. Imported only by its commands (``flowgen.cli.playground_2d`` and the
CNF benchmark's).
"""

from flowgen.playground.model import FlowDensity2d

__all__ = ["FlowDensity2d"]

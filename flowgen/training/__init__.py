"""Lightning training: the flow module, EMA, learning-rate schedules and callbacks."""

from flowgen.training.module import FlowModule

__all__ = ["FlowModule"]

"""Lightning training: the flow module, EMA, learning-rate schedules and callbacks."""

from flowgen.training.diagnostics import FlowDiagnostics
from flowgen.training.invertibility import InvertibilityMonitor
from flowgen.training.module import FlowModule, NonFiniteWeightsError
from flowgen.training.nan_guard import NonFiniteGuard, NonFiniteStepsError
from flowgen.training.samples import SampleGrid

__all__ = ["FlowDiagnostics", "FlowModule", "InvertibilityMonitor", "NonFiniteGuard", "NonFiniteStepsError",
           "NonFiniteWeightsError", "SampleGrid"]

"""Lightning training: the flow module, EMA, learning-rate schedules and callbacks.

Owns: the LightningModule (the objective, validation, optimisation), EMA, schedules and every callback.
May import: the model contract, dequantization, likelihood, evaluation, sampling, latents, sample quality,
performance, checkpoints; never config, build or cli.
"""

from flowgen.training.diagnostics import FlowDiagnostics
from flowgen.training.invertibility import InvertibilityMonitor
from flowgen.training.module import FlowModule, NonFiniteWeightsError
from flowgen.training.nan_guard import NonFiniteGuard, NonFiniteStepsError
from flowgen.training.samples import SampleGrid

__all__ = ["FlowDiagnostics", "FlowModule", "InvertibilityMonitor", "NonFiniteGuard", "NonFiniteStepsError",
           "NonFiniteWeightsError", "SampleGrid"]

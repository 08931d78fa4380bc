"""``callbacks.fid``: FID (and KID) of the weights being trained, logged every N steps as ``val/fid``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flowgen.errors import InvalidValueError, UserError
from flowgen.sample_quality import (
    SAMPLE_METRICS,
    SampleQuality,
    generated_images,
    inception_network,
    measure,
    real_images,
)
from flowgen.training.periodic import EveryNSteps

OPTION = "callbacks.fid"


class SampleQualityMonitor(EveryNSteps):
    """Every ``every_n_steps`` optimizer steps, log ``val/fid`` (and ``val/kid``, ``val/kid_std`` when
    ``metrics`` names kid) of ``num_samples`` samples at ``temperature`` from the eval weights (the EMA
    when the run keeps one) against ``max_real`` images of ``split`` (flowgen/sample_quality.py), to
    every logger at the global step.

    Rank 0 measures alone, without any collective (the other ranks wait for it at the next gradient
    all-reduce: keep one measurement well under the process group's timeout, 30 minutes by default).
    The real images' statistics are computed once per process; the samples come from a generator
    reseeded with ``seed`` each time (the same noise at every step, so only the weights change between
    two values), and the pass runs under ``fork_rng``: training's RNG streams, its weights and its
    modes are untouched, so a run resumes bit for bit with or without this callback.

    Every process loads the Inception weights when the callback is made, so that a missing file stops
    every rank at once, in one line, before the run writes anything; ranks other than 0 drop the network
    when fitting starts. ``feature``: a stand-in network (tests).
    """

    def __init__(self, every_n_steps: int = 5000, metrics: Sequence[str] = ("fid",), num_samples: int = 1000,
                 temperature: float = 1.0, split: str = "val", max_real: int | None = 5000, batch_size: int = 100,
                 seed: int = 0, weights: str | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 feature: nn.Module | None = None):
        super().__init__(every_n_steps, OPTION)
        metrics = [str(m) for m in metrics]
        if not metrics or any(m not in SAMPLE_METRICS for m in metrics):
            raise InvalidValueError(f"{OPTION}.metrics must be some of {', '.join(SAMPLE_METRICS)}, got {metrics}")
        for name, value, least in [("num_samples", num_samples, 2), ("batch_size", batch_size, 1)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InvalidValueError(f"{OPTION}.{name} must be an int >= {least}, got {value!r}")
        self.metrics = list(dict.fromkeys(metrics))
        self.num_samples = num_samples
        self.temperature = float(temperature)
        self.split = str(split)
        self.max_real = max_real
        self.batch_size = batch_size
        self.seed = seed
        self.weights = weights
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.feature = feature if feature is not None else inception_network(weights, option=f"{OPTION}.weights")
        self._quality: SampleQuality | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        try:
            num_real = len(datamodule.eval_dataset(self.split))
        except (AttributeError, RuntimeError, ValueError):
            num_real = 0
        if num_real < 2:
            raise UserError(f"{OPTION}.split={self.split}: the data has no {self.split} images to compare the samples "
                            "with; choose another split")
        if not trainer.is_global_zero:
            self.feature = None  # rank 0 measures alone

    def measure_now(self, trainer, pl_module, batch) -> dict[str, float]:
        return self.measure(trainer.datamodule, pl_module)

    def measure(self, datamodule, pl_module) -> dict[str, float]:
        """{"val/fid": ..., ...} of the module's eval weights now."""
        device = pl_module.device
        real = None
        if self._quality is None:
            self._quality = SampleQuality(self.feature, self.metrics, self.kid_subsets, self.kid_subset_size, device)
            real = real_images(datamodule.eval_dataset(self.split), pl_module.num_levels, self.max_real,
                               self.batch_size, self.seed)
        generated = generated_images(pl_module.eval_model, pl_module.num_levels, self.num_samples, self.temperature,
                                     self.batch_size, self.seed, device)
        # the sampler draws from its own generator; fork_rng also covers anything a model's sampler might draw
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            results = measure(self._quality, generated, real, self.seed)
        return {f"val/{name}": results[name] for name in ("fid", "kid", "kid_std") if name in results}

"""Watching the flow stay invertible in float arithmetic while it trains."""

from __future__ import annotations

import warnings

import lightning as L
import torch

from flowgen.errors import InvalidValueError
from flowgen.latents import reconstruct


class InvertibilityMonitor(L.Callback):
    """Every ``every_n_steps`` steps: log ``train/recon_error`` = max |decode(encode(y)) - y| of the
    trained weights on a fixed batch (the first validation batch at the bin centres, or the first
    training batch when there is no validation).

    Above ``threshold`` it warns and names the part of the flow (scale, block) with the largest error (exact inverses
    are exact only up to rounding; growing errors come from near-singular 1x1 convolutions or
    coupling scales that are too large or too small). The check is a no-grad forward + inverse
    of one batch, so it costs about one evaluation batch per ``every_n_steps`` steps.
    """

    def __init__(self, every_n_steps: int = 500, threshold: float = 1e-3, num_images: int = 16):
        super().__init__()
        if every_n_steps < 1:
            raise InvalidValueError(f"invertibility.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.threshold = threshold
        self.num_images = num_images
        self._batch: torch.Tensor | None = None

    def _fixed_batch(self, trainer, pl_module, fallback) -> torch.Tensor:
        if self._batch is None:
            datamodule = trainer.datamodule
            val = getattr(datamodule, "val_set", None)
            if val is not None and len(val):
                x = datamodule.images("val", range(min(self.num_images, len(val))))
            else:
                x = fallback[: self.num_images]
            self._batch = pl_module.dequantizer.bin_centres(x.to(pl_module.device))
        return self._batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps != 0:
            return
        model = pl_module.model  # the weights being trained (the EMA follows them)
        y = self._fixed_batch(trainer, pl_module, batch[0])
        was_training = model.training
        model.eval()
        try:
            error = float((reconstruct(model, y) - y).abs().max())
            if error > self.threshold and trainer.is_global_zero:
                parts = model.reconstruction_errors(y)
                where = ""
                if parts:
                    worst = max(parts, key=parts.__getitem__)
                    where = f"; worst part {worst} ({', '.join(f'{name} {e:.2g}' for name, e in parts.items())})"
                warnings.warn(f"step {step}: reconstruction error {error:.3g} > {self.threshold:g}{where}; "
                              "consider a lower learning rate or float32 for the flow", stacklevel=1)
        finally:
            model.train(was_training)
        pl_module.log("train/recon_error", error, rank_zero_only=True)

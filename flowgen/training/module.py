"""The LightningModule: dequantize -> flow log-likelihood -> bits per dimension."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from flowgen.errors import UserError
from flowgen.evaluation import image_generators, likelihood_bounds
from flowgen.likelihood import bits_per_dim, log_likelihood_bound, nats_to_bpd
from flowgen.sampling import sample_pixels
from flowgen.training.ema import EMA
from flowgen.training.nan_guard import gradient_norm
from flowgen.training.rng import rng_states, set_rng_states
from flowgen.training.schedules import warmup_then


class NonFiniteWeightsError(UserError):
    """The weights became NaN/Inf; they are not saved."""


class FlowModule(L.LightningModule):
    """Trains a flow by maximum likelihood of dequantized integer images.

    Per image the loss is the negative dequantized log-likelihood bound in bits per dimension
    (see ``flowgen.likelihood``):  bpd = -(log p(y) - log q(u|x) - D log K) / (D ln 2), with log p(y)
    from the model's ``training_loss`` (``flowgen.models.base``), which may instead give a loss that is
    no likelihood (a CNF's flow matching, logged as ``train/<its name>``), penalties and counters to log.
    Validation and test report exact averages over images (``MeanMetric`` weights each image
    once, and sums across ranks), never averages of batch means.  They score with
    ``flowgen.evaluation.likelihood_bounds`` (the code ``evaluate.py`` runs) on noise seeded per
    image, so the val curve is not jittered by fresh noise, and ``evaluate.py`` on one process
    reproduces the test/bpd of a run on any number of devices.

    Args:
        model: a flow with ``log_prob(y, labels)`` and ``sample(n, temperature, y, generator)``.
        dequantizer: returns ``(y, log_q)`` for integer pixels (``flowgen.dequantization``).
        num_levels: K, the number of pixel levels.
        optimizer: a partial that takes the parameters (from Hydra's ``_partial_: true``).
        weight_decay_params: glob patterns (``fnmatch``) of the parameter names the optimizer's weight
            decay applies to, e.g. ``["*.transform.alpha"]``; the other parameters get none.  None: all.
        warmup_steps / schedule / min_lr_ratio: the learning-rate schedule (``training.schedules``).
        ema_decay: keep an EMA of the flow's weights, used for validation, test and sampling.
        class_conditional: feed the dataset labels to the model's class-conditional prior.
        eval_samples: S, dequantization draws averaged per image in validation and test.
        eval_seed: seeds the per-image validation/test noise (``evaluation.image_generators``).
        run_config: the resolved run configuration, saved in every checkpoint so that the
            model can be rebuilt from the checkpoint alone.
    """

    def __init__(
        self,
        model: nn.Module,
        dequantizer: nn.Module,
        num_levels: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int = 0,
        schedule: str = "constant",
        min_lr_ratio: float = 0.0,
        ema_decay: float | None = None,
        class_conditional: bool = False,
        eval_samples: int = 1,
        eval_seed: int = 0,
        run_config: dict[str, Any] | None = None,
        weight_decay_params: Sequence[str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "dequantizer", "optimizer"])
        self.model = model
        self.dequantizer = dequantizer
        self.num_levels = num_levels
        self.optimizer_factory = optimizer
        self.ema = EMA(model, ema_decay) if ema_decay else None
        self.class_conditional = class_conditional
        self.num_dims = math.prod(model.input_shape)
        self.val_bpd = MeanMetric()
        self.test_bpd = MeanMetric()
        self._last_batch_end: float | None = None
        self.last_loss: torch.Tensor | None = None
        self._rng_states_to_restore: dict | None = None

    # -- the objective -------------------------------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        """The weights used for validation, test and samples: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def nll_nats(self, batch, model: nn.Module | None = None) -> torch.Tensor:
        """Per-image negative log-likelihood bound in nats, shape (B,), float32."""
        x, labels = batch
        y, log_q = self.dequantizer(x)
        log_p = (model or self.model).log_prob(y, labels if self.class_conditional else None)
        return -log_likelihood_bound(log_p, self.num_dims, self.num_levels, log_q)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        # a batch bound for an accelerator has its pixel range checked here, on the host, so that the
        # step never waits for a value read back from the device; on the CPU the dequantizer checks it
        # (flowgen.dequantization.base.Dequantization.check_pixels)
        if self.device.type != "cpu":
            self.dequantizer.check_pixels(batch[0], values=True)
        return batch

    def training_step(self, batch, batch_idx):
        # the model says what it minimises (FlowModel.training_loss): a likelihood, turned into the bpd bound
        # here, or a loss that is no likelihood (a CNF's flow matching), logged under its own name
        x, labels = batch
        batch_size = x.shape[0]
        y, log_q = self.dequantizer(x)
        objective = self.model.training_loss(y, labels if self.class_conditional else None)
        if objective.log_prob is not None:
            nll = -log_likelihood_bound(objective.log_prob, self.num_dims, self.num_levels, log_q)
            loss = nats_to_bpd(nll, self.num_dims)
            self.log("train/bpd", loss.mean(), prog_bar=True, batch_size=batch_size)
            self.log("train/nll_nats", nll.mean(), batch_size=batch_size)
        else:
            if any(p.requires_grad for p in self.dequantizer.parameters()):
                raise UserError(f"{type(self.model).__name__} trains by {objective.name}, which is no likelihood: "
                                "a variational dequantizer would learn nothing; use dequantization=uniform")
            loss = objective.loss
            self.log(f"train/{objective.name}", loss.mean(), prog_bar=True, batch_size=batch_size)
        if objective.penalty is not None:
            loss = loss + objective.penalty
            self.log("train/penalty", objective.penalty.mean(), batch_size=batch_size)
        for name, value in objective.metrics.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        loss = loss.mean()
        self.last_loss = loss.detach()  # read by the NaN guard before the optimizer step
        return loss

    def on_before_optimizer_step(self, optimizer):
        norm = gradient_norm(self.parameters())
        if norm is not None:
            self.log("train/grad_norm", norm)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # right after the step, so that a checkpoint written at this batch's end (callbacks run
        # before the module's own on_train_batch_end) holds the EMA of these very weights
        if self.ema is not None:
            self.ema.update(self.model)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._last_batch_end is not None:
            images = batch[0].shape[0] * self.trainer.world_size
            self.log("train/images_per_sec", images / max(now - self._last_batch_end, 1e-9))
        self._last_batch_end = now

    def on_train_epoch_start(self):
        self._last_batch_end = None  # do not count validation and data-loader start-up as step time

    def eval_bpd(self, batch, batch_idx) -> torch.Tensor:
        """Per-image bpd of the eval weights (ELBO over ``eval_samples`` draws), shape (B,)."""
        x, labels, indices = batch  # evaluation batches carry the images' dataset indices
        generators = image_generators(x.device, self.hparams.eval_seed, indices)
        elbo, _, _ = likelihood_bounds(self.eval_model, self.dequantizer, x, labels if self.class_conditional else None,
                                       self.hparams.eval_samples, generators)
        return bits_per_dim(elbo, self.num_dims)

    def validation_step(self, batch, batch_idx):
        self.val_bpd.update(self.eval_bpd(batch, batch_idx))
        self.log("val/bpd", self.val_bpd, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx):
        self.test_bpd.update(self.eval_bpd(batch, batch_idx))
        self.log("test/bpd", self.test_bpd, on_step=False, on_epoch=True)

    def on_load_checkpoint(self, checkpoint):
        self._rng_states_to_restore = checkpoint.get("rng_states")

    def on_train_start(self):
        # restored here, after Lightning's sanity check and data-loader set-up, right before the
        # first resumed step: dequantization noise and augmentation continue the interrupted stream
        states, self._rng_states_to_restore = self._rng_states_to_restore, None
        if states is not None:
            set_rng_states(states)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["rng_states"] = rng_states()
        # the last line of defence of "a NaN never overwrites a good checkpoint": the NaN guard
        # keeps bad steps out of the weights, and a checkpoint of non-finite weights is refused
        state = self.state_dict()
        bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise NonFiniteWeightsError(
                f"refusing to save a checkpoint at step {self.global_step}: non-finite weights in "
                f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; the previous checkpoints are kept; "
                "lower optimizer.lr or raise scheduler.warmup_steps and resume")

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameter_groups())
        total = self.trainer.estimated_stepping_batches if self.hparams.schedule == "cosine" else None
        factor = warmup_then(self.hparams.schedule, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The trained parameters as optimizer groups: one group, or with ``weight_decay_params`` the matching
        parameters (names as in ``named_parameters()``: ``model.…``, ``dequantizer.…``) in the first group and
        the rest in a second one with ``weight_decay=0``.  A pattern that matches nothing is a one-line error."""
        named = [(n, p) for m in ("model", "dequantizer") for n, p in getattr(self, m).named_parameters(prefix=m)
                 if p.requires_grad]
        patterns = self.hparams.get("weight_decay_params")
        if patterns is None:
            return [{"params": [p for _, p in named]}]
        unused = [pattern for pattern in patterns if not any(fnmatchcase(n, pattern) for n, _ in named)]
        if unused:
            raise UserError(f"optimizer.weight_decay_params: {unused[0]!r} matches no trained parameter; names look "
                            f"like {named[0][0]!r} (glob patterns, e.g. '*.transform.alpha')")
        matched = [any(fnmatchcase(n, pattern) for pattern in patterns) for n, _ in named]
        decayed = [p for (_, p), m in zip(named, matched, strict=True) if m]
        kept = [p for (_, p), m in zip(named, matched, strict=True) if not m]
        return [group for group in ({"params": decayed}, {"params": kept, "weight_decay": 0.0}) if group["params"]]

    # -- sampling ----------------------------------------------------------------------------------
    def sample_pixels(self, n: int, temperature: float, labels=None, generator=None) -> torch.Tensor:
        """n images at ``temperature`` as intensities in [0, 1] (bin centres), from the eval weights."""
        return sample_pixels(self.eval_model, self.num_levels, n, temperature, labels, generator)

"""NaN/Inf steps are skipped, never saved, and stop training with a clear error; the invertibility monitor.

Tests of: flowgen/training/invertibility.py.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from flowgen.data import ImageDataModule
from flowgen.dequantization import UniformDequantization
from flowgen.models import Glow
from flowgen.training import (
    FlowModule,
    InvertibilityMonitor,
    NonFiniteGuard,
    NonFiniteStepsError,
    NonFiniteWeightsError,
)


class PoisonedModule(FlowModule):
    """A FlowModule whose loss is NaN at the given steps (as if a batch or an overflow had poisoned it)."""

    def __init__(self, poison_steps=(), **kwargs):
        super().__init__(**kwargs)
        self.poison_steps = set(poison_steps)
        self.weights_seen: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        self.weights_seen[self.global_step] = torch.cat([p.detach().flatten() for p in self.model.parameters()])
        loss = super().training_step(batch, batch_idx)
        if self.global_step in self.poison_steps:
            loss = loss * float("nan")
            self.last_loss = loss.detach()
        return loss


def module(poison_steps=()):
    torch.manual_seed(0)
    model = Glow(in_channels=1, image_size=8, scales=2, steps=2, hidden_channels=8)
    return PoisonedModule(poison_steps=poison_steps, model=model, dequantizer=UniformDequantization(17),
                          num_levels=17, optimizer=partial(torch.optim.Adam, lr=1e-3))


def trainer(tmp_path, steps, callbacks):
    return L.Trainer(default_root_dir=tmp_path, max_steps=steps, accelerator="cpu", logger=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     enable_checkpointing=False, callbacks=callbacks)


def digits():
    return ImageDataModule(name="digits", image_size=8, channels=1, n_bits=None, num_levels=17, batch_size=16,
                           num_workers=0, val_size=297)


def test_bad_steps_are_skipped_and_counted(tmp_path):
    flow = module(poison_steps={2, 3})
    guard = NonFiniteGuard(max_consecutive=5)
    trainer(tmp_path, 6, [guard]).fit(flow, datamodule=digits())
    assert guard.skipped == 2 and guard.consecutive == 0
    seen = flow.weights_seen
    # the weights after a skipped step are the weights before it; good steps do move them
    torch.testing.assert_close(seen[3], seen[2], rtol=0, atol=0)
    torch.testing.assert_close(seen[4], seen[3], rtol=0, atol=0)
    assert not torch.equal(seen[2], seen[1])
    assert all(torch.isfinite(p).all() for p in flow.parameters())


def test_too_many_consecutive_bad_steps_stop_with_a_clear_error(tmp_path):
    flow = module(poison_steps=set(range(1, 100)))
    with pytest.raises(NonFiniteStepsError, match=r"training stopped at step \d+: 3 consecutive steps.*optimizer.lr"):
        trainer(tmp_path, 20, [NonFiniteGuard(max_consecutive=3)]).fit(flow, datamodule=digits())


def test_non_finite_weights_are_never_saved(tmp_path):
    flow = module()
    run = trainer(tmp_path, 1, [])
    run.fit(flow, datamodule=digits())
    run.save_checkpoint(tmp_path / "good.ckpt")
    good = (tmp_path / "good.ckpt").read_bytes()
    with torch.no_grad():
        next(flow.model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match="refusing to save a checkpoint"):
        run.save_checkpoint(tmp_path / "good.ckpt")
    assert (tmp_path / "good.ckpt").read_bytes() == good


def test_invertibility_monitor_logs_and_names_the_worst_part(tmp_path):
    flow = module()
    monitor = InvertibilityMonitor(every_n_steps=2, threshold=0.0)  # any rounding error warns
    run = trainer(tmp_path, 4, [monitor])
    with pytest.warns(UserWarning, match=r"reconstruction error .* worst part scale\d \(scale0 "):
        run.fit(flow, datamodule=digits())
    assert 0.0 < float(run.callback_metrics["train/recon_error"]) < 1e-4


def _vote(rank: int, world_size: int, init_file: str, results) -> None:
    import torch.distributed as dist

    from flowgen.training.nan_guard import all_ranks_finite, gradients_are_finite

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        layer = torch.nn.Linear(3, 1)
        layer(torch.ones(2, 3)).sum().backward()
        if rank == 1:
            layer.weight.grad[0, 0] = float("inf")  # only this rank sees the bad gradient
        results[rank] = all_ranks_finite(gradients_are_finite(layer.parameters()))
    finally:
        dist.destroy_process_group()


def test_every_rank_skips_together(tmp_path):
    """Two gloo processes: one has an Inf gradient, and both decide to skip the step."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_vote, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    assert dict(results) == {0: False, 1: False}

"""Data parallelism on the CPU: gloo processes stand in for GPUs.

In-process collectives (ActNorm's all-reduced initialisation, the rank checksum) run in two
spawned processes; whole training runs go through ``train.py trainer=ddp_cpu``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowgen.flows.actnorm import ActNorm
from flowgen.training.rank_sync import differing_tensors, tensor_checksums
from tests.train_runner import FAST, REPO, run_dir, run_entry


def test_checksums_see_every_bit_and_every_position():
    layer = torch.nn.Linear(4, 3)
    names, base = tensor_checksums(layer)
    assert names == ["weight", "bias"]
    with torch.no_grad():
        layer.weight.view(-1)[5] = torch.nextafter(layer.weight.view(-1)[5], torch.tensor(10.0))  # one ulp
    assert tensor_checksums(layer)[1][0] != base[0] and tensor_checksums(layer)[1][1] == base[1]
    with torch.no_grad():
        layer.bias.copy_(layer.bias.flip(0))  # same values, other places
    assert tensor_checksums(layer)[1][1] != base[1]
    assert differing_tensors(layer) == []  # one process: nothing to compare with


def _two_ranks(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # each rank sees its own first batch; the default reduce_fn all-reduces the statistics
        data = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(10 + rank)) * (1 + rank) + rank
        actnorm = ActNorm(3)
        actnorm(data)
        results[f"actnorm{rank}"] = (actnorm.bias.detach().clone(), actnorm.log_scale.detach().clone())
        results[f"in_sync{rank}"] = differing_tensors(actnorm)
        if rank == 1:
            with torch.no_grad():
                actnorm.log_scale[0, 2] += 1e-6  # what a rank-local update would do
        results[f"after_edit{rank}"] = differing_tensors(actnorm)
    finally:
        dist.destroy_process_group()


def test_actnorm_initialises_from_all_ranks_and_desync_is_named(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    # identical on both ranks, and equal to initialising on the two batches together
    both = torch.cat([torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(10 + r)) * (1 + r) + r
                      for r in (0, 1)])
    single = ActNorm(3, reduce_fn=lambda s: s)
    single(both)
    for rank in (0, 1):
        bias, log_scale = results[f"actnorm{rank}"]
        torch.testing.assert_close(bias, single.bias.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(log_scale, single.log_scale.detach(), rtol=1e-6, atol=1e-6)
        assert results[f"in_sync{rank}"] == []
        assert results[f"after_edit{rank}"] == ["log_scale"]


def _metrics(run_path) -> dict:
    """The last value of every column of the csv logger's metrics.csv."""
    import csv

    rows = list(csv.DictReader((run_path / "csv" / "version_0" / "metrics.csv").open()))
    last = {}
    for row in rows:
        last.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return last


def test_two_process_ddp_run_keeps_ranks_identical_and_scores_like_one_process(tmp_path):
    """trainer=ddp_cpu on digits: exits 0, ranks hold identical weights (ActNorm included) after the
    first step and at the end, an Inf gradient on rank 1 alone makes both ranks skip that step,
    files are written once, and the test/bpd of the 2-process run equals evaluate.py on one process."""
    poison = ["+callbacks.poison._target_=tests.helpers.poison.InfGradientOnRank", "+callbacks.poison.step=2",
              "+callbacks.poison.rank=1"]
    run = run_entry("train.py", ["logger=csv", *FAST, "trainer=ddp_cpu", "model.hidden_channels=8",
                                 "run_name=ddp", "trainer.limit_test_batches=null", *poison],
                    tmp_path, timeout=600, env={"PYTHONPATH": str(REPO / "tests")})
    assert run.returncode == 0, run.output[-3000:]
    assert "global batch 128 = 64 per device x 2 devices x 1 nodes x 1 accumulation" in run.stdout
    assert "ranks in sync after the first step" in run.stdout and "ranks in sync at the end of training" in run.stdout
    path = run_dir(tmp_path, "ddp")
    # one checkpoint per save, one sample grid per interval, one logger run: rank 0 only
    ckpts = sorted(p.name for p in (path / "checkpoints").iterdir())
    assert len(ckpts) == 2 and ckpts[0].startswith("epoch") and ckpts[1] == "last.ckpt", ckpts
    assert sorted(p.name for p in (path / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    assert [p.name for p in (path / "csv").iterdir()] == ["version_0"]
    metrics = _metrics(path)
    assert metrics["train/skipped_steps"] == 1  # the vote: rank 0 skipped rank 1's bad step too
    test_bpd = metrics["test/bpd"]

    ckpt = next((path / "checkpoints").glob("epoch*.ckpt"))
    score = run_entry("evaluate.py", [f"ckpt_path={ckpt}", "split=test", f"output={tmp_path / 'score.json'}",
                                      "device=cpu"], tmp_path)
    assert score.returncode == 0, score.output[-3000:]
    result = json.loads((tmp_path / "score.json").read_text())
    assert result["num_images"] == 297  # digits test split, every image once
    assert result["bpd"] == pytest.approx(test_bpd, abs=1e-5)


@pytest.mark.slow  # two processes (~20 s on 2 busy cores): `make test-full`; the Glow DDP tests stay in the fast suite
def test_two_process_ddp_tarflow_with_label_dropout_keeps_ranks_identical(tmp_path):
    """trainer=ddp_cpu with a class-conditional TarFlow (label dropout, EMA of decay 0.999, diagnostics and the
    invertibility monitor every 2 steps): the ranks hold identical weights after the first step and at the end,
    and the diagnostics name the blocks."""
    tiny = ["model=tarflow", "model.width=16", "model.num_blocks=2", "model.layers_per_block=1", "model.num_heads=2",
            "model.num_classes=10", "model.label_drop=0.1", "ema_decay=0.999"]
    run = run_entry("train.py", ["logger=csv", *FAST, "trainer=ddp_cpu", *tiny, "run_name=ddp", "test=false",
                                 "callbacks.diagnostics.every_n_steps=2",
                                 "callbacks.invertibility_monitor.every_n_steps=2"], tmp_path, timeout=600)
    assert run.returncode == 0, run.output[-3000:]
    assert "ranks in sync after the first step" in run.stdout and "ranks in sync at the end of training" in run.stdout
    path = run_dir(tmp_path, "ddp")
    metrics = _metrics(path)
    assert metrics["train/skipped_steps"] == 0 and math.isfinite(metrics["val/bpd"])
    assert math.isfinite(metrics["diagnostics/block1/logdet_bpd"]) and metrics["train/recon_error"] < 1e-4
    state = torch.load(path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert int(state["ema.num_updates"]) == 6

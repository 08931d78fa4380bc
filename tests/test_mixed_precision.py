"""Mixed precision: the conditioners run in bf16/fp16, every likelihood term stays float32.

bf16-mixed runs on the CPU (autocast), so these tests run everywhere; 16-mixed needs CUDA.
"""

from __future__ import annotations

import csv
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from flowgen.cli import train as train_cli
from flowgen.data import ImageDataModule
from flowgen.dequantization import UniformDequantization, VariationalDequantization
from flowgen.evaluation import autocast_context, evaluate_split, likelihood_bounds
from flowgen.flows.nets import ActNormConv2d, ZeroConv2d
from flowgen.likelihood import bits_per_dim
from flowgen.models import Glow, RealNVP, TarFlow
from tests.conftest import initialize_actnorms, perturb_parameters
from tests.test_configs import compose_train
from tests.train_runner import FAST, run_dir, run_entry

K = 17  # digits: 17 levels, 8x8, one channel


def digits_batch(n: int = 128):
    data = ImageDataModule(name="digits", num_levels=K, image_size=8, channels=1, n_bits=None, batch_size=64,
                           eval_batch_size=n, num_workers=0, val_size=297, split_seed=0)
    data.setup()
    return next(iter(data.eval_dataloader("val")))


def trained_like(model_name: str) -> torch.nn.Module:
    """A small flow with non-trivial weights and ActNorm initialised on digits."""
    torch.manual_seed(0)
    if model_name == "glow":
        model = Glow(in_channels=1, image_size=8, scales=2, steps=4, hidden_channels=32)
    else:
        model = RealNVP(in_channels=1, image_size=8, scales=2, hidden_channels=32, num_blocks=2)
    perturb_parameters(model, std=0.02)
    x, _, _ = digits_batch()
    initialize_actnorms(model, (x.float() + torch.rand(x.shape)) / K - 0.5)
    return model.eval()


@contextmanager
def conditioner_dtypes(model: torch.nn.Module):
    """Collects the output dtypes of every convolution inside the block (the conditioners' precision);
    ActNormConv2d and ZeroConv2d run their convolution as one functional call (folded scales)."""
    seen, hooks = set(), []
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, ActNormConv2d, ZeroConv2d)):
            hooks.append(module.register_forward_hook(lambda m, i, o: seen.add(o.dtype)))
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("model_name", ["glow", "realnvp"])
@pytest.mark.parametrize("kind", ["uniform", "variational"])
def test_bf16_mixed_bpd_is_within_one_percent_of_float32_on_the_same_weights_and_batch(model_name, kind):
    model = trained_like(model_name)
    if kind == "uniform":
        dequantizer = UniformDequantization(K)
    else:
        dequantizer = VariationalDequantization(K, channels=1, hidden_channels=8)
        perturb_parameters(dequantizer, std=0.05, seed=1)
    x, _, _ = digits_batch()
    bpd = {}
    for precision in ("32-true", "bf16-mixed"):
        generator = torch.Generator().manual_seed(7)  # the same noise in both precisions
        with torch.no_grad(), autocast_context(torch.device("cpu"), precision), conditioner_dtypes(model) as dtypes:
            elbo = likelihood_bounds(model, dequantizer, x, None, 1, generator)[0]
        assert dtypes == ({torch.float32} if precision == "32-true" else {torch.bfloat16})
        assert elbo.dtype == torch.float32  # the likelihood is summed in float32 either way
        bpd[precision] = bits_per_dim(elbo, 64).mean().item()
    assert math.isfinite(bpd["bf16-mixed"])
    assert abs(bpd["bf16-mixed"] / bpd["32-true"] - 1) < 0.01, bpd


def test_bf16_reconstruction_error_is_measured_and_small():
    """x -> z -> x under bf16-mixed: not exact (the conditioners round to 8 bits), but far below a bin."""
    model = trained_like("glow")
    x, labels, index = digits_batch()
    scores = {p: evaluate_split(model, UniformDequantization(K), [(x, labels, index)], precision=p)
              for p in ("32-true", "bf16-mixed")}
    assert scores["32-true"].recon_error < 1e-5
    assert scores["32-true"].recon_error <= scores["bf16-mixed"].recon_error < 0.5 / K  # half a pixel bin
    assert abs(scores["bf16-mixed"].bpd / scores["32-true"].bpd - 1) < 0.01


def tarflow_like_digits() -> TarFlow:
    """configs/model/tarflow.yaml's TarFlow (2x2 patches, width 64, 4 blocks of 2 layers), class-conditional, with
    perturbed weights: every block then scales its elements by about e^±0.3, as a trained one does."""
    torch.manual_seed(0)
    model = TarFlow(1, 8, patch_size=2, width=64, num_blocks=4, layers_per_block=2, num_heads=4, num_classes=10)
    perturb_parameters(model, std=0.05)
    return model.eval()


@contextmanager
def linear_dtypes(model: torch.nn.Module):
    """The output dtypes of every linear layer inside the block (TarFlow's attention, MLP and projections)."""
    seen = set()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def test_tarflow_bf16_mixed_runs_the_transformer_in_bf16_and_sums_in_float32():
    """Under bf16 autocast the transformer's matrix products are bf16, while the latents, every log-det (forward
    and inverse), every named part and the bound are float32; the bpd stays within 1% of float32's, and a
    training step's gradients reach the float32 weights finite."""
    model = tarflow_like_digits()
    x, labels, _ = digits_batch()
    y = (x.float() + 0.5) / K - 0.5
    bpd = {}
    for precision in ("32-true", "bf16-mixed"):
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad(), autocast_context(torch.device("cpu"), precision), linear_dtypes(model) as dtypes:
            elbo = likelihood_bounds(model, UniformDequantization(K), x, labels, 1, generator)[0]
            z, logdet = model(y, labels)
            _, inverse_logdet = model.inverse(z, labels)
            parts = model.log_prob_parts(y, labels)
        assert dtypes == ({torch.float32} if precision == "32-true" else {torch.bfloat16})
        float32 = [elbo, z, logdet, inverse_logdet, model.log_prob(y, labels), *parts.terms.values()]
        assert all(t.dtype == torch.float32 for t in float32), [t.dtype for t in float32]
        bpd[precision] = bits_per_dim(elbo, 64).mean().item()
    assert abs(bpd["bf16-mixed"] / bpd["32-true"] - 1) < 0.01, bpd

    model.train()
    with autocast_context(torch.device("cpu"), "bf16-mixed"):
        loss = -model.log_prob(y, labels).mean()
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_tarflow_bf16_reconstruction_error_is_measured_and_small():
    """x -> z -> x with the KV-cached inverse under bf16: a token the inverse solves for equals the forward's
    input to float32 rounding (an exact 0 comes back as 3e-8), and where that flips one bf16 rounding inside
    the transformer, the later tokens' parameters move by a bf16 step.  Measured on these weights: 1.7e-2
    (float32: 2e-6), the same with the uncached and the Jacobi inverse; below half a pixel bin."""
    model = tarflow_like_digits()
    x, labels, index = digits_batch()
    scores = {p: evaluate_split(model, UniformDequantization(K), [(x, labels, index)], class_conditional=True,
                                precision=p) for p in ("32-true", "bf16-mixed")}
    assert scores["32-true"].recon_error < 1e-4
    assert scores["32-true"].recon_error <= scores["bf16-mixed"].recon_error < 0.5 / K  # half a pixel bin
    assert abs(scores["bf16-mixed"].bpd / scores["32-true"].bpd - 1) < 0.01


def test_tarflow_bf16_mixed_training_run_on_digits(tmp_path):
    """trainer.precision=bf16-mixed with TarFlow (in process): finite losses, no step skipped, finite test bpd."""
    cfg = compose_train(tmp_path, ["model=tarflow", "model.width=16", "model.num_blocks=2", "model.layers_per_block=1",
                                   "model.num_heads=2", "trainer.precision=bf16-mixed", "logger=csv", *FAST,
                                   "run_name=bf16", "callbacks.invertibility_monitor.every_n_steps=3"])
    train_cli.train(cfg)
    rows = list(csv.DictReader((Path(cfg.paths.output_dir) / "csv" / "version_0" / "metrics.csv").open()))
    train = [float(r["train/bpd"]) for r in rows if r.get("train/bpd")]
    skipped = [float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")]
    assert len(train) == 6 and all(math.isfinite(v) for v in train)
    assert skipped and max(skipped) == 0
    assert math.isfinite(float([r for r in rows if r.get("test/bpd")][-1]["test/bpd"]))
    assert max(float(r["train/recon_error"]) for r in rows if r.get("train/recon_error")) < 1e-4


def test_16_mixed_on_the_cpu_is_refused_with_a_pointer_to_bf16():
    with pytest.raises(ValueError, match="needs a CUDA device.*bf16-mixed"):
        autocast_context(torch.device("cpu"), "16-mixed")


def test_bf16_mixed_training_run_on_digits(tmp_path):
    run = run_entry("train.py", ["logger=csv", *FAST, "trainer.precision=bf16-mixed", "run_name=bf16",
                                 "model.hidden_channels=16"], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    rows = list(csv.DictReader((run_dir(tmp_path, "bf16") / "csv" / "version_0" / "metrics.csv").open()))
    train = [float(r["train/bpd"]) for r in rows if r.get("train/bpd")]
    skipped = [float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")]
    assert len(train) == 6 and all(math.isfinite(v) for v in train)
    assert skipped and max(skipped) == 0  # no step was dropped by the NaN guard
    assert math.isfinite(float([r for r in rows if r.get("test/bpd")][-1]["test/bpd"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_training_on_cuda(tmp_path, precision):
    run = run_entry("train.py", ["logger=csv", *[a for a in FAST if a != "trainer.accelerator=cpu"],
                                 "trainer.accelerator=gpu", f"trainer.precision={precision}", "run_name=gpu"], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    rows = list(csv.DictReader((run_dir(tmp_path, "gpu") / "csv" / "version_0" / "metrics.csv").open()))
    assert all(math.isfinite(float(r["train/bpd"])) for r in rows if r.get("train/bpd"))

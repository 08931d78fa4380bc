"""CUDA-only checks (pytest marker ``gpu``; skipped without a CUDA device): what the CPU suite cannot show.

16-mixed training with Lightning's grad scaler, bf16-mixed and 16-mixed bpd parity with float32, NHWC
conditioners and torch.compile (inductor) giving the eager numbers on the GPU.  ``scripts/device_check.py``
runs them first; the CPU versions of the parity, channels_last and compile tests are in
tests/test_mixed_precision.py and tests/test_performance.py.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager

import pytest
import torch

from flowgen.benchmark.device_check import DRY_RUN, synthetic_images, train_on_synthetic_images, variant
from flowgen.cli.device_check import experiment_composer
from flowgen.evaluation import autocast_context
from flowgen.models import Glow, RealNVP, TarFlow
from flowgen.performance import compile_model, set_channels_last
from tests.conftest import initialize_actnorms, perturb_parameters

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
K = 256


@contextmanager
def exact_float32():
    """No TF32 in matrix products and convolutions, so that two float32 layouts or compilations of the same
    arithmetic agree to rounding."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def images(n: int = 16, size: int = 8) -> torch.Tensor:
    """Smooth images in [-1/2, 1/2) at bin centres (no dequantization noise: the same input in every run)."""
    return ((synthetic_images(n, 3, size, K).float() + 0.5) / K - 0.5).to(DEVICE)


def small_models() -> dict:
    return {
        "glow": lambda: Glow(3, 8, scales=2, steps=2, hidden_channels=32),
        "realnvp": lambda: RealNVP(3, 8, scales=2, hidden_channels=16, num_blocks=2),
        "tarflow": lambda: TarFlow(3, 8, patch_size=2, width=64, num_blocks=2, layers_per_block=2, num_heads=4),
    }


def trained_like(name: str) -> torch.nn.Module:
    """A small flow on the GPU with perturbed weights and ActNorm initialised on the test images."""
    torch.manual_seed(0)
    model = small_models()[name]().to(DEVICE)
    perturb_parameters(model, std=0.02)
    initialize_actnorms(model, images())
    return model


def loss_and_grads(model, x):
    model.zero_grad()
    loss = -model.log_prob(x).mean()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("name", ["glow", "realnvp", "tarflow"])
def test_mixed_precision_bpd_is_within_one_percent_of_float32_on_cuda(name, precision):
    """The same weights and images: log p in float32 under both precisions, bpd within 1% of float32's."""
    model, x = trained_like(name).eval(), images()
    with torch.no_grad():
        reference = model.log_prob(x)
        with autocast_context(torch.device(DEVICE), precision):
            mixed = model.log_prob(x)
            _, logdet = model(x)
    assert mixed.dtype == logdet.dtype == torch.float32
    bpd = {key: (-value.mean().item() / (x[0].numel() * math.log(2)) + 8) for key, value in
           (("32-true", reference), (precision, mixed))}
    assert math.isfinite(bpd[precision]) and abs(bpd[precision] / bpd["32-true"] - 1) < 0.01, bpd


@pytest.mark.parametrize("name", ["glow", "realnvp"])
def test_channels_last_conditioners_change_no_number_on_cuda(name):
    x = images()
    nchw, nhwc = trained_like(name), trained_like(name)
    assert set_channels_last(nhwc, True) > 0 and set_channels_last(nchw, False) > 0
    with exact_float32():
        loss_a, grads_a = loss_and_grads(nchw, x)
        loss_b, grads_b = loss_and_grads(nhwc, x)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    assert (grads_b - grads_a).norm() <= 1e-4 * grads_a.norm()


@pytest.mark.parametrize("name", ["glow", "tarflow"])
def test_compiled_model_gives_the_eager_log_prob_and_gradients_on_cuda(name):
    """performance.compile=step with inductor (the GPU code generator) against the eager model."""
    torch._dynamo.reset()
    x = images()
    eager, compiled = trained_like(name), trained_like(name)
    compile_model(compiled, "step")
    with exact_float32():
        loss_a, grads_a = loss_and_grads(eager, x)
        loss_b, grads_b = loss_and_grads(compiled, x)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    assert (grads_b - grads_a).norm() <= 1e-4 * grads_a.norm()


def test_16_mixed_training_runs_with_its_grad_scaler(tmp_path):
    """Lightning's 16-mixed on the paper Glow's code path (tiny widths): the grad scaler is active, every loss
    is finite, the loss falls, and the NaN guard skips a step only where the scaler found an overflow (each
    overflow halves the scale from its 2^16 start, so skipped steps <= log2(2^16 / final scale))."""
    compose = experiment_composer(tmp_path)
    cfg = compose("glow_cifar10", tuple(DRY_RUN.overrides["glow_cifar10"]))
    sizes = dataclasses.replace(DRY_RUN, train_steps=30)
    figures = train_on_synthetic_images(variant(cfg, **{"trainer.precision": "16-mixed"}), torch.device(DEVICE),
                                        sizes)
    assert figures["loss_scale"] is not None and 0 < figures["loss_scale"] < math.inf, figures
    assert figures["steps"] == 30 and figures["all_finite"], figures
    assert figures["skipped_steps"] <= math.log2(2**16 / figures["loss_scale"]), figures
    assert figures["last_bpd"] < figures["first_bpd"], figures

"""likelihood.py against answers known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from flowgen.likelihood import (
    bits_per_dim,
    dequantize,
    discretization_log_volume,
    importance_weighted_bound,
    log_likelihood_bound,
    nats_to_bpd,
    quantize,
    to_unit_interval,
)


@pytest.mark.parametrize("num_levels", [2, 17, 32, 256])
def test_uniform_model_scores_exactly_log2_levels(num_levels):
    """p_Y = 1 on [-1/2, 1/2)^D (log p_Y = 0): every image has P(x) = K^{-D}, i.e. log2 K bits/dim."""
    d = 3 * 8 * 8
    log_p_y = torch.zeros(5)
    bpd = bits_per_dim(log_likelihood_bound(log_p_y, d, num_levels), d)
    assert torch.allclose(bpd, torch.full((5,), math.log2(num_levels)), atol=1e-6)


def test_standard_normal_identity_model_on_known_input():
    """Identity flow, standard-normal base, all-zero 1-bit image with u = 1/2: y = -1/4 everywhere."""
    d, num_levels = 12, 2
    x = torch.zeros(1, d, dtype=torch.long)
    y = dequantize(x, torch.full((1, d), 0.5), num_levels)
    assert torch.allclose(y, torch.full((1, d), -0.25))
    log_p_y = (-0.5 * math.log(2 * math.pi) - 0.5 * y**2).sum(1)
    expected_bpd = -(d * (-0.5 * math.log(2 * math.pi) - 0.5 * 0.0625) - d * math.log(2)) / (d * math.log(2))
    assert bits_per_dim(log_likelihood_bound(log_p_y, d, num_levels), d).item() == pytest.approx(expected_bpd)


def test_dequantize_then_quantize_recovers_pixels_and_stays_in_range():
    x = torch.randint(0, 17, (4, 1, 8, 8))
    u = torch.rand(4, 1, 8, 8) * 0.999999
    y = dequantize(x, u, 17)
    assert y.min() >= -0.5 and y.max() < 0.5
    assert torch.equal(quantize(y, 17), x)
    assert torch.equal(quantize(torch.tensor([-3.0, 3.0]), 17), torch.tensor([0, 16]))
    img = to_unit_interval(y, 17)
    assert img.min() >= 0 and img.max() <= 1


def test_variational_bound_subtracts_log_q():
    log_p_y, log_q = torch.tensor([-10.0, -20.0]), torch.tensor([-1.0, 2.0])
    bound = log_likelihood_bound(log_p_y, 4, 256, log_q)
    assert torch.allclose(bound, log_p_y - log_q + discretization_log_volume(4, 256))


def test_importance_weighted_bound_single_sample_equals_elbo_and_more_samples_never_lower():
    torch.manual_seed(0)
    log_p_y, log_q = torch.randn(16, 5) * 3, torch.randn(16, 5)
    elbo = log_likelihood_bound(log_p_y, 10, 256, log_q)  # (S, B)
    iw1 = importance_weighted_bound(log_p_y[:1], log_q[:1], 10, 256)
    assert torch.equal(iw1, elbo[0])
    iw16 = importance_weighted_bound(log_p_y, log_q, 10, 256)
    assert (iw16 >= elbo.mean(0) - 1e-6).all()


def test_importance_weighted_bound_converges_to_exact_bin_mass():
    """D = 1, K = 4, standard-normal p_Y, uniform q: P(x) = Φ(b) - Φ(a) over the pixel's bin."""
    num_levels, x = 4, torch.tensor([1])
    a, b = (1 / 4 - 0.5), (2 / 4 - 0.5)
    phi = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    exact = math.log(phi(b) - phi(a))
    u = torch.rand(200_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = dequantize(x.double(), u, num_levels)
    log_p_y = (-0.5 * math.log(2 * math.pi) - 0.5 * y**2).sum(1, keepdim=True)  # (S, 1)
    iw = importance_weighted_bound(log_p_y, torch.zeros_like(log_p_y), 1, num_levels)
    elbo = log_likelihood_bound(log_p_y, 1, num_levels).mean()
    assert iw.item() == pytest.approx(exact, abs=1e-4)
    assert elbo.item() < exact  # Jensen gap of the plain bound


def test_nats_to_bpd_matches_bits_per_dim():
    nll = torch.tensor([100.0, 250.0])
    assert torch.allclose(nats_to_bpd(nll, 64), bits_per_dim(-nll, 64))


def test_likelihood_terms_are_float32_for_low_precision_inputs():
    log_p = torch.tensor([-5.0], dtype=torch.bfloat16)
    assert log_likelihood_bound(log_p, 4, 256).dtype == torch.float32

"""Elementwise transforms (flowgen/transforms.py): every registered transform, with random parameters,
is a monotone bijection whose log-derivative is the autograd derivative's log and whose inverse,
``invert`` and inverse log-derivative agree.  A new transform is one case in CASES.

Tests of: flowgen/transforms/splines.py.
"""

from __future__ import annotations

import pytest
import torch

from flowgen.transforms import AFFINE_SCALES, TRANSFORMS, TransformOptions, make_transform

# (registry name, options): every name of the registry, every affine scale
CASES = [("additive", TransformOptions()), ("spline", TransformOptions(spline_bins=5, spline_bound=2.0))] + [
    ("affine", TransformOptions(scale=scale, alpha_shape=(3,))) for scale in AFFINE_SCALES]


def test_every_registered_transform_has_a_case():
    assert {name for name, _ in CASES} == set(TRANSFORMS)


def _inputs(transform, scale: float = 1.0):
    torch.manual_seed(0)
    x = 3 * torch.randn(4, 3, dtype=torch.float64)  # a spline's tails (|x| > B) included
    params = scale * torch.randn(4, 3, transform.num_params, dtype=torch.float64)
    return x, params


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{o.scale}" if n == "affine" else n for n, o in CASES])
def test_transform_is_an_exact_bijection_with_its_log_derivative(name, options):
    transform = make_transform(name, options).double()
    for p in transform.parameters():  # the tanh scale's α: away from its initial 1
        p.data.uniform_(0.5, 2.0)
    x, params = _inputs(transform)
    z, log_derivative = transform(x, params)
    back, inverse_log_derivative = transform.inverse(z, params)
    assert torch.allclose(back, x, atol=1e-10)
    assert torch.equal(transform.invert(z, params), back)
    # elementwise: z_i depends on x_i alone, so the gradient of Σ z is the vector of derivatives dz_i/dx_i
    derivative = torch.autograd.grad(transform(x.requires_grad_(True), params)[0].sum(), x)[0].flatten()
    x = x.detach()
    assert (derivative > 0).all()  # monotone increasing
    if log_derivative is None:  # volume preserving
        assert inverse_log_derivative is None and torch.allclose(derivative, torch.ones_like(derivative))
        return
    assert torch.allclose(log_derivative.flatten(), derivative.log(), atol=1e-9)
    assert torch.allclose(inverse_log_derivative, -log_derivative, atol=1e-9)
    assert torch.equal(transform.log_derivative(x, params), log_derivative)


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{o.scale}" if n == "affine" else n for n, o in CASES])
def test_zero_parameters_start_at_the_identity(name, options):
    """A zero-initialised conditioner starts every layer at the identity; Glow's σ(h + 2) at the scale σ(2)."""
    transform = make_transform(name, options).double()
    x, params = _inputs(transform)
    z, _ = transform(x, torch.zeros_like(params))
    expected = x * torch.sigmoid(torch.tensor(2.0, dtype=torch.float64)) if options.scale == "sigmoid" and \
        name == "affine" else x
    assert torch.allclose(z, expected, atol=1e-12)


@pytest.mark.parametrize("name, options, message", [
    ("spline2", TransformOptions(), "unknown transform 'spline2'"),
    ("affine", TransformOptions(scale="softplus"), "unknown affine scale"),
    ("spline", TransformOptions(spline_bins=1), "spline_bins >= 2"),
    ("spline", TransformOptions(spline_bound=0.0), "spline_bound > 0"),
])
def test_bad_options_end_in_one_line(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_transform(name, options)

"""flowgen.evaluation (the one implementation of the bounds) and flowgen.latents, in process."""

from __future__ import annotations

import math

import pytest
import torch

from flowgen.dequantization import UniformDequantization, VariationalDequantization
from flowgen.evaluation import evaluate_split, image_generators, likelihood_bounds
from flowgen.latents import interpolate, interpolate_vectors, reconstruct
from flowgen.likelihood import bits_per_dim
from flowgen.models import Glow
from tests.conftest import initialize_actnorms, perturb_parameters

K = 17


def flow_and_dequantizer(kind: str):
    torch.manual_seed(0)
    model = Glow(in_channels=1, image_size=4, scales=2, steps=2, hidden_channels=8)
    dequantizer = UniformDequantization(K) if kind == "uniform" else VariationalDequantization(K, channels=1,
                                                                                                hidden_channels=8)
    perturb_parameters(model, std=0.05)
    perturb_parameters(dequantizer, std=0.2, seed=1)  # the noise flow leaves its identity
    initialize_actnorms(model, torch.rand(16, 1, 4, 4) - 0.5)
    model.eval()
    return model, dequantizer


def pixels(n=6, seed=0):
    return torch.randint(0, K, (n, 1, 4, 4), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["uniform", "variational"])
def test_importance_weighted_bound_is_above_the_elbo_on_the_same_draws(kind):
    model, dequantizer = flow_and_dequantizer(kind)
    with torch.no_grad():
        elbo, iw, _ = likelihood_bounds(model, dequantizer, pixels(), num_samples=8,
                                        generator=torch.Generator().manual_seed(0))
    assert torch.all(iw >= elbo - 1e-5)
    assert torch.any(iw > elbo + 1e-4)  # the draws differ, so Jensen's gap is strict somewhere


@pytest.mark.parametrize("kind", ["uniform", "variational"])
def test_bounds_agree_exactly_with_one_draw(kind):
    model, dequantizer = flow_and_dequantizer(kind)
    with torch.no_grad():
        elbo, iw, y = likelihood_bounds(model, dequantizer, pixels(), num_samples=1,
                                        generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(iw, elbo, rtol=0, atol=1e-5)
    # and the ELBO is log p(y) - log q(u|x) - D log K for that one draw
    y_again, log_q = dequantizer(pixels(), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(y, y_again)
    with torch.no_grad():
        direct = model.log_prob(y) - log_q - 16 * math.log(K)
    torch.testing.assert_close(elbo, direct, rtol=0, atol=1e-4)


def test_split_score_is_an_average_over_images_in_order():
    model, dequantizer = flow_and_dequantizer("uniform")
    x = pixels(10)
    index = torch.arange(10)
    batches = [(x[:4], torch.zeros(4), index[:4]), (x[4:], torch.zeros(6), index[4:])]  # uneven batches
    score = evaluate_split(model, dequantizer, batches, seed=2)
    per_image = []
    for xb, _, ib in batches:
        with torch.no_grad():
            elbo, _, _ = likelihood_bounds(model, dequantizer, xb, generator=image_generators("cpu", 2, ib))
        per_image.append(bits_per_dim(elbo, 16))
    per_image = torch.cat(per_image)
    torch.testing.assert_close(score.per_image_bpd, per_image)
    assert score.num_images == 10 and score.bpd == pytest.approx(per_image.double().mean().item())
    assert score.recon_error < 1e-5


@pytest.mark.parametrize("kind", ["uniform", "variational"])
def test_an_images_score_does_not_depend_on_its_batch(kind):
    """Noise seeded per image: any batching, and any sharing out among DDP ranks, gives the same scores."""
    model, dequantizer = flow_and_dequantizer(kind)
    x, index = pixels(10), torch.arange(10)
    whole = evaluate_split(model, dequantizer, [(x, torch.zeros(10), index)], num_samples=2, seed=4)
    # rank 0 of 2 scores images 0, 2, 4, ...; rank 1 images 1, 3, 5, ... (EvaluationShardSampler)
    shards = [evaluate_split(model, dequantizer, [(x[r::2], torch.zeros(5), index[r::2])], num_samples=2, seed=4)
              for r in (0, 1)]
    interleaved = torch.stack([shards[0].per_image_bpd, shards[1].per_image_bpd], dim=1).flatten()
    torch.testing.assert_close(interleaved, whole.per_image_bpd, rtol=0, atol=1e-5)
    other_seed = evaluate_split(model, dequantizer, [(x, torch.zeros(10), index)], num_samples=2, seed=5)
    assert not torch.allclose(other_seed.per_image_bpd, whole.per_image_bpd)


def test_the_global_rng_is_left_alone():
    model, dequantizer = flow_and_dequantizer("uniform")
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    evaluate_split(model, dequantizer, [(pixels(), torch.zeros(6), torch.arange(6))])
    torch.testing.assert_close(torch.rand(3), expected)


def test_interpolation_end_points_are_the_images():
    model, _ = flow_and_dequantizer("uniform")
    y = torch.rand(2, 1, 4, 4) - 0.5
    for method in ("linear", "spherical"):
        path = interpolate(model, y[0], y[1], steps=5, method=method)
        assert path.shape == (5, 1, 4, 4)
        torch.testing.assert_close(path[0], y[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(path[-1], y[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(reconstruct(model, y), y, atol=1e-5, rtol=0)


def test_spherical_interpolation_keeps_the_norm():
    a, b = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    b = b * a.norm() / b.norm()
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    sphere = interpolate_vectors(a, b, t, "spherical")
    torch.testing.assert_close(sphere.norm(dim=1), torch.full((7,), a.norm().item(), dtype=torch.float64))
    line = interpolate_vectors(a, b, t, "linear")
    assert line[3].norm() < a.norm() - 1e-3  # the chord dips inside the shell
    # parallel vectors have no great circle: the linear path
    parallel = interpolate_vectors(a, 2 * a, t, "spherical")
    torch.testing.assert_close(parallel, interpolate_vectors(a, 2 * a, t, "linear"))
    with pytest.raises(ValueError, match="interpolation='cubic'"):
        interpolate_vectors(a, b, t, "cubic")

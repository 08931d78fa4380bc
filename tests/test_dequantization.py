"""Dequantization: uniform and Flow++ variational q(u|x) — contract, exactness, density, configs.

Tests of: flowgen/dequantization/base.py, flowgen/dequantization/uniform.py, flowgen/dequantization/variational.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from flowgen.dequantization import (
    DEQUANTIZATIONS,
    NoiseFlow,
    UniformDequantization,
    VariationalDequantization,
    level_bounds,
)
from flowgen.dequantization.gaussian_noise import log_normal_cdf_difference, noise_log_normalizer
from flowgen.errors import InvalidValueError
from flowgen.flows.noise import noise_like
from flowgen.likelihood import dequantize, log_likelihood_bound, quantize
from tests.conftest import jacobian_logdets, perturb_parameters

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "dequantization"
SMALL = dict(hidden_channels=8, num_couplings=4, feature_channels=4)


# tiny tensors: one intra-op thread is fastest, and immune to a busy 2-core CI box
pytestmark = pytest.mark.usefixtures("single_thread")


def surrogate_log_p(y: torch.Tensor) -> torch.Tensor:
    """A differentiable stand-in for the model's log p_Y(y): standard normal."""
    return (-0.5 * y.double() ** 2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def images(num_levels, batch=4, channels=3, height=5, width=6, seed=0):
    """Random levels with the extreme pixels 0 and K-1 always present."""
    x = torch.randint(0, num_levels, (batch, channels, height, width), generator=torch.Generator().manual_seed(seed))
    x[:, :, 0, 0], x[:, :, -1, -1] = 0, num_levels - 1
    return x


def noise_flow(channels, num_levels=17, std=0.1, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    flow = NoiseFlow(num_levels, channels, **SMALL).to(dtype)
    perturb_parameters(flow, std=std, seed=seed)
    return flow.eval()


# -- uniform -----------------------------------------------------------------------------------

@pytest.mark.parametrize("num_levels", [2, 17, 256])
def test_uniform_contract(num_levels):
    x = images(num_levels).to(torch.uint8 if num_levels <= 256 else torch.long)
    y, log_q = UniformDequantization(num_levels)(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert log_q.shape == (x.shape[0],) and log_q.dtype == torch.float32 and torch.equal(log_q, torch.zeros(4))
    assert torch.equal(quantize(y, num_levels), x.long())
    assert y.min() >= -0.5 and y.max() < 0.5


@pytest.mark.parametrize("num_levels", [17, 256])
def test_bin_edges_survive_float32_rounding(num_levels):
    """torch.rand's extreme values u = 0 and 1 - 2**-24 still quantize back to x (plain dequantize does not)."""
    x = torch.arange(num_levels).view(1, 1, 1, -1)
    deq = UniformDequantization(num_levels)
    for u in (0.0, 2.0**-24, 0.5, 1 - 2.0**-24):
        y = deq.model_input(x, torch.full(x.shape, u))
        assert torch.equal(quantize(y, num_levels), x), u
        assert y.min() >= -0.5 and y.max() < 0.5
        assert (y - dequantize(x, torch.full(x.shape, u), num_levels)).abs().max() <= 4 * 2.0**-25
    lo, hi = level_bounds(num_levels)
    assert torch.equal(quantize(lo, num_levels), torch.arange(num_levels))
    assert torch.equal(quantize(hi, num_levels), torch.arange(num_levels))


def test_pixels_outside_the_levels_or_float_pixels_are_refused():
    deq = UniformDequantization(17)
    with pytest.raises(ValueError, match="pixel levels span 0..255 but num_levels is 17"):
        deq(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2))
    with pytest.raises(TypeError, match="integer pixels"):
        deq(torch.rand(1, 1, 2, 2))
    with pytest.raises(ValueError, match="num_levels"):
        UniformDequantization(1)


# -- variational at initialisation -------------------------------------------------------------

@pytest.mark.parametrize("channels, height, width", [(1, 8, 8), (3, 5, 7), (3, 1, 1)])
def test_variational_starts_as_uniform_on_the_same_noise(channels, height, width):
    num_levels = 17
    x = images(num_levels, channels=channels, height=height, width=width)
    d = channels * height * width
    torch.manual_seed(3)
    y_uni, log_q_uni = UniformDequantization(num_levels)(x)
    var = VariationalDequantization(num_levels, channels, **SMALL)
    torch.manual_seed(3)
    y_var, log_q_var = var(x)
    assert y_var.dtype == torch.float32 and log_q_var.dtype == torch.float32 and log_q_var.shape == (x.shape[0],)
    assert (y_var - y_uni).abs().max() <= 1e-6 / num_levels + 1e-7  # u == u0 up to float32 logit/sigmoid
    assert log_q_var.abs().max() <= 1e-6
    bound_var = log_likelihood_bound(surrogate_log_p(y_var), d, num_levels, log_q_var)
    bound_uni = log_likelihood_bound(surrogate_log_p(y_uni), d, num_levels)
    assert torch.allclose(bound_var, bound_uni, atol=1e-5, rtol=0)
    # and directly on a given u0
    u0 = torch.rand(x.shape).clamp(2.0**-24, 1 - 2.0**-24)
    u, logdet = var.flow(u0, x)
    assert (u - u0).abs().max() <= 1e-6 and logdet.abs().max() <= 1e-6


# -- the noise flow: the layer contract in float64 ---------------------------------------------

@pytest.mark.parametrize("channels, height, width", [(1, 3, 3), (1, 2, 4), (3, 3, 2), (3, 1, 2)])
def test_noise_flow_inverse_and_jacobian(channels, height, width):
    flow = noise_flow(channels)
    x = images(17, batch=3, channels=channels, height=height, width=width)
    u0 = 0.02 + 0.96 * torch.rand(3, channels, height, width, dtype=torch.float64)
    u, logdet = flow(u0, x)
    assert logdet.shape == (3,) and logdet.dtype == torch.float64
    assert not torch.allclose(u, u0, atol=1e-3)  # the perturbation really moves the noise
    u0_rec, logdet_inv = flow.inverse(u, x)
    assert torch.allclose(u0_rec, u0, atol=1e-10, rtol=0), (u0_rec - u0).abs().max()
    assert torch.allclose(logdet_inv, -logdet, atol=1e-10, rtol=0)
    expected = torch.stack([
        jacobian_logdets(lambda inp, b=b: flow(inp, x[b : b + 1])[0], u0[b : b + 1])[0] for b in range(3)
    ])
    assert torch.allclose(logdet, expected, atol=1e-6, rtol=0), (logdet, expected)


def test_noise_flow_depends_on_the_pixels():
    flow = noise_flow(1)
    u0 = torch.rand(1, 1, 4, 4, dtype=torch.float64).expand(2, -1, -1, -1)
    x = torch.stack([torch.zeros(1, 4, 4), torch.full((1, 4, 4), 16)]).long()
    u, _ = flow(u0, x)
    assert not torch.allclose(u[0], u[1])


# -- support: u in [0, 1), y in x's bin --------------------------------------------------------

@pytest.mark.parametrize("num_levels", [17, 256])
@pytest.mark.parametrize("channels", [1, 3])
def test_samples_stay_in_the_bin_with_large_parameters(num_levels, channels):
    var = VariationalDequantization(num_levels, channels, **SMALL)
    perturb_parameters(var, std=2.0, seed=1)  # scales and shifts far from the identity
    x = images(num_levels, batch=8, channels=channels, height=4, width=5)
    x[:4] = 0
    x[4:6] = num_levels - 1  # whole images of extreme pixels
    for _ in range(3):
        u, log_q = var.draw_noise(x)
        assert u.min() >= 0 and u.max() < 1
        y, log_q = var(x)
        assert torch.equal(quantize(y, num_levels), x)
        assert y.min() >= -0.5 and y.max() < 0.5 and torch.isfinite(log_q).all()
    # the extreme base noise values map inside [0, 1) too
    for u0_value in (2.0**-24, 1 - 2.0**-24):
        u, logdet = var.flow(torch.full(x.shape, u0_value), x)
        assert u.min() >= 0 and u.max() <= 1 - 2.0**-24 and torch.isfinite(logdet).all()
        assert torch.equal(quantize(var.model_input(x, u), num_levels), x)


# -- q(u|x) is a density -----------------------------------------------------------------------

@pytest.mark.parametrize("height, width", [(1, 2), (2, 1)])
def test_variational_density_integrates_to_one(height, width):
    """D = 2: Σ q(u|x) ΔA over a fine grid of the unit square is 1, for a q far from uniform.

    The grid is uniform in logit coordinates, u = σ(t) with t on a midpoint grid of [-T, T]^2,
    so the cell at t has area ΔA = σ'(t1) σ'(t2) Δt².  It is fine near the edges, where q(u|x)
    behaves like u^(1/s - 1) for a logit-space scale s and may have an integrable singularity
    that a grid uniform in u cannot resolve.  The mass beyond |t| = T is below 1e-4 here.
    """
    torch.manual_seed(2)
    flow = NoiseFlow(17, 1, hidden_channels=4, num_couplings=2, feature_channels=4).double()
    perturb_parameters(flow, std=0.05, seed=2)
    flow.eval()
    n, limit = 250, 30.0
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 * limit - limit
    t = torch.cartesian_prod(grid, grid)
    u = torch.sigmoid(t).view(n * n, 1, height, width)
    log_cell = F.logsigmoid(t).sum(1) + F.logsigmoid(-t).sum(1) + 2 * math.log(2 * limit / n)
    central = (t.abs() < 3).all(1)
    for pixels in ([0, 16], [7, 3]):
        x = torch.tensor(pixels).view(1, 1, height, width).expand(n * n, -1, -1, -1)
        with torch.no_grad():
            log_q = flow.log_prob(u, x)
        mass = (log_q + log_cell).exp().sum().item()
        assert abs(mass - 1) < 0.01, mass
        assert (log_q[central].max() - log_q[central].min()).exp() > 1.5  # not the uniform density


# -- training signal ---------------------------------------------------------------------------

def test_gradients_reach_the_variational_parameters():
    x = images(17, channels=3)
    var = VariationalDequantization(17, 3, **SMALL)
    y, log_q = var(x)
    (-(surrogate_log_p(y) - log_q).mean()).backward()
    # at initialisation the zero-initialised last layers get gradients: learning can start
    last = [c.net.net[-1].conv.weight.grad for c in var.flow.couplings]
    assert all(g is not None and g.abs().sum() > 0 for g in last)
    # away from initialisation every parameter gets a finite, non-zero gradient
    var.zero_grad()
    perturb_parameters(var, std=0.1)
    y, log_q = var(x)
    (-(surrogate_log_p(y) - log_q).mean()).backward()
    for name, p in var.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_float32_and_autocast_off_under_bf16():
    x = images(17, channels=3)
    var = VariationalDequantization(17, 3, **SMALL)
    perturb_parameters(var, std=0.1)
    torch.manual_seed(5)
    y, log_q = var(x)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_amp, log_q_amp = var(x)
    assert y_amp.dtype == torch.float32 and log_q_amp.dtype == torch.float32
    assert torch.equal(y, y_amp) and torch.equal(log_q, log_q_amp)


# -- several samples per image -----------------------------------------------------------------

@pytest.mark.parametrize("kind", DEQUANTIZATIONS)
def test_sample_noise_shapes_and_independence(kind):
    x = images(17, batch=2, channels=1, height=4, width=4)
    deq = UniformDequantization(17) if kind == "uniform" else VariationalDequantization(17, 1, **SMALL)
    if kind == "variational":
        perturb_parameters(deq, std=0.1)
    y, log_q = deq.sample_noise(x, 3)
    assert y.shape == (3, 2, 1, 4, 4) and log_q.shape == (3, 2)
    assert y.dtype == torch.float32 and log_q.dtype == torch.float32
    assert all(torch.equal(quantize(y[s], 17), x) for s in range(3))
    assert not torch.equal(y[0], y[1]) and not torch.equal(y[1], y[2])
    if kind == "variational":
        assert not torch.equal(log_q[0], log_q[1])
    with pytest.raises(ValueError, match="num_samples"):
        deq.sample_noise(x, 0)


def test_state_dict_round_trip_gives_the_same_density():
    var = VariationalDequantization(17, 3, **SMALL)
    perturb_parameters(var, std=0.1)
    fresh = VariationalDequantization(17, 3, **SMALL)
    fresh.load_state_dict(var.state_dict())
    x = images(17)
    torch.manual_seed(0)
    a = var(x)
    torch.manual_seed(0)
    b = fresh(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- configs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DEQUANTIZATIONS)
@pytest.mark.parametrize("channels", [1, 3])
def test_configs_compose_and_instantiate(kind, channels):
    cfg = OmegaConf.create({"data": {"channels": channels, "num_levels": 17},
                            "dequantization": OmegaConf.load(CONFIG_DIR / f"{kind}.yaml")})
    cfg.dequantization.pop("defaults")  # its schema (flowgen/config/schema.py); composing is tested in test_configs
    deq = hydra.utils.instantiate(cfg.dequantization, num_levels=17)
    expected = UniformDequantization if kind == "uniform" else VariationalDequantization
    assert type(deq) is expected and deq.num_levels == 17
    if kind == "variational":
        assert deq.flow.channels == channels
    x = images(17, batch=2, channels=channels, height=4, width=4)
    y, log_q = deq(x)
    assert torch.equal(quantize(y, 17), x) and log_q.shape == (2,)


# ---- Gaussian noise augmentation (dequantization/gaussian_noise.py, TarFlow) ------------------------


def test_log_normal_cdf_difference_is_accurate_in_the_tails():
    a = torch.tensor([3.0, 0.5, -4.0, 40.0, -38.0, 12.0], dtype=torch.float64)
    b = torch.tensor([-3.0, 0.2, -5.0, 39.0, -39.0, -12.0], dtype=torch.float64)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    direct = torch.log(normal.cdf(a[:3]) - normal.cdf(b[:3]))
    assert torch.allclose(log_normal_cdf_difference(a, b)[:3], direct, atol=1e-12, rtol=0)
    # far tails: log(Φ(40) - Φ(39)) ≈ log φ(39)/39 (Mills ratio), where the direct formula gives -inf
    mills = torch.tensor([-(t**2) / 2 - 0.5 * math.log(2 * math.pi) - math.log(t) for t in (39.0, 38.0)],
                         dtype=torch.float64)
    assert torch.allclose(log_normal_cdf_difference(a[3:5], b[3:5]), mills, atol=1e-3, rtol=0)
    assert log_normal_cdf_difference(a[5:], b[5:]).abs() < 1e-30


@pytest.mark.parametrize("sigma", [0.05, 0.3])
def test_noise_bound_is_a_valid_bound_on_a_proper_discrete_model(sigma):
    """1 pixel, K = 4 levels, p_Y = N(0.1, 0.3²).  The decoder r(x|y) = q(y|x)/m(y) makes P(x) a
    distribution on the levels; E_q[log p_Y(y) - log_q] - log K is below log P(x) for every x."""
    K = 4
    y = torch.linspace(-3.0, 3.0, 200001, dtype=torch.float64)  # holds p_Y and the noise to 1e-9
    dy = (y[1] - y[0]).item()
    log_p_y = torch.distributions.Normal(0.1, 0.3).log_prob(y)
    levels = torch.arange(K, dtype=torch.float64)[:, None]
    # log q(y|x) for every level x, (K, N), and log m(y) = log Σ_x q(y|x) from its telescoped closed form
    log_q_yx = math.log(K) + log_normal_cdf_difference((y - levels / K + 0.5) / sigma,
                                                       (y - (levels + 1) / K + 0.5) / sigma)
    log_m = math.log(K) + noise_log_normalizer(y[:, None], sigma)
    assert torch.allclose(torch.logsumexp(log_q_yx, 0), log_m, atol=1e-9, rtol=0)
    P = (log_p_y.exp() * (log_q_yx - log_m).exp() * dy).sum(1)  # ∫ p_Y(y) r(x|y) dy
    assert abs(P.sum().item() - 1) < 1e-6
    # E_{q(y|x)}[log p_Y(y) - log_q] - log K, with log_q = log m(y) - log K as the dequantizer returns it
    bound = (log_q_yx.exp() * dy * (log_p_y - (log_m - math.log(K)))).sum(1) - math.log(K)
    assert (bound <= P.log()).all()
    assert (P.log() - bound < 0.5).all()  # and not vacuous
    # the naive E_q[log p_Y(y) - log q(y|x)] is no bound of any distribution on the levels
    naive = (log_q_yx.exp() * dy * (log_p_y - log_q_yx)).sum(1)
    if sigma > 0.1:
        assert naive.exp().sum() > 1


def test_noise_bound_tends_to_the_uniform_bound_as_sigma_goes_to_zero():
    x = torch.randint(0, 17, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    uniform_y, uniform_log_q = UniformDequantization(17)(x, torch.Generator().manual_seed(1))
    y, log_q = UniformDequantization(17, noise_std=0.0)(x, torch.Generator().manual_seed(1))
    assert torch.equal(y, uniform_y) and torch.equal(log_q, uniform_log_q)
    y, log_q = UniformDequantization(17, noise_std=1e-4)(x, torch.Generator().manual_seed(1))
    assert (y - uniform_y).abs().max() < 1e-3 and log_q.abs().max() < 1e-6
    assert torch.allclose(log_q, noise_log_normalizer(y, 1e-4))
    y, log_q = UniformDequantization(17, noise_std=0.1)(x, [torch.Generator().manual_seed(i) for i in range(3)])
    assert y.shape == x.shape and log_q.shape == (3,) and (log_q <= 0).all() and (log_q < -1e-3).any()


def test_per_image_generators_give_each_image_its_noise_whatever_its_batch():
    """flowgen/flows/noise.py: with one generator per image, image i's noise is the same alone or in a batch."""
    x = torch.zeros(3, 1, 2, 2)
    batch = noise_like(torch.rand, x, [torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    alone = noise_like(torch.rand, x[1:2], [torch.Generator().manual_seed(6)])
    assert torch.equal(batch[1:2], alone) and not torch.equal(batch[0], batch[1])
    with pytest.raises(InvalidValueError, match="2 generators for a batch of 3 images"):
        noise_like(torch.randn, x, [torch.Generator(), torch.Generator()])

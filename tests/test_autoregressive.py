"""Masked autoregressive layers (flowgen.flows.autoregressive): MAF and IAF with every transform and order.

float64, tiny D, perturbed weights: exact inverses, log-determinants against the full autograd Jacobian,
the autoregressive (triangular) structure, MADE's masks, and how many conditioner passes each direction costs.

Tests of: flowgen/benchmark/autoregressive.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowgen.flows.autoregressive import MADE, MaskedAutoregressive, input_order
from flowgen.transforms import TRANSFORMS, Spline, TransformOptions
from tests.conftest import perturb_parameters

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only contend on 2 shared cores

# every registered transform, and every affine scale
TRANSFORM_CASES = {
    f"{name}-{scale}" if name == "affine" else name: (name, scale)
    for name in TRANSFORMS for scale in (("sigmoid", "tanh", "exp") if name == "affine" else ("tanh",))
}
ORDERS = {"identity": None, "reverse": "reverse", "permutation": [2, 0, 4, 1, 3]}
DIM, BATCH, COND = 5, 4, 3


def make_layer(transform: str, direction: str, order=None, cond_features: int = 0, dim: int = DIM,
               seed: int = 0) -> MaskedAutoregressive:
    name, scale = TRANSFORM_CASES[transform]
    torch.manual_seed(seed)
    options = TransformOptions(scale=scale, alpha_shape=(dim,), spline_bins=4, spline_bound=2.0)
    layer = MaskedAutoregressive(dim, 8, name, direction, order=order, options=options,
                                 cond_features=cond_features).double()
    perturb_parameters(layer, std=0.3, seed=seed)  # the zero-initialised last layer would make it the identity
    return layer


def jacobians(fn, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """(B, D, D): ∂fn(x)_i / ∂x_j of each sample, from autograd."""
    rows = []
    for b in range(x.shape[0]):
        c = None if cond is None else cond[b : b + 1]
        rows.append(torch.autograd.functional.jacobian(lambda v, c=c: fn(v, c)[0], x[b : b + 1])[0, :, 0])
    return torch.stack(rows)


def before(order: torch.Tensor) -> torch.Tensor:
    """(D, D) bool: [i, j] = element j comes strictly before element i in the order."""
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    return position[None, :] < position[:, None]


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "context"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("direction", ["maf", "iaf"])
@pytest.mark.parametrize("transform", TRANSFORM_CASES)
def test_layer_inverts_exactly_and_its_logdet_is_the_jacobian_log_determinant(transform, direction, order,
                                                                              conditional):
    layer = make_layer(transform, direction, ORDERS[order], COND if conditional else 0)
    generator = torch.Generator().manual_seed(1)
    x = 1.5 * torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64)  # some beyond the spline's ±2
    cond = torch.randn(BATCH, COND, generator=generator, dtype=torch.float64) if conditional else None

    z, logdet = layer(x, cond)
    x_back, inverse_logdet = layer.inverse(z, cond)
    assert logdet.shape == (BATCH,) and logdet.dtype == torch.float64
    assert torch.allclose(x_back, x, atol=1e-10)
    assert torch.equal(layer.invert(z, cond), x_back)
    assert torch.allclose(inverse_logdet, -logdet, atol=1e-10)

    jac = jacobians(layer, x, cond)
    assert torch.allclose(logdet, torch.linalg.slogdet(jac)[1], atol=1e-9)
    if transform != "additive":
        assert logdet.abs().max() > 0.05  # not a volume-preserving map by accident
    # autoregressive: z_i depends on x_i and the elements before i in the order, on nothing after
    pi = layer.order
    allowed = before(pi) | torch.eye(DIM, dtype=torch.bool)
    assert torch.all(jac[:, ~allowed] == 0)
    assert torch.all(jac[:, before(pi)].abs().amax(0) > 1e-6)  # ... and on every one before it
    inverse_jac = jacobians(layer.inverse, z, cond)
    assert torch.all(inverse_jac[:, ~allowed] == 0)
    if conditional:  # the context reaches every element, the first in the order too
        grad = torch.autograd.functional.jacobian(lambda c: layer(x, c)[0], cond)  # (B, D, B, C)
        assert torch.all(torch.einsum("bdbc->bd", grad.abs()).amax(0) > 1e-6)


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "context"])
@pytest.mark.parametrize("order", ORDERS)
def test_made_output_of_element_i_sees_exactly_the_elements_before_i(order, conditional):
    pi = input_order(DIM, ORDERS[order])
    params, hidden = 3, 6
    made = MADE(pi, hidden, params, num_hidden_layers=2, cond_features=COND if conditional else 0).double()
    perturb_parameters(made, std=0.5)
    v = torch.randn(1, DIM, dtype=torch.float64)
    cond = torch.randn(1, COND, dtype=torch.float64) if conditional else None
    jac = torch.autograd.functional.jacobian(lambda u: made(u, cond), v)[0, :, 0]  # (P·D, D)
    jac = jac.view(params, DIM, DIM)  # [p, i, j]: output p·D + i belongs to element i
    visible = jac.abs().amax(0) > 0
    assert torch.equal(visible, before(pi))  # no more (the masks) and no less (hidden >= D - 1 cycles all degrees)


@pytest.mark.parametrize(("direction", "forward_passes", "inverse_passes"), [("maf", 1, DIM), ("iaf", DIM, 1)])
def test_maf_has_one_pass_density_and_iaf_one_pass_sampling(direction, forward_passes, inverse_passes):
    layer = make_layer("spline", direction)
    calls = []
    layer.made.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(BATCH, DIM, dtype=torch.float64)

    def passes(fn, *args):
        calls.clear()
        out = fn(*args)
        return len(calls), out

    n, (z, _) = passes(layer, x)
    assert n == forward_passes
    assert passes(layer.inverse, z)[0] == inverse_passes
    assert passes(layer.invert, z)[0] == inverse_passes


def test_maf_invert_skips_the_log_derivative(monkeypatch):
    layer = make_layer("spline", "maf")
    z = torch.randn(BATCH, DIM, dtype=torch.float64)
    x = layer.inverse(z)[0]

    def no_derivatives(*args):
        raise AssertionError("invert asked the transform for a log-derivative")

    monkeypatch.setattr(layer.transform, "inverse", no_derivatives)
    assert torch.equal(layer.invert(z), x)


@pytest.mark.parametrize("direction", ["maf", "iaf"])
@pytest.mark.parametrize("transform", TRANSFORM_CASES)
def test_zero_initialised_layer_starts_at_the_identity(transform, direction):
    name, scale = TRANSFORM_CASES[transform]
    options = TransformOptions(scale=scale, alpha_shape=(DIM,), spline_bins=4, spline_bound=2.0)
    layer = MaskedAutoregressive(DIM, 8, name, direction, order="reverse", options=options).double()
    x = 3 * torch.randn(BATCH, DIM, dtype=torch.float64)
    z, logdet = layer(x)
    if scale == "sigmoid":  # Glow's scale starts at the contraction σ(2), not at 1
        factor = 1 / (1 + math.exp(-2.0))
        z_expected, logdet_expected = (x * factor if direction == "maf" else x / factor), DIM * math.log(factor)
        logdet_expected = logdet_expected if direction == "maf" else -logdet_expected
    else:
        z_expected, logdet_expected = x, 0.0
    assert torch.allclose(z, z_expected, atol=1e-12)
    assert torch.allclose(logdet, torch.full_like(logdet, logdet_expected), atol=1e-12)


def test_default_transform_is_the_bounded_tanh_affine_and_starts_at_the_identity():
    layer = MaskedAutoregressive(4, 8)
    assert layer.transform.scale == "tanh" and layer.transform.alpha.shape == (4,)
    x = torch.randn(3, 4)
    z, logdet = layer(x)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(3))


@pytest.mark.parametrize("direction", ["maf", "iaf"])
def test_under_bf16_autocast_the_map_and_logdet_stay_float32(direction):
    layer = make_layer("affine-exp", direction).float()
    x = torch.randn(BATCH, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, logdet = layer(x)
        x_back, inverse_logdet = layer.inverse(z)
    assert z.dtype == logdet.dtype == x_back.dtype == inverse_logdet.dtype == torch.float32
    # the conditioner ran in bf16, but the same inputs give the same parameters both ways
    assert torch.allclose(x_back, x, atol=1e-4) and torch.allclose(inverse_logdet, -logdet, atol=1e-4)


def test_one_element_layer_is_an_elementwise_map_of_its_context():
    layer = MaskedAutoregressive(1, 4, "affine", "maf", cond_features=2).double()
    perturb_parameters(layer, std=0.5)
    x, cond = torch.randn(3, 1, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    z, logdet = layer(x, cond)
    assert torch.allclose(layer.inverse(z, cond)[0], x, atol=1e-12)
    assert not torch.allclose(layer(x, cond + 1)[0], z)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(dim=0), "dim must be an integer >= 1"),
    (dict(direction="naf"), "unknown direction 'naf'; choose one of maf, iaf"),
    (dict(transform="cubic"), "unknown transform 'cubic'"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be an integer >= 1"),
    (dict(hidden=3), "hidden must be an integer >= 4 for dim=5"),
    (dict(hidden=4, cond_features=2), "hidden must be an integer >= 5 for dim=5"),
    (dict(cond_features=-1), "cond_features must be an integer >= 0"),
    (dict(order="forward"), "unknown order 'forward'"),
    (dict(order=[0, 1, 2, 3, 3]), r"order must be a permutation of 0..4"),
    (dict(order=[0, 1, 2]), r"order must be a permutation of 0..4"),
    (dict(transform=Spline(), options=TransformOptions()), "give options with a transform name, not with a ready"),
])
def test_bad_arguments_are_one_line_value_errors(kwargs, message):
    arguments = dict(dim=DIM, hidden=8) | kwargs
    with pytest.raises(ValueError, match=message):
        MaskedAutoregressive(**arguments)


def test_a_ready_transform_object_is_used_as_given():
    spline = Spline(bins=3, bound=1.0)
    layer = MaskedAutoregressive(DIM, 8, spline, "iaf")
    assert layer.transform is spline and layer.made.out.out_features == DIM * spline.num_params


def test_wrong_inputs_are_value_errors():
    layer = MaskedAutoregressive(DIM, 8, cond_features=2)
    with pytest.raises(ValueError, match=r"expected \(B, 5\) vectors, got shape \(2, 4\)"):
        layer(torch.randn(2, 4), torch.randn(2, 2))
    with pytest.raises(ValueError, match="takes a context of 2 features; got none"):
        layer(torch.randn(2, DIM))
    with pytest.raises(ValueError, match="takes a context of 0 features"):
        MaskedAutoregressive(DIM, 8)(torch.randn(2, DIM), torch.randn(2, 2))


def test_cost_benchmark_counts_one_pass_and_d_passes(capsys):
    """scripts/benchmark_autoregressive.py at a toy size: the table's rows and pass counts (no time is asserted)."""
    from flowgen.cli.benchmark_autoregressive import main

    threads = torch.get_num_threads()
    table = main(["--dims", "3", "--batch", "4", "--hidden", "4", "--layers", "2", "--repeats", "2"])
    torch.set_num_threads(threads)
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert [(r[3].strip(), r[5].strip()) for r in rows] == [("coupling", "1 / 1"), ("maf", "1 / 3"), ("iaf", "3 / 1")]
    assert "flags:" in capsys.readouterr().out

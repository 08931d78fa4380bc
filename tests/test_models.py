"""Glow and RealNVP: exact inverse and log-det over the option space, priors, sampling, validation.

Tests of: flowgen/flows/split.py, flowgen/models/glow.py, flowgen/models/multiscale.py, flowgen/models/realnvp.py,
flowgen/models/validation.py.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from flowgen import transforms as transforms_module
from flowgen.checkpoints.legacy import upgrade_run_config, upgrade_state_dict
from flowgen.flows import ActNorm, Coupling, FlowSequence, GlowConditioner, InvConv1x1LU, Split, Squeeze, TopPrior
from flowgen.models import Glow, MultiScaleFlow, RealNVP
from tests.conftest import initialize_actnorms, jacobian_logdets, perturb_parameters

# every permutation/prior option with the paper couplings; the spline (whose own layer-level cases live in
# test_layers.py) inside each model with and without class conditioning
GLOW_OPTIONS = [*itertools.product(("affine", "additive"), ("lu", "conv", "shuffle", "reverse"), (None, 3)),
                ("spline", "lu", None), ("spline", "shuffle", 3)]
REALNVP_OPTIONS = [*itertools.product(("affine", "additive"), (True, False), (False, True), (None, 3)),
                   ("spline", True, False, None), ("spline", False, True, 3)]


def tiny_glow(coupling="affine", permutation="lu", num_classes=None, in_channels=2):
    return Glow(in_channels=in_channels, image_size=4, scales=2, steps=2, hidden_channels=8,
                coupling=coupling, permutation=permutation, num_classes=num_classes)


def tiny_realnvp(coupling="affine", actnorm=True, learn_prior=False, num_classes=None, in_channels=1):
    return RealNVP(in_channels=in_channels, image_size=4, scales=2, hidden_channels=8, num_blocks=1,
                   coupling=coupling, actnorm=actnorm, learn_prior=learn_prior, num_classes=num_classes)


def prepared(build, seed=0):
    """Build with a fixed seed in float64, initialise ActNorm on data, perturb every parameter.

    Perturbing first makes every zero-initialised layer non-trivial; initialising ActNorm
    afterwards normalises the perturbed network as training would, which keeps the map well
    conditioned (random weights on top of a data-initialised network can drive Glow's
    σ(h + 2) scale to 1e-16, a genuinely ill-conditioned map no inverse can undo exactly)."""
    torch.manual_seed(seed)
    model = build().double()
    x = torch.rand(4, *model.input_shape, dtype=torch.float64) - 0.5
    y = torch.tensor([0, 1, 2, 1]) if getattr(model.top_prior, "class_embedding", None) else None
    perturb_parameters(model, std=0.05, seed=seed)
    initialize_actnorms(model, x, y=y)
    return model.eval(), x, y


def check_exact(model, x, y):
    zs, logdet = model(x, y)
    assert logdet.shape == (x.shape[0],) and logdet.dtype == torch.float64
    assert sum(z[0].numel() for z in zs) == x[0].numel()  # a bijection: no dimension lost
    x_rec, logdet_inv = model.inverse(zs, y)
    assert torch.allclose(x_rec, x, atol=1e-10, rtol=0), (x_rec - x).abs().max()
    assert torch.allclose(logdet_inv, -logdet, atol=1e-9)
    assert torch.equal(model.invert(zs, y), x_rec)
    expected = jacobian_logdets(lambda inp: model(inp, None if y is None else y[:2])[0], x[:2])
    assert torch.allclose(logdet[:2], expected, atol=1e-6, rtol=0), (logdet[:2], expected)


@pytest.mark.parametrize("coupling, permutation, num_classes", GLOW_OPTIONS)
def test_glow_inverse_and_jacobian(coupling, permutation, num_classes):
    check_exact(*prepared(lambda: tiny_glow(coupling, permutation, num_classes)))


@pytest.mark.parametrize("coupling, actnorm, learn_prior, num_classes", REALNVP_OPTIONS)
def test_realnvp_inverse_and_jacobian(coupling, actnorm, learn_prior, num_classes):
    check_exact(*prepared(lambda: tiny_realnvp(coupling, actnorm, learn_prior, num_classes)))


def test_realnvp_follows_the_paper_layout():
    model = RealNVP(in_channels=3, image_size=32, scales=3, hidden_channels=8, num_blocks=1, actnorm=False)
    layouts = [[(type(f).__name__, getattr(f, "mask", None)) for f in level] for level in model.scales]
    per_scale = [("Coupling", "checkerboard")] * 3 + [("Squeeze", None)] + [("Coupling", "channel")] * 3
    assert layouts == [per_scale, per_scale, [("Coupling", "checkerboard")] * 4]
    parities = [f.parity for f in model.scales[0] if isinstance(f, Coupling)]
    assert parities == [0, 1, 0, 0, 1, 0]  # masks alternate within each group


def test_glow_levels_have_squeeze_then_k_steps():
    model = Glow(in_channels=3, image_size=16, scales=2, steps=3, hidden_channels=8)
    kinds = [type(f).__name__ for f in model.scales[0]]
    assert kinds == ["Squeeze"] + ["ActNorm", "InvConv1x1LU", "Coupling"] * 3
    assert len(model.splits) == 1
    shapes = [tuple(z.shape[1:]) for z in model(torch.rand(1, 3, 16, 16) - 0.5)[0]]
    assert shapes == [(6, 8, 8), (24, 4, 4)]


def mixed_prior_flow():
    """D = 4 flow with a learned split prior AND a learned top prior, for density integration."""
    net = lambda i, o: GlowConditioner(i, o, hidden_channels=8)  # noqa: E731
    step = lambda c: [ActNorm(c), InvConv1x1LU(c), Coupling(c, net)]  # noqa: E731
    level0 = FlowSequence([Squeeze(), *step(4), *step(4)])
    level1 = FlowSequence(step(2))
    return MultiScaleFlow([level0, level1], [Split(4)], TopPrior(2, 1, 1), in_channels=1, image_size=2)


@pytest.mark.parametrize("build, std, n, half_width", [
    (mixed_prior_flow, 0.1, 36, 7.0),
    (lambda: Glow(in_channels=1, image_size=2, scales=1, steps=3, hidden_channels=8), 0.1, 36, 7.0),
    pytest.param(lambda: RealNVP(in_channels=1, image_size=2, scales=1, hidden_channels=8, num_blocks=0,
                                 learn_prior=True), 0.05, 32, 9.0, id="realnvp", marks=pytest.mark.slow),  # 18 s
], ids=["split-and-top-prior", "glow", None])
def test_density_integrates_to_one(build, std, n, half_width):
    """∫ p(x) dx over R^4 by the midpoint rule on a grid that holds the mass: p is a density."""
    torch.manual_seed(0)
    model = build().double()
    perturb_parameters(model, std=std)
    initialize_actnorms(model, torch.randn(64, 1, 2, 2, dtype=torch.float64))
    model.eval()
    ticks = torch.linspace(-half_width, half_width, n + 1, dtype=torch.float64)
    mids = (ticks[1:] + ticks[:-1]) / 2
    cell = (2 * half_width / n) ** 4
    grid = torch.cartesian_prod(mids, mids, mids, mids).view(-1, 1, 2, 2)
    with torch.no_grad():
        total = sum(model.log_prob(chunk).exp().sum() for chunk in grid.split(200_000)) * cell
    assert abs(total.item() - 1.0) < 0.01, total.item()


@pytest.mark.parametrize(
    "build", [lambda: tiny_glow(num_classes=3), lambda: tiny_realnvp(learn_prior=True, num_classes=3)]
)
def test_sample_then_encode_returns_the_sampled_latents(build):
    model, _, _ = prepared(build)
    y = torch.tensor([0, 2, 1])
    x, zs = model.sample(3, temperature=0.8, y=y, return_latents=True)
    zs_enc, _ = model(x, y)
    for z, z_enc in zip(zs, zs_enc, strict=True):
        assert torch.allclose(z, z_enc, atol=1e-10)


@pytest.mark.parametrize("build", [tiny_glow, lambda: tiny_glow("spline"), lambda: tiny_realnvp("spline")],
                         ids=["glow-affine", "glow-spline", "realnvp-spline"])
def test_sampling_and_invert_do_no_logdet_work(build, monkeypatch):
    """When only images are wanted no coupling sums log-derivatives and no spline computes one."""
    model, x, _ = prepared(build)
    zs, _ = model(x)

    def refuse(*args, **kwargs):
        raise AssertionError("log-determinant work on a path that only wants images")

    spline = transforms_module.rational_quadratic_spline

    def spline_without_derivative(*args, derivative=True, **kwargs):
        if derivative:
            refuse()
        return spline(*args, derivative=derivative, **kwargs)

    monkeypatch.setattr(Coupling, "_logdet", refuse)
    monkeypatch.setattr(transforms_module, "rational_quadratic_spline", spline_without_derivative)
    assert torch.isfinite(model.sample(2, temperature=0.7)).all()
    assert torch.allclose(model.invert(zs), x, atol=1e-10, rtol=0)
    with pytest.raises(AssertionError, match="log-determinant work"):
        model.inverse(zs)  # the watch is live: the full inverse does the work


def test_temperature_zero_decodes_the_prior_means_level_by_level():
    model, _, _ = prepared(tiny_glow)
    x0, zs = model.sample(2, temperature=0.0, return_latents=True)
    assert torch.equal(x0[0], x0[1])  # deterministic
    mean_top, _ = model.top_prior.mean_log_std(2)
    assert torch.allclose(zs[-1], mean_top)
    # each factored latent equals its conditional prior mean given the kept half above it
    h = model.scales[1].inverse(zs[1])[0]
    mean_split, _ = model.splits[0].prior.mean_log_std(h)
    assert torch.allclose(zs[0], mean_split)


def test_temperature_scales_every_prior_std():
    model, _, _ = prepared(tiny_glow)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    _, z_half = model.sample(2, temperature=0.5, generator=g1, return_latents=True)
    _, z_one = model.sample(2, temperature=1.0, generator=g2, return_latents=True)
    mean_top, _ = model.top_prior.mean_log_std(2)
    assert torch.allclose(z_half[-1] - mean_top, 0.5 * (z_one[-1] - mean_top), atol=1e-12)


def test_log_prob_is_finite_and_differentiable():
    model = tiny_glow(num_classes=3)
    x = torch.rand(4, 2, 4, 4) - 0.5
    logp = model.log_prob(x, y=torch.tensor([0, 1, 2, 0]))
    assert logp.shape == (4,) and torch.isfinite(logp).all()
    (-logp.mean()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_class_conditional_model_needs_labels_for_densities_only():
    """log p(x | y) needs y; the bijection x -> z does not read it (reconstruction, interpolation and
    attribute editing encode unlabelled images)."""
    model, x, y = prepared(lambda: tiny_glow(num_classes=3))
    with pytest.raises(ValueError, match="class-conditional"):
        model.log_prob(x)
    zs, logdet = model(x)
    zs_y, logdet_y = model(x, y)
    assert all(torch.equal(a, b) for a, b in zip(zs, zs_y, strict=True)) and torch.equal(logdet, logdet_y)
    assert torch.allclose(model.inverse(zs)[0], x, atol=1e-10)


def test_actnorm_not_reinitialised_after_model_load():
    source, x, _ = prepared(tiny_glow)
    target = tiny_glow().double()
    target.load_state_dict(source.state_dict())
    target.train()
    target(x * 100 + 3)
    assert torch.allclose(target.log_prob(x), source.log_prob(x))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Glow(image_size=30, scales=3), r"image_size=30 is not divisible by 8"),
        (lambda: Glow(image_size=32, scales=6), r"image_size=32 is not divisible by 64"),
        (lambda: Glow(hidden_channels=0), r"hidden_channels must be a positive integer, got 0"),
        (lambda: Glow(steps=-1), r"steps must be a positive integer"),
        (lambda: Glow(coupling="spline2"), r"unknown coupling 'spline2'"),
        (lambda: Glow(permutation="random"), r"unknown permutation 'random'"),
        (lambda: RealNVP(image_size=4, scales=3), r"too small for scales=3"),
        (lambda: RealNVP(image_size=20, scales=4), r"image_size=20 is not divisible by 8"),
        (lambda: RealNVP(hidden_channels=-3), r"hidden_channels must be a positive integer, got -3"),
        (lambda: Glow(num_classes=0), r"num_classes must be a positive integer"),
    ],
)
def test_constructors_validate_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_negative_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        tiny_glow().sample(2, temperature=-0.1)


def _perturb_zero_convs(model, std=0.002):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "net" in name and "conv" in name and "weight" in name:
                p.add_(std * torch.randn_like(p))


@pytest.mark.parametrize("build", [Glow, RealNVP], ids=["glow-paper", "realnvp-paper"])
def test_float32_reconstruction_of_cifar_sized_defaults(build):
    """Paper-size defaults (Glow K=32 L=3 width 512; RealNVP) invert in float32 to < 1e-4."""
    torch.manual_seed(0)
    model = build()
    x = torch.rand(2, 3, 32, 32) - 0.5
    _perturb_zero_convs(model)
    initialize_actnorms(model, x)
    model.eval()
    with torch.no_grad():
        zs, logdet = model(x)
        x_rec, logdet_inv = model.inverse(zs)
    err = (x_rec - x).abs().max().item()
    print(f"{build.__name__} float32 max reconstruction error: {err:.3e}")
    assert err < 1e-4
    assert torch.allclose(logdet, -logdet_inv, rtol=1e-5, atol=1e-2)
    assert math.isfinite(logdet[0].item())


def test_a_glow_run_of_an_earlier_version_means_the_same():
    """Runs written when Glow's scales were called ``levels`` (config key and weights) load with the same
    log-density: flowgen/checkpoints/legacy.py renames both, and MultiScaleFlow renames old weights on load."""
    torch.manual_seed(0)
    model = tiny_glow(in_channels=1).double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64) - 0.5
    model(x)  # ActNorm's data-dependent initialisation
    old_state = {k.replace("scales.", "levels.", 1) if k.startswith("scales.") else k: v
                 for k, v in model.state_dict().items()}
    assert any(k.startswith("levels.") for k in old_state)
    upgraded = upgrade_state_dict(old_state, model.state_dict())
    assert upgraded.keys() == model.state_dict().keys()
    fresh = tiny_glow(in_channels=1).double()
    fresh.load_state_dict(old_state)  # Lightning's resume loads the old names straight into the module
    torch.testing.assert_close(fresh.log_prob(x), model.log_prob(x), rtol=0, atol=0)
    old_config = {"model": {"_target_": "flowgen.models.Glow", "levels": 2, "steps": 2}, "data": {}}
    assert upgrade_run_config(old_config)["model"] == {"_target_": "flowgen.models.Glow", "scales": 2, "steps": 2}
    other = {"model": {"_target_": "flowgen.models.CNF", "levels": 2}}
    assert upgrade_run_config(other)["model"]["levels"] == 2  # another family's key of that name stays

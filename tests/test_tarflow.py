"""TarFlow: exactness in float64 on tiny shapes with perturbed weights, over the option space.

The model maps (B, C, H, W) images to image-shaped latents through causal-transformer blocks; every
check here is against an independent computation: autograd Jacobians, the uncached inverse, the
closed-form Gaussian CDFs of the noise bound, importance sampling of the density.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flowgen.dequantization import UniformDequantization
from flowgen.likelihood import log_likelihood_bound
from flowgen.models.base import FlowModel
from flowgen.models.tarflow import InverseOptions, TarFlow, patchify, unpatchify
from tests.conftest import jacobian_logdets, perturb_parameters

pytestmark = pytest.mark.usefixtures("single_thread")

# (in_channels, image_size, patch_size, num_blocks, layers_per_block, transform, num_classes)
OPTIONS = [
    pytest.param(1, 4, 2, 2, 1, "affine", None, id="affine-patch2"),
    pytest.param(1, 4, 1, 2, 2, "affine", 3, id="affine-patch1-2layers-conditional"),
    pytest.param(2, 2, 1, 3, 1, "additive", None, id="additive-2channels-3blocks"),
    pytest.param(1, 4, 2, 2, 1, "spline", 3, id="spline-conditional"),
]


def tiny(in_channels=1, image_size=4, patch_size=2, num_blocks=2, layers_per_block=1, transform="affine",
         num_classes=None, std=0.1, seed=0, **kwargs) -> TarFlow:
    torch.manual_seed(seed)
    model = TarFlow(in_channels, image_size, patch_size, width=8, num_blocks=num_blocks,
                    layers_per_block=layers_per_block, num_heads=2, num_classes=num_classes, transform=transform,
                    spline_bound=2.0, **kwargs).double().eval()
    perturb_parameters(model, std=std, seed=seed)
    return model


def inputs(model: TarFlow, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(batch, *model.input_shape, generator=g, dtype=torch.float64)
    y = None if model.num_classes is None else torch.arange(batch) % (model.num_classes + 1)  # incl. the null class
    return x, y


def test_is_a_flow_model_with_image_shaped_latents():
    model = tiny()
    x, _ = inputs(model)
    z, logdet = model(x)
    assert isinstance(model, FlowModel) and model.input_shape == (1, 4, 4)
    assert z.shape == x.shape and logdet.shape == (3,) and logdet.dtype == torch.float64
    assert len(model.compile_units()) == 2 and set(model.reconstruction_errors(x)) == {"block0", "block1"}


def test_patches_are_ml_tarflows_unfold_and_invert_exactly():
    x = torch.randn(2, 3, 8, 8)
    tokens = patchify(x, 2)
    assert torch.equal(tokens, F.unfold(x, 2, stride=2).transpose(1, 2))
    assert torch.equal(unpatchify(tokens, 2, 8), x)


@pytest.mark.parametrize("c, size, p, blocks, layers, transform, classes", OPTIONS)
def test_logdet_is_the_log_determinant_of_the_jacobian(c, size, p, blocks, layers, transform, classes):
    model = tiny(c, size, p, blocks, layers, transform, classes)
    x, y = inputs(model, batch=2)
    for b in range(2):
        yb = None if y is None else y[b : b + 1]
        expected = jacobian_logdets(lambda inp, yb=yb: model(inp, yb)[0], x[b : b + 1])
        assert torch.allclose(model(x[b : b + 1], yb)[1], expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("c, size, p, blocks, layers, transform, classes", OPTIONS)
def test_inverse_invert_and_log_prob_parts(c, size, p, blocks, layers, transform, classes):
    model = tiny(c, size, p, blocks, layers, transform, classes)
    x, y = inputs(model)
    z, logdet = model(x, y)
    x_back, logdet_back = model.inverse(z, y)
    assert torch.allclose(x_back, x, atol=1e-12, rtol=0)
    assert torch.allclose(logdet_back, -logdet, atol=1e-11, rtol=0)
    assert torch.equal(model.invert(z, y), x_back)
    assert torch.equal(model.invert([z], y), x_back)  # latents as a list of one, as latent_list gives them

    parts = model.log_prob_parts(x, y)
    assert list(parts.terms) == [f"block{k}/logdet" for k in range(blocks)] + ["prior"]
    assert torch.allclose(parts.total(), model.log_prob(x, y), atol=1e-12, rtol=0)
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    assert torch.allclose(parts.terms["prior"], prior, atol=1e-12, rtol=0)
    assert torch.allclose(model.log_prob(x, y), prior + logdet, atol=1e-12, rtol=0)
    if transform == "additive":
        assert parts.log_derivatives == {}
    else:
        assert set(parts.log_derivatives) == {f"block{k}" for k in range(blocks)}
        assert parts.log_derivatives["block0"].shape == (x.numel(),)


@pytest.mark.parametrize("c, size, p, blocks, layers, transform, classes", OPTIONS)
def test_kv_cached_inverse_equals_the_uncached_one(c, size, p, blocks, layers, transform, classes):
    model = tiny(c, size, p, blocks, layers, transform, classes)
    z, y = inputs(model)
    for guidance in ([0.0] if classes is None else [0.0, 1.5]):
        cached = model._decode(patchify(z, p), y, model._options(method="sequential", guidance=guidance))
        uncached = model._decode(patchify(z, p), y, model._options(method="sequential_uncached", guidance=guidance))
        assert torch.allclose(cached, uncached, atol=1e-12, rtol=0)


def count_passes(model: TarFlow, monkeypatch) -> list[int]:
    calls = [0]
    for block in model.blocks:
        original = block.token_params

        def counted(*args, original=original, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(block, "token_params", counted)
    return calls


@pytest.mark.parametrize("c, size, p, blocks, layers, transform, classes", OPTIONS)
def test_jacobi_iteration_converges_to_the_sequential_inverse(c, size, p, blocks, layers, transform, classes,
                                                              monkeypatch):
    model = tiny(c, size, p, blocks, layers, transform, classes)
    z, y = inputs(model)
    tokens = patchify(z, p)
    T = model.num_tokens
    sequential = model._decode(tokens, y, model._options(method="sequential"))
    # at most T iterations reach the sequential inverse exactly (token i is exact after i+1 iterations)
    exact = model._decode(tokens, y, model._options(method="jacobi", jacobi_tolerance=0.0))
    assert torch.allclose(exact, sequential, atol=1e-12, rtol=0)
    # Gauss-Seidel over T one-token segments with one iteration each IS the sequential recursion
    gauss_seidel = model._decode(tokens, y, model._options(method="jacobi", jacobi_segments=T,
                                                           jacobi_max_iterations=1))
    assert torch.allclose(gauss_seidel, sequential, atol=1e-12, rtol=0)
    # with a tolerance it stops early, within the stated distance of the sequential inverse
    calls = count_passes(model, monkeypatch)
    for segments in (1, 2):
        calls[0] = 0
        tolerance = 1e-9
        approx = model._decode(tokens, y, model._options(method="jacobi", jacobi_segments=segments,
                                                         jacobi_tolerance=tolerance))
        assert (approx - sequential).abs().max() <= 100 * tolerance
        assert calls[0] <= blocks * T  # never more than the cap: the segment length per segment


def test_jacobi_stops_before_the_cap_on_a_contractive_model(monkeypatch):
    model = tiny(patch_size=1, std=0.02)  # 16 tokens, weak couplings between tokens
    z, _ = inputs(model)
    calls = count_passes(model, monkeypatch)
    model._decode(patchify(z, 1), None, model._options(method="jacobi", jacobi_tolerance=1e-8))
    assert calls[0] < 2 * 16


def test_jacobi_survives_iterates_that_overflow():
    """Strong couplings: early Jacobi iterates of late tokens reach 1e100 and beyond (inf in LayerNorm's
    variance); the masked attention must not carry them to the tokens already solved (0 · inf = NaN)."""
    model = tiny(patch_size=1, std=0.2)
    x, _ = inputs(model)
    tokens = patchify(model(x)[0], 1)
    sequential = model._decode(tokens, None, model._options(method="sequential"))
    jacobi = model._decode(tokens, None, model._options(method="jacobi", jacobi_tolerance=0.0))
    assert torch.isfinite(jacobi).all()
    # so strongly coupled a flow is ill-conditioned: both inverses lose ~1e-7 of x, and agree to that
    assert torch.allclose(jacobi, sequential, atol=1e-6, rtol=0) and torch.allclose(jacobi, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("transform", ["affine", "spline"])
def test_blocks_are_causal_in_their_own_order(reverse, transform):
    model = tiny(patch_size=1, num_blocks=2, transform=transform, std=0.3)  # 16 tokens of one number
    block = model.blocks[1 if reverse else 0]
    assert block.reverse == reverse
    x = inputs(model, batch=1)[0].flatten(2).transpose(1, 2)  # (1, 16, 1) tokens
    jac = torch.autograd.functional.jacobian(lambda h: block(h)[0], x).reshape(16, 16)
    order = torch.arange(16).flip(0) if reverse else torch.arange(16)
    jac = jac[order][:, order]  # rows and columns in the block's order
    assert torch.equal(torch.triu(jac, diagonal=1), torch.zeros_like(jac))  # z_i depends on x_<=i only
    assert (torch.tril(jac, diagonal=-1).abs() > 1e-6).sum() > 50  # ... and does depend on them


@pytest.mark.parametrize("transform", ["affine", "additive", "spline"])
def test_density_integrates_to_one(transform):
    """E_q[p(x)/q(x)] = ∫ p over R^4 (a 2x2 image of 1-number tokens), q a Gaussian wider than p."""
    model = tiny(image_size=2, patch_size=1, transform=transform)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        samples = model.sample(4000, generator=g).flatten(1)
        proposal = torch.distributions.MultivariateNormal(samples.mean(0), 2.25 * torch.cov(samples.T))
        x = proposal.sample((40000,))
        w = (model.log_prob(x.view(-1, 1, 2, 2)) - proposal.log_prob(x)).exp()
    standard_error = (w.std() / math.sqrt(w.numel())).item()
    assert standard_error < 0.03
    assert abs(w.mean().item() - 1) < 5 * standard_error


def test_sampling_temperature_and_generator():
    model = tiny()
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a, b = model.sample(4, 0.7, generator=g()), model.sample(4, 0.7, generator=g())
    assert torch.equal(a, b) and a.shape == (4, 1, 4, 4)
    z = 0.7 * torch.randn((4, 1, 4, 4), generator=g(), dtype=torch.float64)
    assert torch.allclose(a, model.invert(z), atol=1e-14, rtol=0)
    assert torch.allclose(model.sample(2, 0.0), model.invert(torch.zeros(2, 1, 4, 4, dtype=torch.float64)))
    with pytest.raises(ValueError, match="temperature"):
        model.sample(2, -1.0)


def guided_reference(model: TarFlow, z: torch.Tensor, y: torch.Tensor, w: float, annealed: bool) -> torch.Tensor:
    """Guided sampling from its definition, token by token: θ = θ(c) + w_i (θ(c) - θ(∅)) from two
    full causal passes over the solved prefix, one with the labels and one with the null class."""
    null = torch.full_like(y, model.num_classes)
    h = patchify(z, model.patch_size)
    for block in reversed(model.blocks):
        zb = block.order(h)
        T = zb.shape[1]
        solved = block.transform.invert(zb[:, :1], block.token_params(zb[:, :1], y))
        for i in range(1, T):
            prefix = torch.cat([solved, torch.zeros_like(zb[:, :1])], 1)
            c, u = block.token_params(prefix, y)[:, i], block.token_params(prefix, null)[:, i]
            wi = w * i / (T - 1) if annealed else w
            solved = torch.cat([solved, block.transform.invert(zb[:, i : i + 1], (c + wi * (c - u))[:, None])], 1)
        h = block.order(solved)
    return unpatchify(h, model.patch_size, model.image_size)


@pytest.mark.parametrize("annealed", [False, True])
@pytest.mark.parametrize("method", ["sequential", "jacobi"])
def test_classifier_free_guidance(method, annealed):
    model = tiny(patch_size=1, num_classes=3, transform="spline", guidance_annealed=annealed)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    options = dict(method=method, jacobi_tolerance=0.0)
    guided = model._decode(patchify(z, 1), y, model._options(guidance=2.0, **options))
    assert torch.allclose(guided, guided_reference(model, z, y, 2.0, annealed), atol=1e-11, rtol=0)
    conditional = model._decode(patchify(z, 1), y, model._options(guidance=0.0, **options))
    assert torch.allclose(conditional, model.invert(z, y), atol=1e-12, rtol=0)  # w = 0: conditional sampling
    assert not torch.allclose(guided, conditional, atol=1e-3)
    # guiding the null class towards itself changes nothing
    null = torch.full_like(y, 3)
    assert torch.allclose(model._decode(patchify(z, 1), null, model._options(guidance=2.0, **options)),
                          model.invert(z, null), atol=1e-12, rtol=0)


def test_sample_options_default_to_the_constructor_and_can_be_overridden():
    model = tiny(num_classes=3, guidance=1.0)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    y = torch.tensor([0, 1, 2])
    assert torch.equal(model.sample(3, 1.0, y, g()), model.sample(3, 1.0, y, g(), guidance=1.0))
    unguided = model.sample(3, 1.0, y, g(), guidance=0.0)
    assert torch.allclose(unguided, model.invert(torch.randn((3, 1, 4, 4), generator=g(), dtype=torch.float64), y))
    assert not torch.allclose(unguided, model.sample(3, 1.0, y, g()))
    with pytest.raises(ValueError, match="guidance needs a class-conditional model"):
        tiny().sample(2, guidance=1.0)
    with pytest.raises(ValueError, match="unknown inverse_method"):
        model.sample(2, inverse_method="newton")


def test_denoising_is_tweedies_step_with_the_models_own_score():
    sigma = 0.1
    model = tiny(num_classes=3, noise_std=sigma)
    x, y = inputs(model)
    xg = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(model.log_prob(xg, y).sum(), xg)
    expected = x + sigma**2 * score
    assert torch.allclose(model.denoise(x, y), expected, atol=1e-14, rtol=0)
    with torch.no_grad():
        assert torch.allclose(model.denoise(x, y), expected, atol=1e-14, rtol=0)
    with torch.inference_mode():
        assert torch.allclose(model.denoise(x, y), expected, atol=1e-14, rtol=0)
    assert all(p.grad is None for p in model.parameters())
    # sampling denoises by default when the model was trained with noise
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    raw = model.sample(3, 1.0, y, g(), denoise=False)
    assert torch.allclose(model.sample(3, 1.0, y, g()), model.denoise(raw, y), atol=1e-14, rtol=0)
    assert torch.equal(tiny().denoise(x), x)  # sigma = 0


def test_label_dropout_only_in_the_training_objective():
    model = tiny(num_classes=3, label_drop=0.5)
    x, _ = inputs(model, batch=64)
    y = torch.zeros(64, dtype=torch.long)
    conditional, null = model.log_prob(x, y), model.log_prob(x, None)
    assert torch.allclose(null, model.log_prob(x, torch.full_like(y, 3)))  # y=None is the null class
    model.train()
    torch.manual_seed(0)
    trained = model.log_prob(x, y)
    dropped = torch.isclose(trained, null, atol=1e-12, rtol=0)
    assert torch.equal(dropped, ~torch.isclose(trained, conditional, atol=1e-12, rtol=0))
    assert 16 < dropped.sum() < 48
    z, logdet = model(x, y)  # the bijection itself never drops labels
    assert torch.equal(model.invert(z, y), model.eval().invert(z, y))
    unconditional = tiny()
    assert torch.equal(unconditional.log_prob(x, y), unconditional.log_prob(x))  # labels are ignored


def test_checkpoint_memory_gives_the_same_values_and_gradients():
    x, y = inputs(tiny(num_classes=3))
    results = []
    for memory in ("standard", "checkpoint"):
        model = tiny(num_classes=3, memory=memory).train()
        loss = -model.log_prob(x, y).mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-14, rtol=0)


def test_bf16_autocast_keeps_the_flow_arithmetic_in_float32():
    model = TarFlow(1, 8, 2, 32, 2, 1, 4).eval()
    perturb_parameters(model, std=0.05)
    x = torch.rand(4, 1, 8, 8) - 0.5
    reference = model.log_prob(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_p = model.log_prob(x)
        parts = model.log_prob_parts(x)
        z, logdet = model(x)
        x_back = model.invert(z)
    assert log_p.dtype == logdet.dtype == parts.terms["prior"].dtype == z.dtype == torch.float32
    assert torch.allclose(log_p, reference, rtol=0, atol=0.05 * 64)  # bf16 transformer, float32 sums
    # the cached inverse runs the transformer one token at a time, the forward on the whole sequence:
    # under bf16 their parameters agree to bf16 rounding, not bit for bit
    assert (x_back - x).abs().max() < 2e-2


def test_a_training_step_from_the_digits_config_lowers_the_loss():
    """configs/model/tarflow.yaml on 8x8, 17-level images: a few AdamW steps on a fixed batch."""
    import yaml

    from flowgen.likelihood import nats_to_bpd

    with open(Path(__file__).resolve().parents[1] / "configs" / "model" / "tarflow.yaml") as f:
        config = {k: v for k, v in yaml.safe_load(f).items() if k not in ("defaults", "_target_")}
    model = TarFlow(**{**config, "in_channels": 1, "image_size": 8}).train()
    pixels = torch.randint(0, 17, (32, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    y, log_q = UniformDequantization(17)(pixels, torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = nats_to_bpd(-log_likelihood_bound(model.log_prob(y), 64, 17, log_q), 64).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2


@pytest.mark.parametrize("kwargs, message", [
    (dict(patch_size=3), "not divisible by 3"),
    (dict(patch_size=4), "at least 2 tokens"),
    (dict(num_heads=3), "width=8 is not divisible by num_heads=3"),
    (dict(memory="invertible"), "memory='invertible' does not suit TarFlow"),
    (dict(transform="cubic"), "unknown transform 'cubic'"),
    (dict(label_drop=1.0), r"label_drop must be in \[0, 1\)"),
    (dict(noise_std=-0.1), "noise_std must be a finite number >= 0"),
    (dict(guidance=2.0), "guidance needs a class-conditional model"),
])
def test_bad_options_are_one_clear_error(kwargs, message):
    base = dict(in_channels=1, image_size=4, patch_size=2, width=8, num_blocks=1, layers_per_block=1, num_heads=2)
    with pytest.raises(ValueError, match=message):
        TarFlow(**{**base, **kwargs})


def test_inverse_options_are_the_constructors():
    model = tiny(inverse_method="jacobi", jacobi_segments=2, jacobi_tolerance=1e-7, guidance_annealed=True)
    assert model.inverse_options == InverseOptions("jacobi", 0.0, True, 2, None, 1e-7)

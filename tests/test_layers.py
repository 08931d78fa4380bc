"""Every invertible layer: exact inverse and log|det J| against the full autograd Jacobian (float64).

Tests of: flowgen/flows/coupling.py, flowgen/flows/invconv.py, flowgen/flows/permutation.py, flowgen/flows/squeeze.py.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from flowgen.flows import (
    ActNorm,
    Coupling,
    FlowSequence,
    GlowConditioner,
    InvConv1x1,
    InvConv1x1LU,
    ResNetConditioner,
    ReversePermutation,
    ShufflePermutation,
    Squeeze,
)
from tests.conftest import initialize_actnorms, jacobian_logdets, perturb_parameters

C, H, W = 4, 4, 4
COND_CHANNELS = 2

glow_net = partial(GlowConditioner, hidden_channels=8)
resnet_net = partial(ResNetConditioner, hidden_channels=8, num_blocks=1)


def coupling_cases():
    cases = {}
    for transform in ("additive", "affine", "spline"):
        for scale in ("sigmoid", "tanh"):
            if transform != "affine" and scale == "tanh":
                continue  # the scale parametrisation only matters for affine couplings
            for mask in ("channel", "checkerboard"):
                for parity in (0, 1):
                    for net_name, net in (("glow", glow_net), ("resnet", resnet_net)):
                        for cond in (False, True):
                            name = f"coupling-{transform}-{scale}-{mask}-p{parity}-{net_name}{'-cond' if cond else ''}"
                            cases[name] = (
                                partial(Coupling, C, net, transform=transform, scale=scale, mask=mask,
                                        parity=parity, cond_channels=COND_CHANNELS if cond else 0),
                                cond,
                            )
    return cases


LAYERS = {
    "actnorm": (partial(ActNorm, C), False),
    "invconv": (partial(InvConv1x1, C), False),
    "invconv_lu": (partial(InvConv1x1LU, C), False),
    "reverse": (partial(ReversePermutation, C), False),
    "shuffle": (partial(ShufflePermutation, C, seed=3), False),
    "squeeze": (Squeeze, False),
    "odd_channels_coupling": (partial(Coupling, 5, glow_net, transform="affine", mask="channel"), False),
    "sequence": (lambda: FlowSequence([ActNorm(C), InvConv1x1LU(C), Coupling(C, glow_net)]), False),
    # a tight bound puts about half of the N(0, 1) inputs in the identity tails, 3 bins at the minimum
    "spline_tails": (partial(Coupling, C, glow_net, transform="spline", spline_bins=3, spline_bound=0.7), False),
    **coupling_cases(),
}


def build(name):
    make, conditional = LAYERS[name]
    torch.manual_seed(0)
    layer = make().double()
    channels = 5 if name.startswith("odd") else C
    x = torch.randn(3, channels, H, W, dtype=torch.float64)
    cond = torch.randn(3, COND_CHANNELS, H, W, dtype=torch.float64) if conditional else None
    perturb_parameters(layer)
    initialize_actnorms(layer, x * 2 + 1, cond)
    layer.eval()
    return layer, x, cond


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_inverse_and_jacobian(name):
    layer, x, cond = build(name)
    z, logdet = layer(x, cond)
    assert logdet.shape == (x.shape[0],) and logdet.dtype == torch.float64
    x_rec, logdet_inv = layer.inverse(z, cond)
    assert torch.allclose(x_rec, x, atol=1e-10, rtol=0), (x_rec - x).abs().max()
    assert torch.allclose(logdet_inv, -logdet, atol=1e-10)
    assert torch.equal(layer.invert(z, cond), x_rec)  # the inverse without its log-det: the same x, bit for bit
    # the Jacobian is per sample: every sample with its own conditioning
    expected = torch.stack([
        jacobian_logdets(lambda inp, b=b: layer(inp, None if cond is None else cond[b : b + 1])[0], x[b : b + 1])[0]
        for b in range(x.shape[0])
    ])
    assert torch.allclose(logdet, expected, atol=1e-6, rtol=0), (logdet, expected)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_is_not_the_identity(name):
    """The perturbation really exercises the layer (else the Jacobian test checks nothing)."""
    layer, x, cond = build(name)
    z, _ = layer(x, cond)
    if name not in ("squeeze",):
        assert z.shape != x.shape or not torch.allclose(z, x)


def test_float32_logdet_under_bf16_autocast():
    layer = FlowSequence([ActNorm(C), InvConv1x1LU(C), Coupling(C, glow_net)])
    x = torch.randn(2, C, H, W)
    perturb_parameters(layer)
    initialize_actnorms(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, logdet = layer(x)
        x_rec, _ = layer.inverse(z)
    assert logdet.dtype == torch.float32
    assert z.dtype == torch.float32  # the invertible path stays float32; only the conditioner is bf16
    assert (x_rec - x).abs().max() < 1e-4


# -- ActNorm ---------------------------------------------------------------------------------

def test_actnorm_data_dependent_init_normalises_first_batch():
    layer = ActNorm(3)
    x = torch.randn(16, 3, 5, 5) * torch.tensor([0.5, 2.0, 7.0]).view(1, 3, 1, 1) + 3.0
    z, _ = layer(x)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def test_actnorm_is_not_reinitialised_after_load_state_dict():
    trained = ActNorm(3)
    trained(torch.randn(8, 3, 4, 4) * 5)
    fresh = ActNorm(3)
    fresh.load_state_dict(trained.state_dict())
    before = fresh.log_scale.detach().clone()
    fresh.train()
    fresh(torch.randn(8, 3, 4, 4) * 0.01 + 9)  # very different data must not trigger a new init
    assert torch.equal(fresh.log_scale, before)
    assert bool(fresh.initialized)


def test_actnorm_uninitialised_state_survives_in_checkpoint():
    state = ActNorm(2).state_dict()
    assert "initialized" in state and not bool(state["initialized"])


def test_actnorm_zero_variance_channel_raises():
    x = torch.randn(4, 3, 4, 4)
    x[:, 1] = 0.25
    with pytest.raises(ValueError, match=r"channel\(s\) \[1\].*zero variance"):
        ActNorm(3)(x)


def test_actnorm_reduce_hook_sees_statistics_of_all_ranks():
    """With a reduce_fn that adds a second 'rank', init equals init on the concatenated batch."""
    torch.manual_seed(0)
    a, b = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4) * 3 + 1
    other = ActNorm(3)
    stats_b = {}

    def capture(stats):
        stats_b["s"] = stats.clone()
        return stats

    other.reduce_fn = capture
    other(b)
    two_ranks = ActNorm(3, reduce_fn=lambda s: s + stats_b["s"])
    two_ranks(a)
    one_big_batch = ActNorm(3)
    one_big_batch(torch.cat([a, b]))
    assert torch.allclose(two_ranks.bias, one_big_batch.bias, atol=1e-6)
    assert torch.allclose(two_ranks.log_scale, one_big_batch.log_scale, atol=1e-6)


# -- 1x1 convolutions ------------------------------------------------------------------------

def test_invconv_weights_start_as_rotations():
    for layer in (InvConv1x1(6), InvConv1x1LU(6)):
        w = layer.weight if isinstance(layer, InvConv1x1) else layer.weight()
        assert torch.allclose(w @ w.T, torch.eye(6), atol=1e-5)
        assert torch.allclose(torch.det(w.double()), torch.tensor(1.0, dtype=torch.float64), atol=1e-5)


def test_lu_forward_has_no_slogdet_or_inverse():
    """The LU layer's training forward must not call slogdet, det or a matrix inverse."""
    from torch.overrides import TorchFunctionMode

    banned = {"slogdet", "det", "inv", "logdet", "solve", "solve_triangular", "inverse"}
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    layer = InvConv1x1LU(8)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    with Record():
        z, logdet = layer(x)
        (z.sum() + logdet.sum()).backward()
    assert seen and not banned.intersection(seen), sorted(set(seen))


def test_shuffle_permutation_is_a_stored_buffer():
    layer = ShufflePermutation(16, seed=5)
    restored = ShufflePermutation(16, seed=99)
    restored.load_state_dict(layer.state_dict())
    x = torch.randn(2, 16, 2, 2)
    assert torch.equal(restored(x)[0], layer(x)[0])
    assert not torch.equal(layer.perm, torch.arange(16))


def test_coupling_starts_as_identity_up_to_glow_scale():
    """Zero-initialised conditioners: additive and RealNVP couplings start as the identity,
    Glow's affine coupling as z_b = x_b · σ(2) (openai/glow's choice)."""
    x = torch.randn(2, C, H, W)
    for transform, scale in (("additive", "sigmoid"), ("affine", "tanh")):
        for mask in ("channel", "checkerboard"):
            z, logdet = Coupling(C, glow_net, transform=transform, scale=scale, mask=mask)(x)
            assert torch.allclose(z, x) and torch.allclose(logdet, torch.zeros(2))
    z, _ = Coupling(C, glow_net, transform="affine", scale="sigmoid")(x)
    assert torch.allclose(z[:, : C // 2], x[:, : C // 2])
    assert torch.allclose(z[:, C // 2 :], x[:, C // 2 :] * torch.sigmoid(torch.tensor(2.0)))


@pytest.mark.parametrize("mask", ["channel", "checkerboard"])
def test_spline_coupling_starts_as_identity(mask):
    """Zero-initialised conditioner -> equal bins and unit slopes: exactly the identity, log-det 0."""
    x = torch.randn(2, C, H, W) * 3
    z, logdet = Coupling(C, glow_net, transform="spline", mask=mask)(x)
    assert torch.allclose(z, x, atol=1e-6) and torch.allclose(logdet, torch.zeros(2), atol=1e-5)


def test_spline_coupling_tails_are_the_identity():
    """Outside [-B, B] the spline is the identity whatever its parameters."""
    torch.manual_seed(0)
    layer = Coupling(C, glow_net, transform="spline", spline_bound=1.0)
    perturb_parameters(layer, std=0.5)
    x = torch.randn(2, C, H, W)
    x[:, C // 2 :] = torch.where(x[:, C // 2 :] >= 0, x[:, C // 2 :] + 1.5, x[:, C // 2 :] - 1.5)  # all outside ±1
    z, logdet = layer(x)
    assert torch.equal(z, x) and torch.allclose(logdet, torch.zeros(2))
    x[:, C // 2 :] *= 0.1  # inside: a non-trivial map
    assert not torch.allclose(layer(x)[0], x)


def test_squeeze_matches_openai_channel_order():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    z, _ = Squeeze()(x)
    assert z.shape == (1, 4, 2, 2)
    # channel 2*i + j holds pixel (2h + i, 2w + j)
    assert z[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert z[0, :, 1, 1].tolist() == [10.0, 11.0, 14.0, 15.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(transform="spline2"), "unknown transform"),
        (dict(transform="spline", spline_bins=1), "spline_bins >= 2"),
        (dict(transform="spline", spline_bound=0.0), "spline_bound > 0"),
        (dict(scale="softplus"), "unknown affine scale"),
        (dict(mask="stripes"), "unknown coupling mask"),
    ],
)
def test_coupling_rejects_unknown_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Coupling(C, glow_net, **kwargs)


def test_a_coupling_loads_the_state_of_a_checkpoint_written_before_transforms_were_objects():
    """Older checkpoints keep RealNVP's α at <coupling>.alpha; they load, and the layer computes the same map."""
    torch.manual_seed(0)
    coupling = Coupling(C, glow_net, transform="affine", scale="tanh").double()
    perturb_parameters(coupling)
    state = coupling.state_dict()
    state["alpha"] = state.pop("transform.alpha")
    again = Coupling(C, glow_net, transform="affine", scale="tanh").double()
    again.load_state_dict(state)
    x = torch.randn(2, C, 4, 4, dtype=torch.float64)
    assert torch.equal(again(x)[0], coupling(x)[0]) and torch.equal(again(x)[1], coupling(x)[1])

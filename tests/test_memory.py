"""model.memory=checkpoint|invertible: the same values and gradients as standard backprop, less memory.

Gradients are compared norm-wise per parameter in float32:

    ||g - g_ref|| <= RTOL · (||g_ref|| + rms · √n)       n = the parameter's size,
                                                         rms = RMS element of all of g_ref

The second term is the tiny absolute tolerance: some gradients are zero in exact arithmetic
whatever the weights (the bias of a convolution followed by a one-channel-per-group GroupNorm
in RealNVP's conditioner), so in float32 they are round-off of the size of the model's other
gradient elements times 1e-7..1e-6, which no relative test can compare.
Models get a small perturbation of every parameter before ActNorm's data-dependent init (as
in test_models.py): with the zero-initialised last layers untouched, most gradients would be
exactly zero or round-off of the same kind.

Tests of: flowgen/flows/memory.py.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from flowgen.flows import ActNorm, Coupling, FlowSequence, GlowConditioner, InvConv1x1LU
from flowgen.flows import memory as memory_module
from flowgen.models import Glow, RealNVP
from tests.conftest import initialize_actnorms, perturb_parameters

RTOL = 1e-5
MODES = ("checkpoint", "invertible")


# tiny tensors: one intra-op thread is fastest, and immune to a busy 2-core CI box
pytestmark = pytest.mark.usefixtures("single_thread")


def glow(coupling="affine", permutation="lu", steps=3, hidden=16):
    return lambda memory: Glow(in_channels=3, image_size=8, scales=2, steps=steps, hidden_channels=hidden,
                               coupling=coupling, permutation=permutation, memory=memory)


def realnvp(in_channels=1, learn_prior=False, coupling="affine"):
    return lambda memory: RealNVP(in_channels=in_channels, image_size=8, scales=2, hidden_channels=8,
                                  num_blocks=1, coupling=coupling, actnorm=True, learn_prior=learn_prior,
                                  memory=memory)


MODELS = {  # Glow with its default learned top and split priors
    "glow-affine-lu": glow("affine", "lu"),
    "glow-affine-conv": glow("affine", "conv"),
    "glow-additive-lu": glow("additive", "lu"),
    "glow-additive-conv": glow("additive", "conv"),
    "glow-spline-lu": glow("spline", "lu"),
    "realnvp-1ch": realnvp(1, learn_prior=False),
    "realnvp-3ch-learned-prior": realnvp(3, learn_prior=True),
    "realnvp-additive": realnvp(1, coupling="additive"),
}


def data(build, n=4, seed=0):
    channels = build("standard").in_channels
    return torch.rand(n, channels, 8, 8, generator=torch.Generator().manual_seed(seed)) - 0.5


def fresh(build, memory, std=0.02):
    """A model whose ActNorms are not initialised yet, identical for every ``memory`` (same seed)."""
    torch.manual_seed(0)
    model = build(memory)
    perturb_parameters(model, std=std, seed=0)
    return model.train()


def shared(build, x, modes=MODES):
    """One model per mode sharing one state: ActNorm initialised by a forward of the standard one."""
    ref = fresh(build, "standard")
    initialize_actnorms(ref, x)
    models = {"standard": ref}
    for mode in modes:
        models[mode] = build(mode).train()
        models[mode].load_state_dict(ref.state_dict())
    return models


def gradients(model, x, autocast=False):
    """Gradients of -mean log p(x) w.r.t. every parameter and the input x."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = -model.log_prob(x).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    return grads


def max_relative_error(grads, ref, rtol=RTOL):
    """Assert the per-parameter tolerance; return the largest ||g - g_ref|| / ||g_ref|| over
    the gradients well above round-off (||g_ref|| above the RMS-sized floor)."""
    assert grads.keys() == ref.keys()
    rms = torch.cat([g.flatten() for g in ref.values()]).square().mean().sqrt().item()
    worst = 0.0
    for name, g_ref in ref.items():
        diff, norm, floor = (grads[name] - g_ref).norm().item(), g_ref.norm().item(), rms * g_ref.numel() ** 0.5
        assert diff <= rtol * (norm + floor), f"{name}: |g - g_ref| = {diff:.3g}, |g_ref| = {norm:.3g}"
        if norm > floor:
            worst = max(worst, diff / norm)
    return worst


@pytest.mark.parametrize("name", MODELS)
def test_gradients_match_standard_backprop(name):
    build = MODELS[name]
    x = data(build)
    models = shared(build, x)
    ref = gradients(models["standard"], x)
    for mode in MODES:
        max_relative_error(gradients(models[mode], x), ref)


@pytest.mark.parametrize("build", [glow("spline", "lu"), realnvp(1, coupling="spline")], ids=["glow", "realnvp"])
def test_spline_gradients_match_standard_backprop_in_float64(build):
    """Spline couplings reconstruct exactly too. In float32 their inverse is as exact as the map's
    conditioning allows (a near-flat bin multiplies the rounding of z by 1/slope), which is looser
    than affine's: RealNVP's checkerboard splines come out at ~2e-5 relative there; so the exactness
    of the invertible gradients is checked in float64, where round-off cannot hide a wrong term."""
    x = data(build).double()
    models = {mode: model.double() for mode, model in shared(build, x.float()).items()}
    ref = gradients(models["standard"], x)
    for mode in MODES:
        max_relative_error(gradients(models[mode], x), ref, rtol=1e-9)


@pytest.mark.parametrize("name", ["glow-affine-lu", "glow-additive-conv", "realnvp-3ch-learned-prior"])
def test_first_step_initialises_actnorm_in_every_mode(name):
    """From fresh models the first training step runs ActNorm's data-dependent init in each
    mode (the memory-saving ones in an extra no-grad forward first, so that the recompute in
    backward repeats the forward's code path), to the same values, and the gradients of that
    first step equal standard's."""
    build = MODELS[name]
    x = data(build)
    results = {}
    for mode in ("standard", *MODES):
        model = fresh(build, mode)
        actnorms = [m for m in model.modules() if isinstance(m, ActNorm)]
        assert not any(bool(m.initialized) for m in actnorms)
        results[mode] = (gradients(model, x), model.state_dict())
        assert all(bool(m.initialized) for m in actnorms)
    ref_grads, ref_state = results["standard"]
    for mode in MODES:
        grads, state = results[mode]
        for key, value in ref_state.items():  # the init statistics agree to float32 round-off
            assert (state[key].float() - value.float()).norm() <= 1e-5 * value.float().norm(), key
        max_relative_error(grads, ref_grads)


def test_deep_glow_gradients_stay_within_tolerance():
    """K = 16 steps per level (2 x 49 layers): reconstruction error grows with depth but the
    gradients still agree with standard backprop to 1e-5, the input's gradient included."""
    build = glow(steps=16, hidden=8)
    x = data(build)
    models = shared(build, x)
    ref = gradients(models["standard"], x)
    for mode in MODES:
        max_relative_error(gradients(models[mode], x), ref)


def test_log_prob_is_the_same_in_every_mode_in_training_and_evaluation():
    build = glow()
    x = data(build)
    models = shared(build, x)
    ref = models["standard"].log_prob(x)
    for mode in MODES:
        assert torch.allclose(models[mode].log_prob(x), ref, rtol=0, atol=1e-6)
    for model in models.values():
        model.eval()
    with torch.no_grad():
        ref = models["standard"].log_prob(x)
        ref_samples = models["standard"].sample(3, temperature=0.7, generator=torch.Generator().manual_seed(1))
        for mode in MODES:
            assert torch.allclose(models[mode].log_prob(x), ref, rtol=0, atol=1e-6)
            samples = models[mode].sample(3, temperature=0.7, generator=torch.Generator().manual_seed(1))
            assert torch.allclose(samples, ref_samples, atol=1e-6)
    # eval mode with gradients on (e.g. the gradient of log p w.r.t. the input of a trained model)
    ref = gradients(models["standard"], x)
    for mode in MODES:
        max_relative_error(gradients(models[mode], x), ref)


def test_without_gradients_every_mode_runs_the_plain_loop(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a memory-saving path ran although no gradient was needed")

    monkeypatch.setattr(memory_module, "invertible_flows", forbidden)
    monkeypatch.setattr(memory_module, "checkpointed_flows", forbidden)
    build = glow(steps=2, hidden=8)
    x = data(build)
    for mode in MODES:
        model = shared(build, x, (mode,))[mode]
        with torch.no_grad():
            model.log_prob(x)
        model.eval()
        with torch.no_grad():
            model.sample(2)
        model.requires_grad_(False)  # grad mode on, but nothing requires a gradient
        assert model.log_prob(x).grad_fn is None


@pytest.mark.parametrize("name", ["glow-affine-lu", "realnvp-3ch-learned-prior"])
def test_bf16_autocast_gives_finite_gradients_close_to_standard(name):
    """The conditioners run in bf16 under autocast; the invertible backward re-enters the
    forward's autocast state (backward itself runs outside it), so its reconstruction and
    recompute see the same bf16 conditioner outputs as the forward did."""
    build = MODELS[name]
    x = data(build)
    models = shared(build, x)
    ref = gradients(models["standard"], x, autocast=True)
    ref_flat = torch.cat([g.flatten() for g in ref.values()])
    for mode in MODES:
        grads = gradients(models[mode], x, autocast=True)
        flat = torch.cat([g.flatten() for g in grads.values()])
        assert torch.isfinite(flat).all()
        assert (flat - ref_flat).norm() <= 1e-2 * ref_flat.norm(), mode  # bf16 vs float32 differ by ~3e-2


def saved_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one training step."""
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = -model.log_prob(x).mean()
    loss.backward()
    return sum(storages.values())


def test_invertible_memory_does_not_grow_with_depth():
    x = data(glow(), n=2)
    saved = {}
    for steps in (8, 16):
        models = shared(glow(steps=steps), x, ("invertible",))  # ActNorm initialised: a regular step
        for mode, model in models.items():
            saved[mode, steps] = saved_bytes(model, x)
    assert saved["invertible", 8] == saved["invertible", 16]  # only each level's output (+ split/prior)
    assert saved["standard", 16] > 1.8 * saved["standard", 8]
    assert saved["invertible", 8] < saved["standard", 8] / 10


def conditional_sequence(memory: str) -> FlowSequence:
    torch.manual_seed(0)
    net = lambda i, o: GlowConditioner(i, o, hidden_channels=8)  # noqa: E731
    layers = [ActNorm(4), InvConv1x1LU(4), Coupling(4, net, cond_channels=2),
              ActNorm(4), InvConv1x1LU(4), Coupling(4, net, parity=1, cond_channels=2)]
    flows = FlowSequence(layers, memory=memory)
    perturb_parameters(flows, std=0.05)
    return flows


def test_conditioning_tensor_gets_its_gradient():
    x = torch.rand(3, 4, 4, 4, generator=torch.Generator().manual_seed(0)) - 0.5
    cond = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    initialize_actnorms(ref := conditional_sequence("standard"), x, cond)
    results = {}
    for mode in ("standard", *MODES):
        flows = conditional_sequence(mode)
        flows.load_state_dict(ref.state_dict())
        xg, cg = x.clone().requires_grad_(True), cond.clone().requires_grad_(True)
        z, logdet = flows(xg, cg)
        (0.5 * z.square().flatten(1).sum(1) - logdet).mean().backward()
        grads = {name: p.grad for name, p in flows.named_parameters()}
        grads.update(x=xg.grad, cond=cg.grad)
        results[mode] = grads
    for mode in MODES:
        max_relative_error(results[mode], results["standard"])


def test_parameter_gradients_reach_autograd_hooks_and_accumulate():
    """The invertible node returns parameter gradients to autograd (nothing is written to
    .grad by hand), so per-parameter hooks (what DDP's reducer uses) fire and a second
    backward accumulates, exactly as with standard backprop."""
    build = glow(steps=2, hidden=8)
    x = data(build)
    model = shared(build, x, ("invertible",))["invertible"]
    fired = {name: 0 for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, name=name: fired.__setitem__(name, fired[name] + 1))
    (-model.log_prob(x).mean()).backward()
    once = {name: p.grad.clone() for name, p in model.named_parameters()}
    (-model.log_prob(x).mean()).backward()
    assert set(fired.values()) == {2}
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, 2 * once[name], rtol=1e-5, atol=1e-7), name


def test_unknown_memory_mode_is_one_clear_error():
    message = "unknown memory 'bogus'; choose one of standard, checkpoint, invertible"
    for build in (lambda: Glow(in_channels=1, image_size=8, scales=2, steps=1, hidden_channels=4, memory="bogus"),
                  lambda: RealNVP(in_channels=1, image_size=8, hidden_channels=4, num_blocks=0, memory="bogus"),
                  lambda: FlowSequence([], memory="bogus")):
        with pytest.raises(ValueError, match=message):
            build()


def test_memory_is_a_model_config_key(tmp_path):
    from flowgen.cli.launch import startup_error
    from tests.test_configs import compose_train

    for model in ("glow", "glow_small", "realnvp", "realnvp_small"):
        cfg = compose_train(tmp_path, [f"model={model}"])
        assert cfg.model.memory == "standard"
    cfg = compose_train(tmp_path, ["model=glow", "model.memory=invertible", "model.scales=2", "model.steps=2",
                                   "model.hidden_channels=8"])
    model = instantiate(cfg.model)
    assert all(level.memory == "invertible" for level in model.scales)
    # the memory mode is not part of the weights: a checkpoint loads into a model built with either mode
    standard = instantiate(cfg.model, memory="standard")
    assert model.state_dict().keys() == standard.state_dict().keys()
    with pytest.raises(Exception) as refused:  # by the schema, while composing
        compose_train(tmp_path, ["model=realnvp_small", "model.memory=bogus"])
    assert startup_error(refused.value) == ("model.memory=bogus: model.memory must be one of standard, checkpoint, "
                                            "invertible")
    with pytest.raises(ValueError, match="unknown memory 'bogus'; choose one of standard, checkpoint, invertible"):
        RealNVP(in_channels=1, image_size=8, memory="bogus")  # and by the model, for Python callers

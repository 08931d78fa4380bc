"""RealNVP's logit preprocessing (flowgen.likelihood.logit_map, flowgen.models.preprocessed) against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import softplus

from flowgen.dequantization import UniformDequantization
from flowgen.errors import InvalidValueError
from flowgen.likelihood import (
    bits_per_dim,
    check_logit_alpha,
    inverse_logit_map,
    log_likelihood_bound,
    logit_map,
    quantize,
)
from flowgen.models import Glow, RealNVP, TarFlow
from flowgen.models.base import FlowModel, LogProbParts
from flowgen.models.preprocessed import TERM, LogitPreprocessed, with_preprocessing
from flowgen.sampling import sample_pixels, sampling_options
from flowgen.training import FlowModule


class ElementwiseFlow(FlowModel):
    """The identity flow with an elementwise base density: ``logistic`` (log p = -softplus(z) - softplus(-z))
    or ``normal``; with ``mix`` a fixed lower-triangular linear map z -> A z mixes the dimensions first."""

    def __init__(self, shape, base: str = "logistic", mix: torch.Tensor | None = None):
        super().__init__()
        self.in_channels, self.image_size = shape[0], shape[1]
        self.base, self.mix = base, mix

    def forward(self, x, y=None):
        if self.mix is None:
            return x, torch.zeros(x.shape[0], dtype=x.dtype)
        flat = x.flatten(1) @ self.mix.T
        return flat.view_as(x), torch.log(torch.diagonal(self.mix).abs()).sum().expand(x.shape[0])

    def inverse(self, z, y=None):
        if self.mix is None:
            return z, torch.zeros(z.shape[0], dtype=z.dtype)
        flat = torch.linalg.solve_triangular(self.mix, z.flatten(1).T, upper=False).T
        return flat.view_as(z), -torch.log(torch.diagonal(self.mix).abs()).sum().expand(z.shape[0])

    def log_prob_parts(self, x, y=None):
        z, logdet = self(x)
        if self.base == "logistic":
            prior = -(softplus(z) + softplus(-z)).flatten(1).sum(1)
        else:
            prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        return LogProbParts({"logdet": logdet, "prior": prior})

    def sample(self, n, temperature=1.0, y=None, generator=None):
        u = torch.rand((n, *self.input_shape), generator=generator, dtype=torch.float64)
        eps = torch.log(u) - torch.log1p(-u) if self.base == "logistic" else torch.randn_like(u)
        return self.invert(temperature * eps)


def test_log_det_is_the_autograd_jacobian():
    """The map is elementwise: its full Jacobian is diagonal, and log|det| is the logdet it reports."""
    alpha = 0.05
    y = torch.rand(1, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) - 0.5
    y[0, 0, 0, 0] = -0.5  # the lowest pixel value, p = 0
    jacobian = torch.autograd.functional.jacobian(lambda t: logit_map(t, alpha)[0].flatten(), y).reshape(8, 8)
    assert torch.equal(jacobian, torch.diag(torch.diagonal(jacobian)))
    _, logdet = logit_map(y, alpha)
    assert logdet.dtype == torch.float64
    assert logdet.item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), rel=1e-12)
    s = alpha + (1 - 2 * alpha) * (y + 0.5)  # the closed form log(1-2α) - log s - log(1-s)
    assert logdet.item() == pytest.approx((math.log(1 - 2 * alpha) - torch.log(s) - torch.log1p(-s)).sum().item())


@pytest.mark.parametrize("num_levels", [2, 17, 256])
@pytest.mark.parametrize("alpha", [1e-6, 0.05, 0.3])
def test_pixels_to_logits_and_back(num_levels, alpha):
    """Every level maps into the logit box and back into its own bin (float32): exactly for noise u away from
    the bin's edges, and to within 3e-8 at the edges themselves (float32 rounding of z, logit_map's docstring)."""
    levels = torch.arange(num_levels).view(1, 1, 1, -1).expand(64, 1, 1, -1)
    dequantizer = UniformDequantization(num_levels)
    u = torch.cat([torch.full((1, 1, 1, num_levels), 0.5),
                   0.001 + 0.998 * torch.rand(63, 1, 1, num_levels, generator=torch.Generator().manual_seed(0))])
    y = dequantizer.model_input(levels, u)
    z, _ = logit_map(y, alpha)
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert z.min() >= math.log(alpha / (1 - alpha)) - 1e-6 and z.max() < math.log((1 - alpha) / alpha) + 1e-6
    assert torch.equal(quantize(inverse_logit_map(z, alpha), num_levels), levels)
    for edge in (0.0, 1.0 - 2**-24):
        y = dequantizer.model_input(levels[:1], torch.full(levels[:1].shape, edge))
        assert torch.allclose(inverse_logit_map(logit_map(y, alpha)[0], alpha), y, rtol=0, atol=3e-8)


FAMILIES = {
    "realnvp": lambda: RealNVP(1, 8, scales=1, hidden_channels=4, num_blocks=1),
    "glow": lambda: Glow(1, 8, scales=2, steps=1, hidden_channels=4),
    "tarflow": lambda: TarFlow(1, 8, patch_size=2, width=16, num_blocks=2, layers_per_block=1, num_heads=1),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapped_model_round_trips_through_latents(family):
    """x -> y -> model.forward -> latents -> model.invert -> quantize == x, and log p(y) = log p_flow(z) +
    log|det ∂z/∂y| term by term, for every family (float64, perturbed weights)."""
    torch.manual_seed(0)
    model = LogitPreprocessed(FAMILIES[family](), 0.05).double().eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, 256, (3, 1, 8, 8))
    y = UniformDequantization(256).bin_centres(x).double()
    latents, logdet = model(y)
    y_back, inverse_logdet = model.inverse(latents)
    assert torch.allclose(y_back, y, atol=1e-10) and torch.allclose(logdet, -inverse_logdet, atol=1e-8)
    assert torch.equal(quantize(model.invert(latents), 256), x)
    parts = model.log_prob_parts(y)
    assert TERM in parts.terms and torch.allclose(parts.total(), model.log_prob(y), atol=1e-8)
    assert torch.allclose(model.log_prob(y), model.flow.log_prob(logit_map(y, 0.05)[0]) + logit_map(y, 0.05)[1])


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_standard_logistic_base_scores_the_closed_form(alpha):
    """Identity flow + standard-logistic base on z = logit(s): p_Y(y) = p_Z(z)·(1-2α)/(s(1-s)) = 1 - 2α on
    the whole cube (p_Z(z) = s(1-s)), so every image scores log2 K - log2(1 - 2α) bits per dimension."""
    shape, num_levels = (3, 4, 4), 32
    model = LogitPreprocessed(ElementwiseFlow(shape), alpha)
    module = FlowModule(model, UniformDequantization(num_levels), num_levels, optimizer=torch.optim.Adam)
    x = torch.randint(0, num_levels, (5, *shape))
    bpd = bits_per_dim(-module.nll_nats((x, None)), math.prod(shape))
    expected = math.log2(num_levels) - math.log2(1 - 2 * alpha)
    assert torch.allclose(bpd, torch.full((5,), expected), atol=1e-5)


def test_bpd_with_and_without_the_map_on_a_known_model():
    """Identity flow + standard-normal base at the bin centres of a known image: without the map
    log p_Y = Σ log N(y_i); with it log N(z_i) + log|dz_i/dy_i|, z = logit(α + (1-2α)(y + 1/2))."""
    num_levels, alpha, d = 4, 0.05, 4
    x = torch.tensor([0, 1, 2, 3]).view(1, 1, 2, 2)
    y = (x.double() + 0.5) / num_levels - 0.5  # bin centres -3/8, -1/8, 1/8, 3/8
    normal = ElementwiseFlow((1, 2), base="normal")
    log_n = lambda t: -0.5 * t**2 - 0.5 * math.log(2 * math.pi)  # noqa: E731
    plain = bits_per_dim(log_likelihood_bound(normal.log_prob(y), d, num_levels), d).item()
    assert plain == pytest.approx(-(sum(log_n(v) for v in (-3 / 8, -1 / 8, 1 / 8, 3 / 8)) - d * math.log(4))
                                  / (d * math.log(2)))
    logit = bits_per_dim(log_likelihood_bound(LogitPreprocessed(normal, alpha).log_prob(y), d, num_levels), d).item()
    s = [alpha + (1 - 2 * alpha) * (v + 0.5) for v in (-3 / 8, -1 / 8, 1 / 8, 3 / 8)]
    log_p = sum(log_n(math.log(t / (1 - t))) + math.log((1 - 2 * alpha) / (t * (1 - t))) for t in s)
    assert logit == pytest.approx(-(log_p - d * math.log(4)) / (d * math.log(2)), rel=1e-12)


def _midpoint_grid(low: float, high: float, n: int) -> torch.Tensor:
    step = (high - low) / n
    return low + step * (torch.arange(n, dtype=torch.float64) + 0.5), step


def test_density_integrates_to_one_in_1d():
    """p_Y(y) = p_Z(z)|dz/dy| integrates to 1 over the map's whole domain (-c, c), c = 1/2 + α/(1-2α),
    and to the base's mass on the box [logit α, logit(1-α)] over the K bins of [-1/2, 1/2)."""
    alpha, num_levels = 0.05, 8
    model = LogitPreprocessed(ElementwiseFlow((1, 1), base="normal"), alpha)
    c = 0.5 + alpha / (1 - 2 * alpha)
    y, step = _midpoint_grid(-c, c, 400_000)
    density = model.log_prob(y.view(-1, 1, 1, 1)).exp()
    assert (density.sum() * step).item() == pytest.approx(1.0, abs=1e-6)
    phi = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    box = phi(math.log((1 - alpha) / alpha)) - phi(math.log(alpha / (1 - alpha)))
    bins = []
    for level in range(num_levels):
        y, step = _midpoint_grid(level / num_levels - 0.5, (level + 1) / num_levels - 0.5, 20_000)
        bins.append((model.log_prob(y.view(-1, 1, 1, 1)).exp().sum() * step).item())
    assert sum(bins) == pytest.approx(box, abs=1e-8)


def test_density_integrates_to_one_in_2d():
    """A correlated 2-D flow (a linear map with a standard-normal base) under the map: the double integral
    over the domain is 1, and the mass over the K x K bins of [-1/2, 1/2)^2 is the base's mass there."""
    alpha, n = 0.1, 1200  # c = 0.625: the cube's edges ±1/2 fall on cell edges of the n-cell grid
    mix = torch.tensor([[1.3, 0.0], [0.7, 0.8]], dtype=torch.float64)
    model = LogitPreprocessed(ElementwiseFlow((2, 1), base="normal", mix=mix), alpha)
    c = 0.5 + alpha / (1 - 2 * alpha)
    g, step = _midpoint_grid(-c, c, n)
    y1, y2 = torch.meshgrid(g, g, indexing="ij")
    density = model.log_prob(torch.stack([y1.flatten(), y2.flatten()], 1).view(-1, 2, 1, 1)).exp().view(n, n)
    assert (density.sum() * step**2).item() == pytest.approx(1.0, abs=1e-5)
    inside = g.abs() < 0.5
    in_bins = (density[inside][:, inside].sum() * step**2).item()
    # the same mass by sampling: base draws through model.invert, the fraction landing in the cube
    eps = torch.randn(400_000, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = model.invert(eps)
    in_cube = ((y >= -0.5) & (y < 0.5)).flatten(1).all(1).double().mean().item()
    assert 0.5 < in_bins < 0.99 and in_bins == pytest.approx(in_cube, abs=3e-3)


def test_sampling_maps_back_to_pixels_and_passes_options_on():
    torch.manual_seed(0)
    model = LogitPreprocessed(ElementwiseFlow((1, 4), base="logistic"), 0.05)
    images = sample_pixels(model, 16, 64, 1.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (64, 1, 4, 4) and images.min() >= 0 and images.max() <= 1
    assert images.unique().numel() > 8  # a logistic base fills every level of the box
    tarflow = TarFlow(1, 4, patch_size=2, width=16, num_blocks=1, layers_per_block=1, num_heads=1)
    assert sampling_options(LogitPreprocessed(tarflow, 0.05)) == sampling_options(tarflow) != []


@pytest.mark.parametrize("alpha", [0, 0.0, -0.1, 0.5, 0.7, float("nan"), "0.05", True, None])
def test_a_bad_alpha_is_one_line(alpha):
    with pytest.raises(InvalidValueError, match=r"logit_alpha=.* must be a number strictly between 0 and 0\.5") as info:
        check_logit_alpha(alpha)
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidValueError):
        LogitPreprocessed(ElementwiseFlow((1, 2)), alpha)


def test_no_alpha_is_the_flow_itself():
    flow = ElementwiseFlow((1, 2))
    assert with_preprocessing(flow, None) is flow
    assert isinstance(with_preprocessing(flow, 0.05), LogitPreprocessed)


def _small_realnvp(tmp_path, *overrides):
    from tests.test_configs import compose_train

    return compose_train(tmp_path, ["model=realnvp_small", "model.hidden_channels=4", "model.num_blocks=1",
                                    *overrides])


def test_a_checkpoint_restores_with_its_map_and_an_old_one_without(tmp_path):
    """run_config carries preprocessing.logit_alpha: sample/evaluate from a checkpoint use the same map; a
    checkpoint written before the option existed (no preprocessing section) means no map."""
    from omegaconf import OmegaConf

    from flowgen.build import build_module, restore_run
    from flowgen.checks import validated  # what train.py builds from: enums as their strings

    torch.manual_seed(0)
    module = build_module(validated(_small_realnvp(tmp_path, "preprocessing.logit_alpha=0.05")), 17)
    assert isinstance(module.model, LogitPreprocessed) and module.model.alpha == 0.05
    x = torch.randint(0, 17, (2, 1, 8, 8))
    module.eval()
    y = module.dequantizer.bin_centres(x)
    with torch.no_grad():
        expected = module.model.log_prob(y)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "new.ckpt")
    run = restore_run(tmp_path / "new.ckpt")
    assert isinstance(run.module.model, LogitPreprocessed) and run.module.model.alpha == 0.05
    with torch.no_grad():
        assert torch.allclose(run.module.model.log_prob(y), expected)

    old = build_module(validated(_small_realnvp(tmp_path)), 17)
    run_config = dict(old.hparams["run_config"])
    del run_config["preprocessing"]
    hparams = {**dict(old.hparams), "run_config": run_config}
    torch.save({"state_dict": old.state_dict(), "hyper_parameters": hparams}, tmp_path / "old.ckpt")
    run = restore_run(tmp_path / "old.ckpt")
    assert isinstance(run.module.model, RealNVP) and "preprocessing" not in OmegaConf.to_container(run.cfg)


@pytest.mark.parametrize("value, message", [
    ("0.5", "preprocessing.logit_alpha=0.5 must be strictly between 0 and 0.5"),
    ("0", "preprocessing.logit_alpha=0.0 must be strictly between 0 and 0.5"),
    ("abc", "preprocessing.logit_alpha"),
])
def test_a_bad_alpha_in_the_config_is_one_line(tmp_path, value, message):
    from flowgen.checks import check_config

    with pytest.raises(Exception, match=message) as info:  # noqa: PT011 - composition or check, both name the key
        check_config(_small_realnvp(tmp_path, f"preprocessing.logit_alpha={value}"))
    assert "\n" not in str(info.value).strip()


def test_logit_and_gaussian_noise_are_refused_together(tmp_path):
    from flowgen.build import build_module
    from flowgen.errors import UserError
    from tests.test_configs import compose_train

    cfg = compose_train(tmp_path, ["model=tarflow", "model.noise_std=0.025", "preprocessing.logit_alpha=0.05"])
    with pytest.raises(UserError, match="preprocessing.logit_alpha=0.05 needs pixels inside"):
        build_module(cfg, 17)


def test_training_loss_and_estimates_gain_the_log_det_only_when_they_are_likelihoods():
    """A family's training_loss / log_prob_estimate on z: a likelihood gains log|det ∂z/∂y|; a loss that is no
    likelihood (a CNF's flow matching) is the flow's own, computed on z."""
    from flowgen.models.base import TrainingLoss

    class Regression(ElementwiseFlow):
        def training_loss(self, y, labels=None):
            return TrainingLoss(loss=(y**2).flatten(1).mean(1), name="flow_matching")

    y = torch.rand(3, 1, 2, 2, dtype=torch.float64) - 0.5
    z, logdet = logit_map(y, 0.05)
    model = LogitPreprocessed(ElementwiseFlow((1, 2)), 0.05)
    assert torch.allclose(model.training_loss(y).log_prob, model.flow.log_prob(z) + logdet)
    estimate = model.log_prob_estimate(y)
    assert torch.allclose(estimate.log_prob, model.log_prob(y)) and not estimate.std_error.any()
    loss = LogitPreprocessed(Regression((1, 2)), 0.05).training_loss(y)
    assert loss.log_prob is None and loss.name == "flow_matching"
    assert torch.allclose(loss.loss, (z**2).flatten(1).mean(1))


@pytest.mark.slow
def test_a_logit_run_goes_through_train_evaluate_and_sample(tmp_path):
    """train (logit map, limited weight decay) -> evaluate.py on the run reproduces its test/bpd with the map's
    log-det counted -> sample.py's samples and reconstructions come back through the sigmoid to pixels."""
    import csv
    from pathlib import Path

    from flowgen.cli.evaluate import evaluate
    from flowgen.cli.sample import sample
    from flowgen.cli.train import train
    from tests.test_ood import composed
    from tests.train_runner import FAST

    cfg = _small_realnvp(tmp_path, "preprocessing.logit_alpha=0.05", "logger=csv", "optimizer=adam",
                         "optimizer.weight_decay=1e-3", "optimizer.weight_decay_params=[*.transform.alpha]",
                         "run_name=logit", *FAST, "trainer.limit_test_batches=null")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    rows = list(csv.DictReader(next(run.glob("csv/version_*/metrics.csv")).open()))
    tested = [float(r["test/bpd"]) for r in rows if r.get("test/bpd")]
    result = evaluate(composed("evaluate", [f"ckpt_path={run}", "split=test", f"output={tmp_path / 'e.json'}"]))
    assert len(tested) == 1 and result["bpd"] == pytest.approx(tested[0], rel=1e-5)
    assert result["recon_error"] < 1e-4
    for mode in ("sample", "reconstruct"):
        written = sample(composed("sample", [f"ckpt_path={run}", f"mode={mode}", "n=3", "num_images=3",
                                             f"output_dir={tmp_path / 'samples'}"]))
        assert written and all(Path(p).is_file() for p in written)

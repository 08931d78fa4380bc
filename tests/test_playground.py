"""The 2-D playground (flowgen.playground, scripts/playground_2d.py): exact layers, a normalised learned density,
the figures, and one-line errors for bad options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from flowgen.cli.errors import run_reporting_errors
from flowgen.cli.playground_2d import playground_2d
from flowgen.data.densities2d import DENSITIES, sample_density
from flowgen.flows.autoregressive import MaskedAutoregressive
from flowgen.flows.prior import standard_normal_log_prob
from flowgen.flows.vector import FLOW_KINDS, AffineCoupling, SplineCoupling, VectorActNorm, build_flow
from flowgen.playground.figures import density_figure, evolution_figure
from flowgen.playground.grid import integrate
from flowgen.playground.model import FlowDensity2d
from flowgen.playground.training import mean_nll, train
from tests.conftest import initialize_actnorms, jacobian_logdets, perturb_parameters
from tests.train_runner import REPO, run_entry

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only contend on 2 shared cores

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# [-R, R]^2 holds all but a negligible part of the mass of the flows trained below (their tails are
# Gaussian-like with scales of a few units), and 400 x 400 cells of side 0.05 resolve their features.
INTEGRAL_EXTENT, INTEGRAL_GRID = 10.0, 400


def composed(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("playground_2d", overrides=overrides)


# ---- the layers: exact inverses and exact log-determinants (float64) -------------------------------

LAYERS = {
    "affine-parity0": lambda: AffineCoupling(2, 16, parity=0),
    "affine-parity1": lambda: AffineCoupling(2, 16, parity=1, scale_bound=1.0),
    "spline-parity0": lambda: SplineCoupling(2, 16, parity=0, bins=5, bound=2.0),
    "spline-parity1": lambda: SplineCoupling(2, 16, parity=1, bins=5, bound=2.0),
    "actnorm": lambda: VectorActNorm(2),
    "affine-flow": lambda: build_flow(3, "affine", 16),
    "spline-flow": lambda: build_flow(3, "spline", 16, spline_bins=5, spline_bound=2.0),
    "spline-flow-no-actnorm": lambda: build_flow(2, "spline", 16, actnorm=False, spline_bins=4, spline_bound=2.0),
    "maf-affine-flow": lambda: build_flow(3, "affine", 16, kind="maf"),
    "maf-spline-flow": lambda: build_flow(3, "spline", 16, kind="maf", spline_bins=5, spline_bound=2.0),
    "iaf-affine-flow": lambda: build_flow(3, "affine", 16, kind="iaf", scale_bound=1.0),
    "iaf-spline-flow-no-actnorm": lambda: build_flow(2, "spline", 16, actnorm=False, kind="iaf", spline_bins=4,
                                                     spline_bound=2.0),
    "maf-affine-flow-5d": lambda: build_flow(2, "affine", 16, kind="maf", dim=5),
}


@pytest.mark.parametrize("name", LAYERS)
def test_layer_inverts_and_its_logdet_is_log_abs_det_jacobian(name):
    torch.manual_seed(0)
    layer = LAYERS[name]().double()
    dim = 5 if name.endswith("5d") else 2
    x = 1.5 * torch.randn(16, dim, dtype=torch.float64)  # |x| beyond the spline bound 2 too: the identity tails
    initialize_actnorms(layer, 2 * x + 1)
    perturb_parameters(layer, std=0.5)  # zero-initialised couplings would be the identity
    layer.eval()
    z, logdet = layer(x)
    x_back, inverse_logdet = layer.inverse(z)
    assert logdet.shape == (16,) and logdet.dtype == torch.float64
    assert torch.allclose(x_back, x, atol=1e-10)
    assert torch.equal(layer.invert(z), x_back)
    assert torch.allclose(inverse_logdet, -logdet, atol=1e-10)
    assert torch.allclose(logdet, jacobian_logdets(lambda v: layer(v)[0], x), atol=1e-9)
    assert logdet.abs().max() > 0.05  # the check above is not about an identity map


@pytest.mark.parametrize("coupling", [AffineCoupling(2, 8, parity=1), SplineCoupling(2, 8, parity=1, bins=4)])
def test_couplings_start_as_the_identity_and_keep_their_conditioning_coordinate(coupling):
    x = 3 * torch.randn(32, 2)
    z, logdet = coupling(x)
    # exactly the identity map; the spline's knots (softmax, cumulative sum) carry float32 rounding
    assert torch.allclose(z, x, atol=1e-5) and torch.allclose(logdet, torch.zeros(32), atol=1e-5)
    perturb_parameters(coupling, std=0.5)
    z, _ = coupling(x)
    assert torch.equal(z[:, 1], x[:, 1]) and not torch.allclose(z[:, 0], x[:, 0])  # parity 1 keeps x_2, moves x_1


def test_affine_layers_of_every_kind_have_the_fixed_scale_bound_and_start_as_the_identity():
    for kind in FLOW_KINDS:
        flow = build_flow(2, "affine", 8, actnorm=False, scale_bound=1.5, kind=kind)
        layer = flow.flows[1].flows[0]
        assert isinstance(layer, MaskedAutoregressive) == (kind != "coupling")
        assert torch.equal(layer.transform.alpha, torch.tensor([1.5]))  # S, a constant: not among the parameters
        assert all(p is not layer.transform.alpha for p in flow.parameters())
        x = 3 * torch.randn(32, 2)
        z, logdet = flow(x)
        assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(32))
    assert type(build_flow(1, "spline", 8, actnorm=False).flows[0].flows[0]).__name__ == "Coupling2d"  # the default
    with pytest.raises(ValueError, match="unknown flow kind 'naf'; choose one of coupling, maf, iaf"):
        build_flow(2, "affine", 8, kind="naf")


def test_maf_and_iaf_alternate_the_order_between_blocks():
    flow = build_flow(3, "spline", 8, actnorm=False, kind="iaf")
    orders = [block.flows[0].order.tolist() for block in flow]
    assert orders == [[0, 1], [1, 0], [0, 1]]
    assert [block.flows[0].direction for block in flow] == ["iaf"] * 3


# ---- the learned density is a density: it integrates to 1 -------------------------------------------

FITS = [(kind, coupling) for kind in FLOW_KINDS for coupling in ("affine", "spline")]


def fit_moons(coupling: str, kind: str = "coupling") -> tuple[FlowDensity2d, list[float]]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = FlowDensity2d(build_flow(4, coupling, 32, kind=kind))
    losses = train(model, lambda n: sample_density("moons", n, rng), steps=250, batch_size=256, lr=5e-3)
    return model, losses


@pytest.fixture(scope="module")
def fitted():
    """fitted(kind, coupling): that flow fitted to the moons, once per module (2-3 s each on one core),
    on the first test that asks for it, so that no single test pays for all six."""
    fits = {}

    def fit(kind: str, coupling: str) -> tuple[FlowDensity2d, list[float]]:
        if (kind, coupling) not in fits:
            fits[kind, coupling] = fit_moons(coupling, kind)
        return fits[kind, coupling]

    return fit


def test_grid_integral_of_a_known_density_is_one():
    assert integrate(standard_normal_log_prob, 6.0, 200) == pytest.approx(1.0, abs=1e-6)
    shifted = lambda x: standard_normal_log_prob(x) + 0.01  # noqa: E731 - a density off by 1%
    assert integrate(shifted, 6.0, 200) == pytest.approx(np.exp(0.01), abs=1e-6)


@pytest.mark.parametrize(("kind", "coupling"), FITS)
def test_trained_density_integrates_to_one(fitted, kind, coupling):
    model, losses = fitted(kind, coupling)
    test = sample_density("moons", 5000, np.random.default_rng(1))
    gaussian_fit = 0.5 * np.log(np.linalg.det(2 * np.pi * np.e * np.cov(test.numpy().T)))  # NLL of the best Gaussian
    assert mean_nll(model, test) < gaussian_fit - 0.5, "training did not move the flow away from a Gaussian"
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 0.5
    assert abs(integrate(model.log_prob, INTEGRAL_EXTENT, INTEGRAL_GRID) - 1) < 0.01


def test_stages_go_from_the_gaussian_to_the_model(fitted):
    model, _ = fitted("coupling", "spline")
    z = torch.randn(64, 2)
    stages = model.stages(z)
    assert len(stages) == len(model.blocks) + 1 and torch.equal(stages[0], z)
    assert torch.allclose(model.blocks(stages[-1])[0], z, atol=1e-4)
    y = 2 * torch.randn(64, 2)
    assert torch.allclose(model.stage_log_prob(y, 0), model.log_prob(y))
    assert torch.allclose(model.stage_log_prob(y, len(model.blocks)), standard_normal_log_prob(y))


# ---- toy densities and figures -------------------------------------------------------------------------

@pytest.mark.parametrize("name", DENSITIES)
def test_toy_densities_are_seeded_2d_points_in_the_plotted_square(name):
    points = sample_density(name, 1000, np.random.default_rng(5))
    assert points.shape == (1000, 2) and points.dtype == torch.float32
    assert torch.equal(points, sample_density(name, 1000, np.random.default_rng(5)))
    assert points.abs().max() < 4.5 and points.std(0).min() > 0.5
    with pytest.raises(ValueError, match="unknown density 'moon'"):
        sample_density("moon", 10, np.random.default_rng(0))


def test_figures_are_written(fitted, tmp_path):
    model, _ = fitted("coupling", "affine")
    data = sample_density("moons", 500, np.random.default_rng(0))
    for draw in (evolution_figure, density_figure):
        path = draw(model, data, tmp_path / "figs" / f"{draw.__name__}.png", extent=4.5, grid_size=40, points=300)
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


# ---- the entry point ----------------------------------------------------------------------------------

TINY = ["flow.num_layers=2", "flow.hidden=8", "train.steps=30", "train.log_every=10", "evaluate.test_points=500",
        "evaluate.integral_grid=200", "figure.grid_size=30", "figure.points=200"]


def test_playground_run_prints_the_nll_the_integral_and_the_figures(tmp_path, capsys):
    result = playground_2d(composed([*TINY, "density=rings", "flow.coupling=spline", f"output_dir={tmp_path}"]))
    out = capsys.readouterr().out
    assert [p.name for p in result["figures"]] == ["rings_spline_layers.png", "rings_spline_density.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in result["figures"])
    assert abs(result["integral"] - 1) < 0.01 and np.isfinite(result["nll"])
    assert f"test NLL: {result['nll']:.4f} nats" in out and f"{result['integral']:.5f}" in out
    assert "step    30/30" in out and f"wrote {tmp_path / 'rings_spline_layers.png'}" in out


def test_playground_run_with_an_autoregressive_kind(tmp_path, capsys):
    assert composed([]).flow.kind == "coupling"
    result = playground_2d(composed([*TINY, "flow.kind=iaf", f"output_dir={tmp_path}"]))
    out = capsys.readouterr().out
    assert [p.name for p in result["figures"]] == ["moons_iaf_affine_layers.png", "moons_iaf_affine_density.png"]
    assert abs(result["integral"] - 1) < 0.01 and np.isfinite(result["nll"])
    assert "fitting moons, 2 affine IAF layers" in out


@pytest.mark.parametrize(("override", "message"), [
    ("flow.num_layers=0", "flow.num_layers=0 must be >= 1"),
    ("train.lr=-0.1", "train.lr=-0.1 must be > 0"),
    ("flow.spline_bins=1", "flow.spline_bins=1 must be >= 2"),
    ("train.log_every=-1", "train.log_every=-1 must be >= 0"),
])
def test_bad_options_end_in_one_line(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(playground_2d, composed([*TINY, override, f"output_dir={tmp_path}"]))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}")
    assert not any(tmp_path.iterdir())  # nothing written


def test_diverging_training_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_reporting_errors(playground_2d, composed([*TINY, "train.lr=1e12", "flow.scale_bound=1e6",
                                                      f"output_dir={tmp_path}"]))
    assert capsys.readouterr().err.startswith("error: training diverged at step")


@pytest.mark.slow  # a subprocess: torch and Hydra start-up (~15 s on 2 busy cores)
def test_script_runs(tmp_path):
    run = run_entry("scripts/playground_2d.py", [*TINY, "density=eight_gaussians", "run_name=tiny"], tmp_path,
                    env={"PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.output[-3000:]
    figures = tmp_path / "logs" / "playground_2d" / "runs" / "tiny"
    assert (figures / "eight_gaussians_affine_layers.png").is_file()
    assert (figures / "eight_gaussians_affine_density.png").is_file()
    bad = run_entry("scripts/playground_2d.py", ["density=nope"], tmp_path, env={"PYTHONPATH": str(REPO)})
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: density=nope: density must be one of " + ", ".join(DENSITIES)]

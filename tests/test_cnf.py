"""The continuous normalizing flow (model=cnf, flowgen/models/cnf.py, flowgen/flows/ode.py): exact through the
public API on small D in float64, its two objectives, its estimator's standard error, the tools and its benchmark.

Tests of: flowgen/flows/velocity.py, flowgen/flows/flow_matching.py, flowgen/benchmark/cnf.py,
flowgen/cli/cnf_benchmark.py, flowgen/playground/peer.py.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flowgen.benchmark.cnf import markdown_table, sampling_speed, tolerance_table
from flowgen.cli.cnf_benchmark import cnf_benchmark
from flowgen.cli.errors import run_reporting_errors
from flowgen.cli.evaluate import evaluate
from flowgen.cli.playground_2d import playground_2d
from flowgen.cli.sample import sample
from flowgen.cli.train import train
from flowgen.data.densities2d import sample_density
from flowgen.dequantization import UniformDequantization
from flowgen.evaluation import evaluate_split
from flowgen.flows.vector import build_cnf, build_flow
from flowgen.models import CNF
from flowgen.playground.grid import integrate
from flowgen.playground.model import FlowDensity2d
from flowgen.playground.peer import playground_peer
from flowgen.playground.training import mean_nll
from flowgen.playground.training import train as train_2d
from tests.conftest import jacobian_logdets, perturb_parameters
from tests.test_configs import compose_train
from tests.test_ood import composed
from tests.test_playground import TINY as TINY_2D
from tests.test_playground import composed as composed_2d
from tests.train_runner import FAST

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_cnf(**options) -> CNF:
    """A CNF on 1x2x2 images (D = 4) with an MLP velocity, float64, perturbed away from the identity."""
    torch.manual_seed(0)
    model = CNF(1, 2, velocity="mlp", hidden=8, depth=2, **options).double()
    perturb_parameters(model, std=0.3)
    return model.eval()


def images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) - 0.5


def test_exact_trace_is_the_log_det_of_the_solved_map_and_inverse_returns_x():
    """log|det| from the ODE with the exact trace = log|det| of the autograd Jacobian of the solved map, and
    forward then inverse gives x back, both within the adaptive solver's tolerance (dopri5, 1e-7)."""
    model, x = tiny_cnf(solver="dopri5", rtol=1e-7, atol=1e-7, data_scale=2.0), images(3)
    z, logdet = model(x)
    assert logdet.abs().min() > 0.05  # not the identity
    assert torch.allclose(logdet, jacobian_logdets(lambda v: model(v)[0], x), atol=1e-5, rtol=0)
    back, inverse_logdet = model.inverse(z)
    assert (back - x).abs().max() < 1e-5 and torch.allclose(inverse_logdet, -logdet, atol=1e-5, rtol=0)
    assert (model.invert(z) - back).abs().max() < 1e-5
    assert model.reconstruction_errors(x)["ode"] < 1e-5
    parts = model.log_prob_parts(x)
    assert torch.allclose(parts.terms["scale/logdet"], torch.full((3,), 4 * math.log(2.0), dtype=torch.float64))
    assert torch.allclose(parts.total(), model.log_prob(x), atol=1e-10)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_mean_equals_the_exact_trace_within_its_standard_error(probe):
    """With a fixed-step solver both estimators integrate along the same path, so the many-probe Hutchinson
    mean must match the exact-trace log p within a few standard errors; repeated estimates spread as stated."""
    exact = tiny_cnf(solver="rk4", step_size=0.25)
    log_p = exact.log_prob(images())
    model = tiny_cnf(solver="rk4", step_size=0.25, eval_trace="hutchinson", probe=probe, eval_probes=200)
    estimate = model.log_prob_estimate(images(), generator=torch.Generator().manual_seed(0))
    assert (estimate.std_error > 0).all() and estimate.stats["nfe"] == 16
    assert ((estimate.log_prob - log_p).abs() < 4 * estimate.std_error).all()
    # independent 32-probe estimates spread across seeds as much as each one's standard error says
    small = tiny_cnf(solver="rk4", step_size=0.25, eval_trace="hutchinson", probe=probe, eval_probes=32)
    repeats = [small.log_prob_estimate(images(), generator=torch.Generator().manual_seed(s)) for s in range(12)]
    spread = torch.stack([e.log_prob for e in repeats]).std(0)
    stated = torch.stack([e.std_error for e in repeats]).mean(0)
    assert ((spread / stated > 0.5) & (spread / stated < 2)).all()


def test_a_small_cnf_density_integrates_to_one():
    """A perturbed 2-D CNF's exp(log p) over a grid (the playground's integral) is 1."""
    torch.manual_seed(0)
    model = FlowDensity2d(build_cnf(2, 8, solver="rk4", step_size=0.1))
    perturb_parameters(model, std=0.3)
    assert abs(mean_nll(model, torch.randn(256, 2)) - mean_nll(FlowDensity2d(build_cnf(1, 8)), torch.randn(256, 2))) \
        > 0.01  # not the Gaussian
    assert integrate(model.log_prob, 8.0, 160) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.slow  # maximum likelihood: 27 s on one core; flow matching: 4 s (the playground test above fits both)
@pytest.mark.parametrize("objective", ["likelihood", "flow_matching"])
def test_a_trained_2d_cnf_fits_the_moons_and_integrates_to_one(objective):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = FlowDensity2d(build_cnf(1, 32, solver="rk4", step_size=0.125), objective)
    train_2d(model, lambda n: sample_density("moons", n, rng), steps=150 if objective == "likelihood" else 400,
             batch_size=256, lr=5e-3)
    test = sample_density("moons", 2000, np.random.default_rng(1))
    gaussian_fit = 0.5 * np.log(np.linalg.det(2 * np.pi * np.e * np.cov(test.numpy().T)))
    assert mean_nll(model, test) < gaussian_fit - 0.3
    assert abs(integrate(model.log_prob, 10.0, 200) - 1) < 0.01


@pytest.mark.parametrize("objective", ["flow_matching", "likelihood"])
def test_the_playground_runs_a_cnf_either_way_and_its_density_integrates_to_one(tmp_path, capsys, objective):
    result = playground_2d(composed_2d([*TINY_2D, "flow.kind=cnf", f"flow.objective={objective}", "flow.solver=rk4",
                                        "flow.step_size=0.25", f"output_dir={tmp_path}"]))
    assert [p.name for p in result["figures"]] == [f"moons_cnf_{objective}_layers.png",
                                                   f"moons_cnf_{objective}_density.png"]
    assert abs(result["integral"] - 1) < 0.01 and np.isfinite(result["nll"])
    assert f"fitting moons, a CNF (2 time segments) by {objective}" in capsys.readouterr().out


def test_flow_matching_loss_is_the_velocity_regression_on_the_linear_path():
    model = tiny_cnf(objective="flow_matching", num_classes=3).train()
    y, labels = images(), torch.tensor([0, 1, 2, 1])
    torch.manual_seed(5)
    loss = model.training_loss(y, labels)
    assert loss.log_prob is None and loss.name == "fm_mse" and loss.metrics["nfe"] == 1
    torch.manual_seed(5)
    t, noise = torch.rand(4, dtype=torch.float64), torch.randn_like(y)
    z_t = (1 - t.view(-1, 1, 1, 1)) * y + t.view(-1, 1, 1, 1) * noise
    expected = (model.flow.velocity(z_t, t, labels) - (noise - y)).pow(2).flatten(1).mean(1)
    assert torch.allclose(loss.loss.double(), expected, atol=1e-6)
    loss.loss.mean().backward()
    assert all(p.grad is not None for p in model.flow.velocity.mlp.out.parameters())


def test_likelihood_training_loss_with_the_exact_trace_is_log_p_and_penalties_are_positive():
    model = tiny_cnf(trace="exact", solver="rk4", step_size=0.25, kinetic_energy=0.1, jacobian_norm=0.1)
    y = images()
    log_p = model.log_prob(y)  # eval mode: exact
    loss = model.train().training_loss(y)
    assert torch.allclose(loss.log_prob, log_p, atol=1e-10)
    assert loss.penalty.shape == (4,) and (loss.penalty > 0).all()
    assert loss.metrics["nfe"] == 16 and loss.metrics["kinetic_energy"] > 0


def test_sampling_solves_back_from_the_gaussian_with_the_solver_asked_for():
    model = tiny_cnf(num_classes=3)
    zeros = model.sample(3, temperature=0.0, y=1)
    assert torch.allclose(zeros, zeros[:1].expand(3, -1, -1, -1))  # T = 0: every sample is f^-1(0)
    x = model.sample(2, temperature=1.0, generator=torch.Generator().manual_seed(0), solver="rk4", step_size=0.125)
    assert x.shape == (2, 1, 2, 2) and model.nfe == 32 and model.flow.solver.method == "dopri5"  # restored
    z = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (x - model.invert(z)).abs().max() < 1e-3  # the same ODE, a coarser solve
    with pytest.raises(ValueError, match="the fixed-step solver euler needs a step_size"):
        model.sample(1, solver="euler")


def test_evaluation_reports_the_estimators_standard_error_and_nfe():
    x = torch.randint(0, 4, (6, 1, 2, 2))
    batches = [(x[:3], torch.zeros(3, dtype=torch.long), torch.arange(3)),
               (x[3:], torch.zeros(3, dtype=torch.long), torch.arange(3, 6))]
    dequantizer = UniformDequantization(4)
    exact = evaluate_split(tiny_cnf(solver="rk4", step_size=0.5).float(), dequantizer, batches)
    assert exact.bpd_std_error == 0 and exact.per_image_bpd_std_error is None and exact.nfe == 8
    hutchinson = tiny_cnf(solver="rk4", step_size=0.5, eval_trace="hutchinson", eval_probes=4).float()
    first, again = (evaluate_split(hutchinson, dequantizer, batches, seed=3) for _ in range(2))
    assert first.bpd == again.bpd and first.bpd_std_error > 0  # per-image probes: reproducible
    assert abs(first.bpd - exact.bpd) < 5 * first.bpd_std_error
    assert first.per_image_bpd_std_error.shape == (6,) and "bpd_std_error" in first.summary()


# configs/model/cnf.yaml at a size that trains in seconds: an MLP velocity, 4 RK4 steps, 2-probe evaluation
TINY_CNF = ["model=cnf", "model.velocity=mlp", "model.hidden=16", "model.depth=1", "model.solver=rk4",
            "model.step_size=0.25", "model.eval_trace=hutchinson", "model.eval_probes=2", "~tuned"]


@pytest.mark.parametrize("objective", ["flow_matching", "likelihood"])
def test_train_both_ways_then_sample_and_evaluate(tmp_path, objective):
    cfg = compose_train(tmp_path, [*TINY_CNF, f"model.objective={objective}", "logger=csv", *FAST,
                                   "model.num_classes=${data.num_classes}", f"run_name={objective}"])
    train(cfg)
    run = Path(cfg.paths.output_dir)
    rows = list(csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open()))
    logged = {k for r in rows for k, v in r.items() if v}
    assert "train/nfe" in logged and ("train/fm_mse" in logged) == (objective == "flow_matching")
    assert ("train/bpd" in logged) == (objective == "likelihood") and "val/bpd" in logged
    (grid,) = sample(composed("sample", [f"ckpt_path={run}", "n=2", "label=3", "sampling.solver=euler",
                                         "sampling.step_size=0.5", f"output_dir={tmp_path / 'samples'}"]))
    assert grid.is_file()
    result = evaluate(composed("evaluate", [f"ckpt_path={run}", "split=val", "typicality.split=null",
                                            f"output={tmp_path / 'val'}.json"]))
    assert math.isfinite(result["bpd"]) and result["bpd_std_error"] > 0 and result["nfe"] == 16
    scores = list(csv.DictReader(open(result["csv"])))
    assert len(scores) == 297 and float(scores[0]["bpd_std_error"]) > 0


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="eval_trace=hutchinson needs eval_probes >= 2"):
        CNF(1, 4, velocity="mlp", eval_trace="hutchinson", eval_probes=1)
    with pytest.raises(ValueError, match="unknown ODE solver 'rk5'; choose one of dopri5"):
        CNF(1, 4, velocity="mlp", solver="rk5")
    with pytest.raises(ValueError, match="unknown objective 'score'"):
        CNF(1, 4, objective="score")
    with pytest.raises(ValueError, match="use flow.kind=cnf"):
        FlowDensity2d(build_flow(1, "affine", 4), "flow_matching")


def test_playground_options_of_a_cnf_are_one_line_errors(tmp_path, capsys):
    for override, message in [("flow.objective=flow_matching", "error: flow.objective=flow_matching trains a "
                                                                 "continuous flow; use flow.kind=cnf"),
                              ("flow.kind=cnf flow.solver=rk4", "error: the fixed-step solver rk4 needs a step_size")]:
        with pytest.raises(SystemExit) as exit_info:
            run_reporting_errors(playground_2d, composed_2d([*TINY_2D, *override.split(), f"output_dir={tmp_path}"]))
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith(message)


def test_the_benchmark_commands_print_their_tables(capsys):
    """scripts/cnf_benchmark.py's three tables, on a tiny saved CNF and a 2-step playground (zuko: the peer)."""
    model = tiny_cnf(solver="rk4", step_size=0.25).float()
    batches = [(torch.randint(0, 4, (3, 1, 2, 2)), torch.zeros(3, dtype=torch.long), torch.arange(3))]
    rows = tolerance_table(model, UniformDequantization(4), batches, [1e-3, 1e-5])
    assert [r["tolerance"] for r in rows] == [1e-3, 1e-5] and rows[0]["nfe"] == 16  # fixed steps: same NFE
    assert model.flow.solver.rtol == 1e-5 and model.flow.solver.method == "rk4"  # restored
    speed = sampling_speed(model, [{"solver": "euler", "step_size": 0.5}, {"solver": "dopri5", "rtol": 1e-3}], 4)
    assert speed[0]["nfe"] == 2 and speed[1]["nfe"] > 2 and all(r["images_per_sec"] > 0 for r in speed)
    table = markdown_table(speed).splitlines()
    assert table[0] == "| solver | step_size | nfe | seconds | images_per_sec | rtol |" and table[2].endswith("|  |")
    peers = playground_peer(steps=2, hidden=8, test_points=64, log=lambda line: None)
    assert len(peers) == 3 and all(math.isfinite(r["test_nll"]) for r in peers) and "zuko" in peers[2]["model"]
    with pytest.raises(SystemExit):
        cnf_benchmark(["sampling"])  # argparse: the run is required
    assert "required: run" in capsys.readouterr().err

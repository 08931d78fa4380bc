"""``python scripts/playground_2d.py``: fit a 2-D flow to a toy density, check it, draw it.

1. build the flow (``flowgen.flows.vector.build_flow``) on a N(0, I) base (``model.FlowDensity2d``);
2. train it by maximum likelihood on fresh samples (``training.train``);
3. report the NLL of fresh test points and ∫∫ p(x) dx over a grid (``grid.integrate``; 1 for a
   correctly normalised flow whose mass lies inside the grid);
4. write ``<density>_<coupling>_layers.png`` and ``<density>_<coupling>_density.png``
   (``figures``) to ``output_dir`` (``<density>_<kind>_<coupling>_...`` for flow.kind=maf|iaf).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from flowgen.checks import validated
from flowgen.data.densities2d import sample_density
from flowgen.errors import UserError
from flowgen.flows.vector import build_cnf, build_flow
from flowgen.playground.figures import density_figure, evolution_figure
from flowgen.playground.grid import integrate
from flowgen.playground.model import FlowDensity2d
from flowgen.playground.training import mean_nll, train


def playground_2d(cfg: DictConfig) -> dict:
    """Train, evaluate and draw; prints the figures' paths, the NLL and the grid integral, and returns them."""
    cfg = validated(cfg)  # types and ranges: flowgen/config/tool_schemas.py Playground2DConfig
    output = Path(cfg.output_dir).expanduser()
    if output.exists() and not output.is_dir():
        raise UserError(f"output_dir={cfg.output_dir} is a file; give a directory for the figures")
    # the matrices are tiny (batch x hidden): one thread is as fast as several and leaves the cores to others
    torch.set_num_threads(1)
    seed = cfg.train.seed
    torch.manual_seed(seed)
    data_rng = np.random.default_rng(seed)
    flow = cfg.flow
    if flow.kind == "cnf":
        model = FlowDensity2d(build_cnf(flow.num_layers, flow.hidden, solver=str(flow.solver), rtol=flow.rtol,
                                        atol=flow.atol, step_size=flow.step_size), str(flow.objective))
        name = f"{cfg.density}, a CNF ({flow.num_layers} time segments) by {flow.objective}"
        stem = f"{cfg.density}_cnf_{flow.objective}"
    else:
        if flow.objective != "likelihood":
            raise UserError(f"flow.objective={flow.objective} trains a continuous flow; use flow.kind=cnf")
        model = FlowDensity2d(build_flow(flow.num_layers, flow.coupling, flow.hidden, flow.actnorm, flow.scale_bound,
                                         flow.spline_bins, flow.spline_bound, kind=flow.kind))
        coupling = flow.kind == "coupling"
        blocks = "couplings" if coupling else f"{str(flow.kind).upper()} layers"
        name = f"{cfg.density}, {flow.num_layers} {flow.coupling} {blocks}"
        stem = f"{cfg.density}_{flow.coupling}" if coupling else f"{cfg.density}_{flow.kind}_{flow.coupling}"
    print(f"fitting {name} ({sum(p.numel() for p in model.parameters())} parameters), {cfg.train.steps} steps",
          flush=True)
    start = time.perf_counter()
    train(model, lambda n: sample_density(cfg.density, n, data_rng), cfg.train.steps, cfg.train.batch_size,
          cfg.train.lr, log_every=cfg.train.log_every, log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - start

    test = sample_density(cfg.density, cfg.evaluate.test_points, np.random.default_rng(seed + 1))
    nll = mean_nll(model, test)
    integral = integrate(model.log_prob, cfg.evaluate.integral_extent, cfg.evaluate.integral_grid)

    shown = sample_density(cfg.density, max(cfg.figure.points, 20000), np.random.default_rng(seed + 2))
    title = f"{name}: test NLL {nll:.3f} nats"
    figure_args = dict(extent=cfg.figure.extent, grid_size=cfg.figure.grid_size, points=cfg.figure.points, seed=seed)
    layers = evolution_figure(model, shown, output / f"{stem}_layers.png", title=title, **figure_args)
    density = density_figure(model, shown, output / f"{stem}_density.png", title=title, **figure_args)
    R, N = cfg.evaluate.integral_extent, cfg.evaluate.integral_grid
    print(f"trained in {seconds:.1f} s", flush=True)
    print(f"test NLL: {nll:.4f} nats per point ({cfg.evaluate.test_points} fresh points)", flush=True)
    print(f"integral of p over [-{R}, {R}]^2 ({N}x{N} midpoint grid): {integral:.5f}", flush=True)
    print(f"wrote {layers}\nwrote {density}", flush=True)
    return {"nll": nll, "integral": integral, "seconds": seconds, "figures": [layers, density]}

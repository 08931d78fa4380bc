"""``python scripts/cnf_benchmark.py {tolerance,sampling,playground}``: the README's CNF measurements.

    tolerance  RUN [--tolerances 1e-3 1e-4 ...] [--split test]   bpd ± std error, NFE and time against rtol = atol
    sampling   RUN [--images 64]                                 images/s against the sampling solve's NFE
    playground [--density moons --steps 300]                     the 2-D CNF beside zuko's (NLL, time)

RUN is a run directory or checkpoint of ``model=cnf`` (its last checkpoint, EMA weights when kept).  The work is
``flowgen.benchmark.cnf`` and ``flowgen.playground.peer``; each command prints a Markdown table.
"""

from __future__ import annotations

import argparse

import torch

from flowgen.benchmark.cnf import markdown_table, sampling_speed, tolerance_table
from flowgen.build import instantiate_data, restore_run
from flowgen.errors import UserError
from flowgen.models import CNF
from flowgen.playground.peer import playground_peer

SAMPLING_SOLVERS = [{"solver": "dopri5", "rtol": 1e-5, "atol": 1e-5}, {"solver": "dopri5", "rtol": 1e-3, "atol": 1e-3},
                    {"solver": "rk4", "step_size": 0.1}, {"solver": "rk4", "step_size": 0.25},
                    {"solver": "euler", "step_size": 0.1}, {"solver": "euler", "step_size": 0.25}]


def _restored_cnf(ckpt_path: str):
    run = restore_run(ckpt_path, use_ema=True, device="cpu", which="last")
    if not isinstance(run.model, CNF):
        raise UserError(f"{ckpt_path} holds a {type(run.model).__name__}, not a CNF (model=cnf)")
    print(run.describe("cpu"), flush=True)
    return run


def cnf_benchmark(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="scripts/cnf_benchmark.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    tolerance = commands.add_parser("tolerance")
    tolerance.add_argument("run")
    tolerance.add_argument("--tolerances", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5, 1e-6])
    tolerance.add_argument("--split", default="test")
    sampling = commands.add_parser("sampling")
    sampling.add_argument("run")
    sampling.add_argument("--images", type=int, default=64)
    playground = commands.add_parser("playground")
    playground.add_argument("--density", default="moons")
    playground.add_argument("--steps", type=int, default=300)
    playground.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small tensors; leaves the other core to the rest of the machine

    if args.command == "tolerance":
        run = _restored_cnf(args.run)
        datamodule = instantiate_data(run.cfg.data)
        rows = tolerance_table(run.model, run.module.dequantizer, datamodule.eval_dataloader(args.split),
                               args.tolerances, run.module.class_conditional)
    elif args.command == "sampling":
        rows = sampling_speed(_restored_cnf(args.run).model, SAMPLING_SOLVERS, args.images)
    else:
        rows = playground_peer(args.density, args.steps, hidden=args.hidden)
    print(markdown_table(rows), flush=True)
    return rows

"""``python scripts/benchmark_autoregressive.py``: the options, the measurement of each D, the table.

What is measured and how: flowgen/benchmark/autoregressive.py.
"""

from __future__ import annotations

import argparse

import torch

from flowgen.benchmark.autoregressive import markdown_table, measure_dim
from flowgen.benchmark.measure import cpu_description


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Density and sampling time of coupling, MAF and IAF flows, "
                                     "side by side", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 64, 784], help="vector sizes D (784: 28x28 images)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1024, 1024, 256],
                        help="batch per D (one value: all D)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256, 1024],
                        help="conditioner width per D (one value: all D); >= D - 1 for MADE")
    parser.add_argument("--layers", type=int, default=4, help="blocks per flow")
    parser.add_argument("--transform", default="affine", choices=("affine", "spline"))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median)")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds after which a variant is timed no more (at least once)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for name in ("batch", "hidden"):
        values = getattr(args, name)
        if len(values) == 1:
            setattr(args, name, values * len(args.dims))
        elif len(values) != len(args.dims):
            parser.error(f"--{name} takes one value or one per --dims ({len(args.dims)}), got {len(values)}")
    if min(args.dims) < 2 or min(args.batch) < 1 or args.layers < 1 or args.repeats < 1 or args.threads < 1 \
            or not args.budget > 0:
        parser.error("--dims >= 2, --batch, --layers, --repeats and --threads >= 1, --budget > 0")
    for dim, hidden in zip(args.dims, args.hidden, strict=True):
        if hidden < dim - 1:
            parser.error(f"--hidden {hidden} < D - 1 = {dim - 1}: a MADE needs a unit of every degree 1..D-1")
    return args


def main(argv: list[str] | None = None) -> str:
    """Measure, print the markdown table with the machine it ran on, and return the table."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for dim, batch, hidden in zip(args.dims, args.batch, args.hidden, strict=True):
        rows += measure_dim(dim, batch, hidden, args.layers, args.transform, args.repeats, args.budget, device)
        print(f"measured D = {dim}", flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    table = markdown_table(rows)
    print(f"\n{args.layers} blocks of {args.transform} layers, float32, torch {torch.__version__}, "
          f"{args.threads} thread(s), medians of up to {args.repeats} calls ({args.budget:g} s budget each)\n"
          f"{where}\n\n{table}", flush=True)
    return table

"""``python scripts/reproduction_table.py [experiment ...]``: the README's reproduction table, computed.

What is counted and how: flowgen/benchmark/reproduction.py.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from flowgen.benchmark.reproduction import (
    H100_BF16_DENSE_FLOPS,
    PUBLISHED,
    UTILISATION,
    markdown_rows,
    reproduction_row,
)
from flowgen.cli.device_check import experiment_composer


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Training FLOPs per image and GPU-hours of the paper experiments")
    parser.add_argument("experiments", nargs="*", default=list(PUBLISHED), help="experiment configs (default: all)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        compose = experiment_composer(Path(out))
        rows = []
        for experiment in args.experiments:
            rows.append(reproduction_row(experiment, compose(experiment, ())))
            print(f"counted {experiment}: {rows[-1]['flops_counted']}", flush=True)
    table = markdown_rows(rows)
    print(f"\nGPU-hours = FLOPs/image x images/epoch x epochs / ({UTILISATION:.0%} x "
          f"{H100_BF16_DENSE_FLOPS / 1e12:g} TFLOP/s) / 3600\n\n{table}", flush=True)
    return table

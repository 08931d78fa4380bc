"""``python scripts/readme_figures.py``: make the README's figures from a trained run (by default the newest run
of the default main job).

    python train.py && python scripts/readme_figures.py [--ckpt-path logs/train/runs/<run>]

Writes scripts/figures/digits_samples.png (one row per temperature, the same noise in every row)
and scripts/figures/digits_interpolation.png (spherical paths between validation images).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.utils import save_image

from flowgen.build import instantiate_data, restore_run
from flowgen.latents import interpolate
from flowgen.likelihood import to_unit_interval
from flowgen.sampling import image_grid, temperature_rows

ROOT = Path(__file__).resolve().parents[2]  # the repository: flowgen/cli/ -> flowgen/ -> root
FIGURES = ROOT / "scripts" / "figures"
TEMPERATURES = [0.5, 0.7, 0.8, 0.9, 1.0]


def newest_run() -> Path:
    runs = sorted((ROOT / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit("no trained run under logs/train/runs: run `python train.py` first")
    return runs[-1].parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Make the README's figures from a trained run",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt-path", type=Path, default=None, help="run directory or .ckpt (default: newest run)")
    parser.add_argument("--per-row", type=int, default=12)
    parser.add_argument("--upscale", type=int, default=4)
    parser.add_argument("--out", type=Path, default=FIGURES, help="directory of the figures (default scripts/figures)")
    args = parser.parse_args(argv)

    run = restore_run(args.ckpt_path or newest_run())
    levels = run.module.num_levels
    args.out.mkdir(parents=True, exist_ok=True)

    samples = temperature_rows(run.model, levels, args.per_row, TEMPERATURES, seed=0)
    save_image(image_grid(samples, args.per_row, args.upscale), args.out / "digits_samples.png")

    data = instantiate_data(run.cfg.data)
    rows = []
    for a, b in [(0, 1), (2, 3), (4, 5)]:
        y = run.module.dequantizer.bin_centres(data.images("val", (a, b)))
        rows.append(to_unit_interval(interpolate(run.model, y[0], y[1], args.per_row, "spherical"), levels))
    save_image(image_grid(torch.cat(rows), args.per_row, args.upscale), args.out / "digits_interpolation.png")
    print(f"from {run.ckpt}: wrote {args.out / 'digits_samples.png'} and {args.out / 'digits_interpolation.png'}")

"""Fit a coupling, MAF or IAF flow to a toy 2-D density and draw it: `python scripts/playground_2d.py density=moons`.

Options in configs/playground_2d.yaml (density, flow.kind=coupling|maf|iaf, flow.coupling=affine|spline,
flow.num_layers, ...); the work is flowgen/cli/playground_2d.py.  Writes two PNGs to the run directory and
prints their paths, the test NLL and the grid integral of the learned density.
"""

import hydra
from omegaconf import DictConfig

import flowgen.cli  # noqa: F401  (registers the config resolvers)
from flowgen.cli.errors import run_reporting_errors
from flowgen.cli.launch import run_entry_point
from flowgen.cli.playground_2d import playground_2d


@hydra.main(version_base="1.3", config_path="../configs", config_name="playground_2d")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(playground_2d, cfg)


if __name__ == "__main__":
    run_entry_point(main)

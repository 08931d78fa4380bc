"""Train a flow: `python train.py model=glow data=cifar10` (see configs/ and README.md)."""

import hydra
from omegaconf import DictConfig

import flowgen.cli  # noqa: F401  (registers the config resolvers)
from flowgen.cli.errors import run_reporting_errors
from flowgen.cli.launch import run_entry_point
from flowgen.cli.train import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_reporting_errors(train, cfg)


if __name__ == "__main__":
    run_entry_point(main)

"""Sample, interpolate or reconstruct with a trained flow: `python sample.py ckpt_path=<run dir>` (see README.md)."""

import hydra
from omegaconf import DictConfig

import flowgen.cli  # noqa: F401  (registers the config resolvers)
from flowgen.cli.errors import run_reporting_errors
from flowgen.cli.launch import run_entry_point
from flowgen.cli.sample import sample


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(sample, cfg)


if __name__ == "__main__":
    run_entry_point(main)

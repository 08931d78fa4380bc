"""Exact bits per dimension of a trained flow: `python evaluate.py ckpt_path=<run dir> split=test` (see README.md)."""

import hydra
from omegaconf import DictConfig

import flowgen.cli  # noqa: F401  (registers the config resolvers)
from flowgen.cli.errors import run_reporting_errors
from flowgen.cli.evaluate import evaluate
from flowgen.cli.launch import run_entry_point


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(evaluate, cfg)


if __name__ == "__main__":
    run_entry_point(main)

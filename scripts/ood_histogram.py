"""In- vs out-of-distribution scores of one flow: `python scripts/ood_histogram.py in_csv=<CSV> ood_csv=[<CSV>,...]`.

The CSVs are evaluate.py's per-image scores (see README.md, "Out-of-distribution scoring").
"""

import hydra
from omegaconf import DictConfig

import flowgen.cli  # noqa: F401  (registers the config resolvers)
from flowgen.cli.errors import run_reporting_errors
from flowgen.cli.launch import run_entry_point
from flowgen.cli.ood_histogram import ood_histogram


@hydra.main(version_base="1.3", config_path="../configs", config_name="ood_histogram")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(ood_histogram, cfg)


if __name__ == "__main__":
    run_entry_point(main)

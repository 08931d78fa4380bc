"""Attribute editing (Glow paper, section 5): `python scripts/manipulate.py ckpt_path=<run> attribute=3 image=0`.

Writes one PNG row decode(z(image) + alpha * d), d the mean latent difference between the images with and without
the attribute; see configs/manipulate.yaml and flowgen/cli/manipulate.py.
"""

import hydra
from omegaconf import DictConfig

import flowgen.cli  # noqa: F401  (registers the config resolvers)
from flowgen.cli.errors import run_reporting_errors
from flowgen.cli.launch import run_entry_point
from flowgen.cli.manipulate import edit_attribute


@hydra.main(version_base="1.3", config_path="../configs", config_name="manipulate")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(edit_attribute, cfg)


if __name__ == "__main__":
    run_entry_point(main)

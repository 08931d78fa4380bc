"""Speed and memory of a training step and of sampling, side by side in one run.

    python scripts/benchmark.py model=glow data=cifar10 model.steps=8 benchmark.compare=[normflows]
    python scripts/benchmark.py model=glow data=cifar10 'benchmark.compare=["trainer.precision=bf16-mixed"]'
    python scripts/benchmark.py model=tarflow data=digits \
        'benchmark.compare=["model.inverse_method=sequential_uncached","model.inverse_method=jacobi"]'

Any train.py override applies (trainer.precision, performance.channels_last, performance.compile,
model.memory, data.batch_size, ...); see configs/benchmark.yaml and flowgen/benchmark/compare.py for
what is measured.  Writes logs/benchmark/runs/<time>/benchmark.json and prints a markdown table.
"""

import hydra
from omegaconf import DictConfig

import flowgen.cli  # noqa: F401  (registers the config resolvers)
from flowgen.cli.benchmark import run_benchmark
from flowgen.cli.errors import run_reporting_errors
from flowgen.cli.launch import run_entry_point


@hydra.main(version_base="1.3", config_path="../configs", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(run_benchmark, cfg)


if __name__ == "__main__":
    run_entry_point(main)

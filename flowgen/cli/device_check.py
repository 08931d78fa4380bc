"""``python scripts/device_check.py [--dry-run] [--out DIR]``: the options, the steps, the table and the JSON.

What each step does and measures: flowgen/benchmark/device_check.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from flowgen.benchmark.device_check import Compose, StepResult, markdown_table, run_device_check
from flowgen.checks import validated
from flowgen.cli import _START_TIME
from flowgen.cli.errors import EXIT_USER_ERROR
from flowgen.cli.overrides import CONFIG_DIR
from flowgen.errors import UserError

ROOT = CONFIG_DIR.parent


def experiment_composer(out: Path) -> Compose:
    """``compose(experiment, overrides)``: the validated config of ``python train.py experiment=<experiment>
    <overrides>`` with every path under ``out``, composed once per experiment and overrides."""
    cache: dict[tuple, DictConfig] = {}

    def compose_experiment(experiment: str, overrides: tuple[str, ...]) -> DictConfig:
        if (experiment, overrides) not in cache:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                cfg = compose("train", overrides=[f"experiment={experiment}", f"paths.log_dir={out}",
                                                  f"paths.output_dir={out}/run", *overrides])
            cache[experiment, overrides] = validated(cfg)
        return cache[experiment, overrides]
    return compose_experiment


def default_out() -> Path:
    """A run folder of its own: <FLOWGEN_LOG_DIR or ./logs>/device_check/runs/<start time>."""
    logs = Path(os.environ.get("FLOWGEN_LOG_DIR") or Path.cwd() / "logs")
    return logs / "device_check" / "runs" / _START_TIME


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The GPU check: CUDA-only tests, the paper configs' speed and memory in float32, bf16-mixed "
                    "and compiled, and 300 training steps of the paper Glow; within 8 minutes on one H100/H200")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same steps on the CPU at tiny sizes (well under a minute)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for device_check.md and device_check.json (default: a new run folder "
                             "under $FLOWGEN_LOG_DIR or ./logs)")
    return parser.parse_args(argv)


def _print_step(result: StepResult) -> None:
    detail = result.error or result.figures.get("summary", "")
    print(f"[{result.status}] {result.name} ({result.seconds:.0f} s of {result.budget_s:.0f} s) {detail}", flush=True)


def check(args: argparse.Namespace) -> int:
    """Run the check, write the table and the JSON; 0 when every step is ok, else 1."""
    if not args.dry_run and not torch.cuda.is_available():
        raise UserError("no CUDA device: run scripts/device_check.py on a GPU machine, or add --dry-run for the "
                        "CPU rehearsal at tiny sizes")
    out = (args.out or default_out()).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if any((out / name).exists() for name in ("device_check.md", "device_check.json")):
        raise UserError(f"--out {out} already holds a device check; give a new directory")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" banners per step
    record = run_device_check(experiment_composer(out), ROOT / "tests", out, args.dry_run, report=_print_step)
    record["command"] = " ".join(["python scripts/device_check.py", *sys.argv[1:]])
    table = markdown_table(record)
    (out / "device_check.md").write_text(table + "\n")
    (out / "device_check.json").write_text(json.dumps(record, indent=2))
    print(f"\n{table}\n\nwrote {out / 'device_check.md'} and {out / 'device_check.json'}", flush=True)
    return 0 if all(step["status"] == "ok" for step in record["steps"]) else 1


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:
        code = check(args)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        code = EXIT_USER_ERROR
    sys.exit(code)

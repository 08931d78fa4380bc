"""``python scripts/benchmark.py``: validate the options, build the workloads, measure, print and write the JSON.

What is measured: flowgen/benchmark/compare.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from flowgen.benchmark.compare import device_name, markdown_table, measure_workloads
from flowgen.benchmark.workloads import build_workloads
from flowgen.build import resolve_device
from flowgen.checks import validated
from flowgen.errors import UserError


def run_benchmark(cfg: DictConfig) -> list[dict]:
    """Build, measure, print the table and write ``benchmark.output`` (JSON)."""
    cfg = validated(cfg)  # types and ranges: flowgen/config/tool_schemas.py BenchmarkConfig
    if Path(cfg.benchmark.output).expanduser().is_dir():
        raise UserError(f"benchmark.output={cfg.benchmark.output} is a directory; give the path of the JSON file")
    device = resolve_device(cfg.benchmark.device)
    torch.set_float32_matmul_precision("high")  # as train.py: TF32 matmuls on GPUs that have them
    workloads = build_workloads(cfg, device)
    records = measure_workloads(workloads, device, cfg)
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "timed_steps": int(cfg.benchmark.timed_steps),
        "warmup_steps": int(cfg.benchmark.warmup_steps),
        "workloads": records,
    }
    table = markdown_table(records)
    print(f"device: {result['device']}, torch {result['torch']}\n{table}", flush=True)
    out = Path(cfg.benchmark.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}", flush=True)
    return records

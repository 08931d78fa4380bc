"""``python evaluate.py ckpt_path=... split=test``: exact bpd of a trained flow over a whole split."""

from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from flowgen.cli.errors import UserError
from flowgen.cli.restore import RestoredRun, instantiate_data, resolve_device, restore_run
from flowgen.evaluation import SplitScore, autocast_context, evaluate_split

SPLITS = ("train", "val", "test")


def evaluate(cfg: DictConfig) -> dict:
    """Score the checkpoint on ``split`` of the run's data (or of ``data=...``); print a table, write JSON."""
    if cfg.split not in SPLITS:
        raise UserError(f"split={cfg.split!r}; choose one of {', '.join(SPLITS)}")
    device = resolve_device(cfg.device)
    run = restore_run(cfg.ckpt_path, use_ema=cfg.use_ema, device=device)
    num_samples = cfg.num_samples if cfg.num_samples is not None else _run_eval(run, "num_samples", 1)
    seed = cfg.seed if cfg.seed is not None else _run_eval(run, "seed", 0)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise UserError(f"num_samples={num_samples!r} must be an integer >= 1")

    precision = str(cfg.get("precision") or "32-true")
    try:  # the same checks evaluate_split makes, before any data is loaded
        autocast_context(device, precision)
    except ValueError as exc:
        raise UserError(str(exc)) from exc

    data_cfg = _data_config(cfg, run)
    datamodule = instantiate_data(data_cfg)
    _check_compatible(datamodule, run, data_cfg)
    loader = datamodule.eval_dataloader(cfg.split)
    total = len(loader.dataset)
    class_conditional = run.module.class_conditional
    if class_conditional and datamodule.num_classes is None:
        raise UserError(f"the model is class-conditional but data={data_cfg.name} has no labels; score a labelled "
                        "dataset (the likelihood marginalised over classes is not implemented)")

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"{data_cfg.name}/{cfg.split}", total=total)
        score = evaluate_split(run.model, run.module.dequantizer, loader, class_conditional, num_samples, seed,
                               device, on_batch=lambda n: progress.advance(task, n), precision=precision)

    result = {
        "checkpoint": str(run.ckpt),
        "weights": "ema" if run.uses_ema else "raw",
        "data": data_cfg.name,
        "split": cfg.split,
        "dequantization": _dequantization_name(run),
        "seed": seed,
        "batch_size": loader.batch_size,
        "device": str(device),
        "precision": precision,
        **score.summary(),
    }
    output = Path(cfg.output) if cfg.get("output") else run.ckpt.with_name(
        f"{run.ckpt.stem}.eval-{data_cfg.name}-{cfg.split}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result, score, Console())
    print(f"wrote {output}", flush=True)
    return result


def _run_eval(run: RestoredRun, key: str, default):
    return OmegaConf.select(run.cfg, f"evaluation.{key}", default=default)


def _data_config(cfg: DictConfig, run: RestoredRun) -> DictConfig:
    """The run's own data config, or the one chosen with ``data=...`` (scoring other data)."""
    data_cfg = cfg.get("data") or run.cfg.data
    data_cfg = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))
    if cfg.get("batch_size") is not None:
        data_cfg.eval_batch_size = cfg.batch_size
    return data_cfg


def _check_compatible(datamodule, run: RestoredRun, data_cfg: DictConfig) -> None:
    """A model scores only images of its own shape and number of levels."""
    model_shape = tuple(run.module.model.input_shape)
    if tuple(datamodule.input_shape) != model_shape:
        raise UserError(f"data={data_cfg.name} gives images of shape {tuple(datamodule.input_shape)} but the model "
                        f"takes {model_shape}; set data.image_size / data.channels to match")
    if datamodule.num_levels != run.module.num_levels:
        raise UserError(f"data={data_cfg.name} has {datamodule.num_levels} levels per pixel but the model was trained "
                        f"on {run.module.num_levels}; set data.n_bits to match")


def _dequantization_name(run: RestoredRun) -> str:
    return type(run.module.dequantizer).__name__.removesuffix("Dequantization").lower()


def _print_table(result: dict, score: SplitScore, console: Console) -> None:
    table = Table(title=f"{result['data']}/{result['split']}: {score.num_images} images, "
                        f"{result['dequantization']} dequantization, {score.num_samples} draw(s) per image")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("bpd (ELBO)", f"{score.bpd:.4f}")
    if score.num_samples > 1 or result["dequantization"] != "uniform":
        table.add_row(f"bpd (importance-weighted, K={score.num_samples})", f"{score.bpd_iw:.4f}")
    table.add_row("nll (nats / image)", f"{score.nll_nats:.2f}")
    table.add_row("max |decode(encode(y)) - y|", f"{score.recon_error:.3g}")
    table.add_row("images / s", f"{score.images_per_sec:.1f}")
    console.print(table)
    if not math.isfinite(score.bpd):
        console.print("[red]the bound is not finite: the checkpoint holds NaN/Inf weights or the data is off[/red]")

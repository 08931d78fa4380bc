"""``python evaluate.py ckpt_path=... split=test``: exact bpd of a trained flow over a whole split.

Besides the JSON summary it writes one CSV row per image (bpd, and typicality: the distance of the
image's bpd from the typical bpd of the model's own held-out data, see flowgen.ood), the input of
``scripts/ood_histogram.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from flowgen.build import RestoredRun, instantiate_data, resolve_device, restore_run
from flowgen.checks import validated
from flowgen.cli.errors import UserError, one_line
from flowgen.cli.typical_set import TypicalSet, typical_set
from flowgen.evaluation import SplitScore, autocast_context, evaluate_split
from flowgen.ood import batch_test, typicality, write_scores
from flowgen.sample_quality import (
    SAMPLE_METRICS,
    SampleQuality,
    generated_images,
    inception_cache_path,
    inception_network,
    measure,
    real_images,
)
from flowgen.sampling import check_sampling_options


def evaluate(cfg: DictConfig) -> dict:
    """Score the checkpoint on ``split`` of the run's data (or of ``data=...``); print a table, write JSON and CSV."""
    cfg = validated(cfg)  # types and ranges: flowgen/config/tool_schemas.py EvaluateConfig
    metrics = list(dict.fromkeys(cfg.metrics))  # each once, in the order given
    scores_bpd = "bpd" in metrics
    typicality_cfg = cfg.typicality if scores_bpd and cfg.typicality.get("split") is not None else None
    if cfg.get("output") and Path(cfg.output).expanduser().is_dir():
        raise UserError(f"output={cfg.output} is a directory; give the path of the JSON file to write")
    device = resolve_device(cfg.device)
    # FID/KID: the Inception weights first, so that offline without them one line comes before anything long
    feature = inception_network(cfg.fid.weights) if set(metrics) & set(SAMPLE_METRICS) else None
    run = restore_run(cfg.ckpt_path, use_ema=cfg.use_ema, device=device, which=cfg.which)
    print(run.describe(device), flush=True)
    if feature is not None:
        check_sampling_options(run.model, _sampling_options(cfg.fid))
    num_samples = cfg.num_samples if cfg.num_samples is not None else _run_eval(run, "num_samples", 1)
    seed = cfg.seed if cfg.seed is not None else _run_eval(run, "seed", 0)

    precision = str(cfg.get("precision") or "32-true")
    try:  # the same checks evaluate_split makes, before any data is loaded
        autocast_context(device, precision)
    except ValueError as exc:
        raise UserError(str(exc)) from exc

    data_cfg = _data_config(cfg.get("data") or run.cfg.data, cfg.get("batch_size"))
    output = Path(cfg.output) if cfg.get("output") else run.ckpt.with_name(
        f"{run.ckpt.stem}.eval-{data_cfg.name}-{cfg.split}.json")
    csv_output = _csv_path(cfg.get("csv"), output) if scores_bpd else None  # the CSV holds per-image bpd
    datamodule = instantiate_data(data_cfg)
    _check_compatible(datamodule, run, data_cfg)
    loader = datamodule.eval_dataloader(cfg.split)
    class_conditional = run.module.class_conditional
    if scores_bpd and class_conditional and datamodule.num_classes is None:
        raise UserError(f"the model is class-conditional but data={data_cfg.name} has no labels; score a labelled "
                        "dataset (the likelihood marginalised over classes is not implemented)")

    console = Console(stderr=True)

    def score_loader(description: str, batches) -> SplitScore:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(description, total=len(batches.dataset))
            return evaluate_split(run.model, run.module.dequantizer, batches, class_conditional, num_samples, seed,
                                  device, on_batch=lambda n: progress.advance(task, n), precision=precision)

    typical = None
    if typicality_cfg is not None:  # first: a run whose own data is missing fails before the long part
        typical = typical_set(
            run, typicality_cfg.split, typicality_cfg.max_images, num_samples=num_samples, seed=seed,
            precision=precision, score=score_loader,
            make_datamodule=lambda: _own_data(run, cfg.get("batch_size")))
    score = score_loader(f"{data_cfg.name}/{cfg.split}", loader) if scores_bpd else None
    quality = None if feature is None else _sample_quality(cfg, run, datamodule, feature, metrics, device, console)

    result = {
        "checkpoint": str(run.ckpt),
        "weights": run.weights,
        "data": data_cfg.name,
        "split": cfg.split,
        "dequantization": _dequantization_name(run),
        "seed": seed,
        "batch_size": loader.batch_size,
        "device": str(device),
        "precision": precision,
        "metrics": metrics,
        **(score.summary() if score is not None else {}),
        **(quality or {}),
    }
    if typical is not None:
        result["typicality"] = _typicality_summary(score, typical, typicality_cfg, seed)
    if csv_output is not None:
        write_scores(csv_output, _per_image_columns(score, typical, _shows_iw(result), datamodule.num_classes,
                                                    datamodule.file_names(cfg.split)))
        result["csv"] = str(csv_output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result, score, Console())
    if typical is not None:
        print(f"typical set {'read from' if typical.cached else 'computed, cached in'} {typical.path}", flush=True)
    print(f"wrote {output}", flush=True)
    if csv_output is not None:
        print(f"wrote {csv_output}", flush=True)
    return result


def _sampling_options(options: DictConfig) -> dict:
    """The ``fid.sampling.*`` options that were given (null ones keep the model's own settings)."""
    return {key: value for key, value in OmegaConf.to_container(options.sampling).items() if value is not None}


def _sample_quality(cfg: DictConfig, run: RestoredRun, datamodule, feature, metrics: list[str], device,
                    console: Console) -> dict:
    """FID / KID of ``fid.num_samples`` samples against the split's images (flowgen/sample_quality.py):
    the values, and under ``sample_quality`` what they were measured on."""
    options = cfg.fid
    num_levels = run.module.num_levels
    quality = SampleQuality(feature, [m for m in metrics if m in SAMPLE_METRICS], options.kid_subsets,
                            options.kid_subset_size, device)
    dataset = datamodule.eval_dataset(cfg.split)
    num_real = len(dataset) if options.max_real is None else min(options.max_real, len(dataset))
    real = real_images(dataset, num_levels, options.max_real, options.batch_size, options.seed)
    generated = generated_images(run.model, num_levels, options.num_samples, options.temperature, options.batch_size,
                                 options.seed, device, _sampling_options(options))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"FID/KID: {num_real} {cfg.split} images, {options.num_samples} samples",
                                 total=num_real + options.num_samples)
        measured = measure(quality, generated, real, options.seed, on_batch=lambda n: progress.advance(task, n))
    values = {key: measured[key] for key in ("fid", "kid", "kid_std") if key in measured}
    return {**values, "sample_quality": {
        "num_real": measured["num_real"], "num_generated": measured["num_generated"],
        "temperature": options.temperature, "sampling": _sampling_options(options), "seed": options.seed,
        **({"kid_subsets": options.kid_subsets, "kid_subset_size": measured["kid_subset_size"]}
           if "kid" in measured else {}),
        "features": "Inception v3 pool3 (torch-fidelity), images resized to 299 x 299",
        "inception_weights": str(Path(options.weights).expanduser() if options.weights else inception_cache_path()),
        "seconds": measured["seconds"],
    }}


def _run_eval(run: RestoredRun, key: str, default):
    return OmegaConf.select(run.cfg, f"evaluation.{key}", default=default)


def _data_config(data_cfg: DictConfig, batch_size: int | None) -> DictConfig:
    """A resolved copy of ``data_cfg`` (the run's own, or the one chosen with ``data=...``) at ``batch_size``."""
    data_cfg = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))
    if batch_size is not None:
        data_cfg.eval_batch_size = batch_size
    return data_cfg


def _own_data(run: RestoredRun, batch_size: int | None):
    """The data module the run was trained on, for the typical set; a missing dataset says what needs it."""
    try:
        return instantiate_data(_data_config(run.cfg.data, batch_size))
    except FileNotFoundError as exc:
        raise UserError(f"typicality needs the run's own data ({run.cfg.data.name}): {one_line(exc)}; or pass "
                        "typicality.split=null") from exc


def _csv_path(option, output: Path) -> Path | None:
    """``csv``: true = beside the JSON (same name, .csv), a path, or false/null for none."""
    if option is None or option is False:
        return None
    if option is True:
        return output.with_suffix(".csv")
    path = Path(option).expanduser()
    if path.resolve() == output.resolve():
        raise UserError(f"csv={option} is the JSON output's path too; give the CSV another name")
    if path.is_dir():
        raise UserError(f"csv={option} is a directory; give the path of the CSV file to write")
    return path


def _shows_iw(result: dict) -> bool:
    """The importance-weighted bound differs from the ELBO only with several draws or variational noise."""
    return result["num_samples"] > 1 or result["dequantization"] != "uniform"


def _typicality_summary(score: SplitScore, typical: TypicalSet, options: DictConfig, seed: int) -> dict:
    sizes = options.get("batch_sizes") or []
    tests = [batch_test(score.per_image_bpd, typical.bpd, m, options.fpr, seed) for m in sizes]
    return {
        "split": typical.split,
        "num_images": len(typical.bpd),
        "typical_bpd": typical.typical_bpd,
        "mean_typicality": typicality(score.per_image_bpd, typical.typical_bpd).mean().item(),
        "fpr": options.fpr,
        "batch_tests": [t.summary() for t in tests],
        "cache": str(typical.path),
    }


def _per_image_columns(score: SplitScore, typical: TypicalSet | None, shows_iw: bool,
                       num_classes: int | None, files: list[str] | None) -> dict:
    """CSV columns in dataset order (the evaluation loader reads the split in order, once); ``file``
    names each image's file when the data is a folder of images."""
    columns = {"index": torch.arange(score.num_images)}
    if files is not None:
        columns["file"] = files
    if num_classes is not None:
        columns["label"] = score.labels
    columns["bpd"] = score.per_image_bpd
    if score.per_image_bpd_std_error is not None:
        columns["bpd_std_error"] = score.per_image_bpd_std_error
    if shows_iw:
        columns["bpd_iw"] = score.per_image_bpd_iw
    if typical is not None:
        columns["typicality"] = typicality(score.per_image_bpd, typical.typical_bpd)
    return columns


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


def _print_table(result: dict, score: SplitScore | None, console: Console) -> None:
    title = f"{result['data']}/{result['split']}"
    if score is not None:
        title += (f": {score.num_images} images, {result['dequantization']} dequantization, "
                  f"{score.num_samples} draw(s) per image")
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    if score is not None:
        table.add_row("bpd (ELBO)", f"{score.bpd:.4f}")
        if score.per_image_bpd_std_error is not None:  # an estimated log p (a CNF's Hutchinson trace)
            table.add_row("± standard error of the log p estimator", f"{score.bpd_std_error:.4f}")
        if score.nfe is not None:
            table.add_row("function evaluations per solve (NFE)", f"{score.nfe:.1f}")
        if _shows_iw(result):
            table.add_row(f"bpd (importance-weighted, K={score.num_samples})", f"{score.bpd_iw:.4f}")
        table.add_row("nll (nats / image)", f"{score.nll_nats:.2f}")
        table.add_row("max |decode(encode(y)) - y|", f"{score.recon_error:.3g}")
        table.add_row("images / s", f"{score.images_per_sec:.1f}")
    if "sample_quality" in result:
        q = result["sample_quality"]
        against = f"{q['num_generated']} samples at T={q['temperature']:g} vs {q['num_real']} images"
        if "fid" in result:
            table.add_row(f"FID ({against})", f"{result['fid']:.3f}")
        if "kid" in result:
            table.add_row(f"KID ({q['kid_subsets']} subsets of {q['kid_subset_size']})",
                          f"{result['kid']:.5f} ± {result['kid_std']:.5f}")
    if "typicality" in result:
        t = result["typicality"]
        table.add_row(f"typical bpd H ({t['split']}, {t['num_images']} images)", f"{t['typical_bpd']:.4f}")
        table.add_row("mean typicality |bpd - H|", f"{t['mean_typicality']:.4f}")
        for test in t["batch_tests"]:
            flagged = "n/a" if test["flagged"] is None else f"{test['flagged']:.1%} of {test['num_batches']}"
            table.add_row(f"atypical batches of M={test['batch_size']} (ε={test['threshold']:.4f}, "
                          f"fpr={t['fpr']:g})", flagged)
    console.print(table)
    if score is not None and not math.isfinite(score.bpd):
        console.print("[red]the bound is not finite: the checkpoint holds NaN/Inf weights or the data is off[/red]")

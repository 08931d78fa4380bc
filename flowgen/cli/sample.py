"""``python sample.py ckpt_path=<run dir or .ckpt>``: sample grids, interpolations and reconstructions."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from flowgen.build import RestoredRun, instantiate_data, resolve_device, restore_run
from flowgen.checks import validated
from flowgen.cli.errors import UserError
from flowgen.latents import interpolate, reconstruct
from flowgen.likelihood import to_unit_interval
from flowgen.sampling import image_grid, temperature_rows


def sample(cfg: DictConfig) -> list[Path]:
    """Run the configured mode; returns (and prints) the paths written."""
    cfg = validated(cfg)  # types and ranges: flowgen/config/tool_schemas.py SampleConfig
    given_dir = Path(cfg.output_dir).expanduser() if cfg.get("output_dir") else None
    if given_dir is not None and given_dir.exists() and not given_dir.is_dir():
        raise UserError(f"output_dir={cfg.output_dir} is a file; give a directory (it is created when missing)")
    device = resolve_device(cfg.device)
    run = restore_run(cfg.ckpt_path, use_ema=cfg.use_ema, device=device, which=cfg.which)
    out_dir = given_dir or run.run_dir / "generated"
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file on the way, no permission
        raise UserError(f"output_dir={out_dir} cannot be created ({exc.strerror}); give a directory you can "
                        "write to") from None
    torch.manual_seed(cfg.seed)
    print(run.describe(device), flush=True)
    make = {"sample": _sample_grids, "interpolate": _interpolation, "reconstruct": _reconstruction}[cfg.mode]
    try:
        paths = make(cfg, run, out_dir, device)
    except BaseException:
        if created:  # a mistake found on the way (e.g. an image index) leaves no empty directory
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    for path in paths:
        print(f"wrote {path}", flush=True)
    return paths


def _labels(cfg: DictConfig, run: RestoredRun, device) -> tuple[list[tuple[str, torch.Tensor | None]], int | None]:
    """[(file tag, labels of one row)] for the grids, and the number of classes."""
    num_classes = run.model.num_classes
    label = cfg.get("label")
    if num_classes is None:
        if label is not None:
            raise UserError(f"label={label}: this model is not class-conditional (model.num_classes was not set)")
        return [("", None)], None
    if label is None:  # every row shows every class, column j from class j mod C
        return [("", torch.arange(cfg.n, device=device) % num_classes)], num_classes
    if label == "all":
        return [(f"_class{c}", torch.full((cfg.n,), c, device=device)) for c in range(num_classes)], num_classes
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_classes:
        raise UserError(f"label={label!r} is outside the model's classes 0..{num_classes - 1} (or use label=all)")
    return [(f"_class{label}", torch.full((cfg.n,), label, device=device))], num_classes


def _sample_grids(cfg: DictConfig, run: RestoredRun, out_dir: Path, device) -> list[Path]:
    """One grid per label choice: rows = temperatures (same noise per row), n columns."""
    temperatures = [float(t) for t in cfg.temperatures]
    tag_t = "-".join(f"{t:g}" for t in temperatures)
    paths = []
    for tag, labels in _labels(cfg, run, device)[0]:
        images = temperature_rows(run.model, run.module.num_levels, cfg.n, temperatures, labels, cfg.seed, device,
                                  _sampling_options(cfg))
        path = out_dir / f"samples_seed{cfg.seed}_T{tag_t}{tag}.png"
        save_image(image_grid(images, cfg.n, cfg.upscale), path)
        paths.append(path)
        if cfg.save_individual:
            folder = path.with_suffix("")
            folder.mkdir(exist_ok=True)
            for i, image in enumerate(images.cpu()):
                save_image(image, folder / f"T{temperatures[i // cfg.n]:g}_{i % cfg.n:03d}.png")
            paths.append(folder)
    return paths


def _sampling_options(cfg: DictConfig) -> dict:
    """The ``sampling.*`` options that were given (null ones keep the model's own settings)."""
    options = OmegaConf.to_container(cfg.sampling, enum_to_str=True)
    return {key: value for key, value in options.items() if value is not None}


def _images(cfg: DictConfig, run: RestoredRun, device, indices) -> torch.Tensor:
    """Model inputs y of dataset images (the run's data, split ``cfg.split``), dequantized at bin centres."""
    datamodule = instantiate_data(run.cfg.data)
    size = len(datamodule.eval_dataset(cfg.split))
    for i in indices:
        if not isinstance(i, int) or not 0 <= i < size:
            raise UserError(f"image index {i!r} is outside the {cfg.split} split (0..{size - 1})")
    # the bin centre u = 1/2 is the natural deterministic dequantization of an image
    return run.module.dequantizer.bin_centres(datamodule.images(cfg.split, indices).to(device))


def _interpolation(cfg: DictConfig, run: RestoredRun, out_dir: Path, device) -> list[Path]:
    indices = list(cfg.indices)
    if len(indices) != 2:
        raise UserError(f"indices={indices}: interpolate needs exactly two image indices, e.g. indices=[0,1]")
    y = _images(cfg, run, device, indices)
    path_images = interpolate(run.model, y[0], y[1], cfg.steps, cfg.interpolation)
    pixels = to_unit_interval(path_images, run.module.num_levels)
    path = out_dir / f"interpolate_{cfg.interpolation}_{cfg.split}{indices[0]}-{indices[1]}_steps{cfg.steps}.png"
    save_image(image_grid(pixels, cfg.steps, cfg.upscale), path)
    return [path]


def _reconstruction(cfg: DictConfig, run: RestoredRun, out_dir: Path, device) -> list[Path]:
    """Top row the images, bottom row decode(encode(image)); prints max |difference|."""
    indices = list(range(cfg.num_images))
    y = _images(cfg, run, device, indices)
    y_rec = reconstruct(run.model, y)
    error = float((y_rec - y).abs().max())
    print(f"reconstruction max|decode(encode(y)) - y| = {error:.3g} over {len(indices)} {cfg.split} images", flush=True)
    num_levels = run.module.num_levels
    pixels = torch.cat([to_unit_interval(y, num_levels), to_unit_interval(y_rec, num_levels)])
    path = out_dir / f"reconstruct_{cfg.split}_n{cfg.num_images}.png"
    save_image(image_grid(pixels, cfg.num_images, cfg.upscale), path)
    return [path]

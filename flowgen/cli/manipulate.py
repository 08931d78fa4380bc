"""``python scripts/manipulate.py ckpt_path=<run> attribute=<class or CelebA attribute> image=<index>``.

Edits one image along the mean latent difference between two labelled groups of the run's data
(flowgen/attributes.py has the equations) and writes the strip decode(z(x) + α d), one column
per α.  The direction is cached beside the strip, keyed by everything it depends on, so a second
strip with other images or alphas does not encode the split again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2
from torchvision.utils import save_image

from flowgen.attributes import (
    EmptyGroupError,
    binary_attribute_groups,
    class_groups,
    direction_norm,
    manipulate,
    mean_latent_difference,
)
from flowgen.build import RestoredRun, instantiate_data, resolve_device, restore_run
from flowgen.checks import validated
from flowgen.cli.errors import UserError
from flowgen.data.quantize import pixels_to_levels
from flowgen.data.splits import WithIndex
from flowgen.data.transforms import ToUint8Image, resize_then_crop
from flowgen.likelihood import to_unit_interval
from flowgen.sampling import image_grid


@dataclass
class Groups:
    """The two groups an attribute splits a dataset into, and how to tell an image's group."""

    tag: str  # in file names: class3, class3-vs-class5, Smiling
    positive: str  # for people: "class 3", "Smiling"
    negative: str  # "the other classes", "class 5", "not Smiling"
    assign: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (labels, split indices) -> memberships


def edit_attribute(cfg: DictConfig) -> list[Path]:
    """Write the strip of ``cfg.image`` moved along ``cfg.attribute``; returns (and prints) its path."""
    cfg = validated(cfg)  # types and ranges: flowgen/config/tool_schemas.py ManipulateConfig
    if cfg.get("attribute") is None:
        raise UserError("attribute is required: a class (e.g. attribute=3) or a CelebA attribute (attribute=Smiling)")
    given_dir = Path(cfg.output_dir).expanduser() if cfg.get("output_dir") else None
    if given_dir is not None and given_dir.exists() and not given_dir.is_dir():
        raise UserError(f"output_dir={cfg.output_dir} is a file; give a directory (it is created when missing)")
    device = resolve_device(cfg.device)
    run = restore_run(cfg.ckpt_path, use_ema=cfg.use_ema, device=device, which=cfg.which)
    datamodule = instantiate_data(run.cfg.data)
    dataset = datamodule.eval_dataset(cfg.split)
    groups = attribute_groups(datamodule, cfg.split, cfg.attribute, cfg.get("versus"))
    # the image is checked before the (long) encoding of the split
    levels, image_tag = _image(cfg.image, datamodule, cfg.split)
    out_dir = given_dir or run.run_dir / "generated"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file on the way, no permission
        raise UserError(f"output_dir={out_dir} cannot be created ({exc.strerror}); give a directory you can "
                        "write to") from None
    print(run.describe(device), flush=True)

    num_images = len(dataset) if cfg.num_images is None else min(cfg.num_images, len(dataset))
    direction, counts = _cached_direction(cfg, run, dataset, groups, num_images, out_dir, device)
    print(f"direction d = mean z({groups.positive}, {counts[0]} images) - mean z({groups.negative}, {counts[1]} "
          f"images) over the first {num_images} {cfg.split} images: |d| = {direction_norm(direction):.4g}", flush=True)

    alphas = [float(a) for a in cfg.alphas]
    y = run.module.dequantizer.bin_centres(levels.unsqueeze(0).to(device))[0]  # u = 1/2: the image itself
    pixels = to_unit_interval(manipulate(run.model, y, direction, alphas), run.module.num_levels)
    path = out_dir / f"manipulate_{groups.tag}_{image_tag}_alpha{'_'.join(f'{a:g}' for a in alphas)}.png"
    save_image(image_grid(pixels, len(alphas), cfg.upscale), path)
    print(f"wrote {path}", flush=True)
    return [path]


def attribute_groups(datamodule, split: str, attribute, versus=None) -> Groups:
    """The groups ``attribute`` names in the data: a CelebA attribute's 1 vs -1, or class ``attribute``
    vs class ``versus`` (all other classes when ``versus`` is None)."""
    name = datamodule.name
    table = attribute_table(datamodule.eval_dataset(split))
    if table is not None:
        names, values = table
        if versus is not None:
            raise UserError(f"versus={versus!r} compares two classes; a {name} attribute compares images with it (1) "
                            "and without it (-1): leave versus unset")
        if attribute not in names:
            raise UserError(f"attribute={attribute!r} is not a {name} attribute; choose one of {', '.join(names)}")
        column = values[:, names.index(attribute)]
        return Groups(str(attribute), str(attribute), f"not {attribute}",
                      lambda labels, indices: binary_attribute_groups(column[indices]))
    num_classes = datamodule.num_classes
    if not num_classes:
        raise UserError(f"data={name} has no labels: attribute editing needs class labels (e.g. digits, cifar10, "
                        "data=folder with one subfolder per class) or CelebA's attributes")

    def is_class(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < num_classes

    if not is_class(attribute):
        raise UserError(f"attribute={attribute!r}: data={name} is labelled by class; give a class 0..{num_classes - 1}")
    if versus is None:
        return Groups(f"class{attribute}", f"class {attribute}", "the other classes",
                      lambda labels, indices: class_groups(labels, attribute))
    if not is_class(versus) or versus == attribute:
        raise UserError(f"versus={versus!r} must be a class 0..{num_classes - 1} other than attribute={attribute} "
                        "(or unset: all the other classes)")
    return Groups(f"class{attribute}-vs-class{versus}", f"class {attribute}", f"class {versus}",
                  lambda labels, indices: class_groups(labels, attribute, versus))


def attribute_table(dataset: Dataset) -> tuple[list[str], torch.Tensor] | None:
    """(names, values (N, A)) of a split whose source carries named binary attributes (torchvision's
    CelebA: ``attr_names`` and ``attr`` in {0, 1}), else None. Row i belongs to the split's image i."""
    source = getattr(dataset, "source", None)  # LevelImages -> the raw split it transforms
    names = getattr(source, "attr_names", None)
    if not names:
        return None
    # the header line of list_attr_celeba.txt may end in a space, read as one empty name at the end
    return [n for n in names if n], torch.as_tensor(source.attr)


def _image(image, datamodule, split: str) -> tuple[torch.Tensor, str]:
    """The integer levels (C, H, W) of ``image`` and a tag for the file name.

    ``image`` is an index in the split, or an image file: brought to the data's channels and size as
    data=folder brings any image (shorter side resized, centre crop), then its 8-bit pixels p to the K
    levels as the data pipeline does (``flowgen.data.quantize.pixels_to_levels``, floor(p K / 256); digits' 17
    levels too).
    """
    dataset = datamodule.eval_dataset(split)
    if isinstance(image, int) and not isinstance(image, bool):
        if not 0 <= image < len(dataset):
            raise UserError(f"image={image} is outside the {split} split (0..{len(dataset) - 1})")
        return torch.as_tensor(dataset[image][0]), f"{split}{image}"
    path = Path(str(image)).expanduser()
    if not path.is_file():
        raise UserError(f"image={image!r} is neither an index in the {split} split nor an image file")
    try:
        with Image.open(path) as opened:
            opened.load()
            pixels = v2.Compose([ToUint8Image(datamodule.channels), *resize_then_crop(datamodule.image_size)])(opened)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's decoders raise all three
        raise UserError(f"image={image}: cannot be read as an image ({type(exc).__name__}: {exc})") from None
    return pixels_to_levels(pixels, datamodule.num_levels), path.stem


def _cached_direction(cfg: DictConfig, run: RestoredRun, dataset: Dataset, groups: Groups, num_images: int,
                      out_dir: Path, device) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """d from ``<out_dir>/directions/`` when it was computed for exactly this checkpoint file, weights, groups,
    split and number of images; else computed over the first ``num_images`` images and saved there."""
    key = {**run.cache_key(), "groups": groups.tag, "split": cfg.split, "num_images": num_images}
    path = out_dir / "directions" / f"{groups.tag}_{cfg.split}_n{num_images}_{run.weights}_{run.ckpt.stem}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable cache is recomputed, never fatal
            cached = None
        if cached is not None and cached.get("key") == key:
            print(f"direction from {path}", flush=True)
            return [d.to(device) for d in cached["direction"]], tuple(cached["counts"])

    def batches():
        loader = DataLoader(WithIndex(Subset(dataset, range(num_images))), batch_size=cfg.batch_size,
                            num_workers=run.cfg.data.get("num_workers", 0))
        for levels, labels, indices in loader:
            yield run.module.dequantizer.bin_centres(levels.to(device)), groups.assign(labels, indices)

    try:
        direction, counts = mean_latent_difference(run.model, batches())
    except EmptyGroupError as exc:
        empty = groups.positive if exc.counts[0] == 0 else groups.negative
        raise UserError(f"no image of {empty} among the first {num_images} {cfg.split} images "
                        f"({exc.counts[0]} of {groups.positive}, {exc.counts[1]} of {groups.negative}); "
                        "raise num_images or choose another split or attribute") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, "direction": [d.cpu() for d in direction], "counts": list(counts)}, tmp)
    tmp.replace(path)  # a killed run leaves no half-written cache behind
    print(f"direction saved to {path}", flush=True)
    return direction, counts

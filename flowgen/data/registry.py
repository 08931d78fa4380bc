"""The datasets flowgen trains on: one record per dataset, and the one rule for its number of pixel levels K.

Every dataset-specific fact lives in its record here: the stored images' channels and size, K when the
dataset fixes it, its classes, how its files are checked or fetched (``prepare``, rank 0 only) and how its
three splits are read (``load``). The data module, the restore path (``flowgen.build``), the config schema
and the tools read these records; no other module tests a dataset's name.

K (``num_levels``) is a dataset's own count when it stores levels rather than 8-bit pixels (the 8x8
digits: 17 levels 0..16), else 2**n_bits, the levels left of 8-bit pixels keeping their top ``n_bits``
bits (``flowgen.data.quantize``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flowgen.data import digits, folder, imagenet_chrabaszcz, imagenet_oord, torchvision_sets
from flowgen.data.splits import RawSplits
from flowgen.errors import InvalidValueError


@dataclass(frozen=True)
class DatasetRecord:
    """What flowgen knows about one dataset before reading any of its files."""

    name: str
    channels: int  # of the stored images
    stored_size: tuple[int, int] | None  # (height, width) of the stored images; None: any (folder)
    num_classes: int | None  # labels 0..n-1; None: no labels, or (folder) the class directories found
    # (root, path, image_size=, val_size=, split_seed=) -> the three raw splits
    load: Callable[..., RawSplits]
    # (root, download) -> None: fetch missing files when allowed, else fail naming them (rank 0 only)
    prepare: Callable[[Path, bool], None]
    train_images: int | None = None  # images in the official training split; None: whatever the folder holds
    held_out_splits: int = 1  # splits held out of train (val; folder: val and test; 0 with an official val)
    fixed_num_levels: int | None = None  # K when the dataset stores levels (digits: 17), else 2**n_bits
    needs_path: bool = False  # data.path names the images (folder)


def _torchvision(name: str) -> DatasetRecord:
    spec = torchvision_sets.SETS[name]
    return DatasetRecord(
        name=name, channels=spec.channels, stored_size=spec.stored_size, num_classes=spec.num_classes,
        train_images=spec.train_images, held_out_splits=0 if spec.official_val else 1,
        load=lambda root, path, **split: torchvision_sets.load(name, root, **split),
        prepare=lambda root, download: torchvision_sets.prepare(name, root, download=download))


def _imagenet(size: int, release) -> DatasetRecord:
    chrabaszcz = release is imagenet_chrabaszcz
    return DatasetRecord(
        name=f"imagenet{size}_chrabaszcz" if chrabaszcz else f"imagenet{size}", channels=3, stored_size=(size, size),
        num_classes=imagenet_chrabaszcz.NUM_CLASSES if chrabaszcz else None,
        train_images=imagenet_chrabaszcz.TRAIN_IMAGES if chrabaszcz else imagenet_oord.TRAIN_IMAGES,
        load=lambda root, path, **split: release.load(root, size=size, **split),
        prepare=lambda root, download: _check_only(release.check_files, root, size))


def _check_only(check_files, root: Path, size: int) -> None:
    """No download (image-net.org needs a login): the release's files are there, or one line names them."""
    check_files(root, size)


def _no_files(root: Path, download: bool) -> None:
    """Nothing to fetch: the images come with a package (digits) or from data.path, read by ``load``."""


DATASETS: dict[str, DatasetRecord] = {
    **{name: _torchvision(name) for name in torchvision_sets.SETS},
    # van den Oord et al. (2016): the version of the flow papers' likelihood tables
    "imagenet32": _imagenet(32, imagenet_oord),
    "imagenet64": _imagenet(64, imagenet_oord),
    # Chrabaszcz et al. (2017): the box-resized npz release with labels; other bpd
    "imagenet32_chrabaszcz": _imagenet(32, imagenet_chrabaszcz),
    "imagenet64_chrabaszcz": _imagenet(64, imagenet_chrabaszcz),
    "folder": DatasetRecord(
        name="folder", channels=3, stored_size=None, num_classes=None, needs_path=True, held_out_splits=2,
        load=lambda root, path, **split: folder.load(path, **split), prepare=_no_files),
    "digits": DatasetRecord(
        name="digits", channels=1, stored_size=(digits.NATIVE_SIZE, digits.NATIVE_SIZE), num_classes=digits.NUM_CLASSES,
        train_images=digits.NUM_IMAGES,
        fixed_num_levels=digits.NUM_LEVELS, load=lambda root, path, **split: digits.load(**split),
        prepare=_no_files),
}


def dataset(name: str) -> DatasetRecord:
    """The record of ``name``, or a one-line error listing the datasets."""
    if name not in DATASETS:
        raise InvalidValueError(f"data.name={name!r} is not a dataset; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def num_levels(name: str, n_bits: int | None) -> int:
    """K, the number of pixel levels of dataset ``name`` read at ``n_bits`` bits: the dataset's own count when
    it fixes one (then ``n_bits`` must be None), else 2**n_bits for n_bits in 1..8."""
    fixed = dataset(name).fixed_num_levels
    if fixed is not None:
        if n_bits is not None:
            raise InvalidValueError(f"data.n_bits={n_bits!r}: {name} has its own {fixed} levels 0..{fixed - 1}; "
                                    "set data.n_bits=null")
        return fixed
    if not isinstance(n_bits, int) or isinstance(n_bits, bool) or not 1 <= n_bits <= 8:
        raise InvalidValueError(f"data.n_bits={n_bits!r} must be an int in 1..8 (8 = full 256 levels)")
    return 2**n_bits

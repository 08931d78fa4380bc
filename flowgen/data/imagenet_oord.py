"""Downsampled ImageNet 32x32 / 64x64 of van den Oord et al. (2016), "Pixel Recurrent Neural Networks".

This is the version the likelihood tables of RealNVP, Glow, Flow++ and the later flow papers report
bits per dimension on (``data=imagenet32`` / ``data=imagenet64``). It is not the box-resized release
of Chrabaszcz et al. (2017) (``data=imagenet32_chrabaszcz``, ``flowgen/data/imagenet_chrabaszcz.py``):
the two downsample differently, so their bpd differ and only this one is comparable with those tables.

Files: the official archives ``train_SxS.tar`` and ``valid_SxS.tar`` (image-net.org/small/download.php),
extracted into ``root/imagenetS``, which gives ``root/imagenetS/train_SxS/*.png`` (1,281,149 images) and
``root/imagenetS/valid_SxS/*.png`` (49,999 images): RGB PNGs of S x S pixels, no class labels. The
official valid set is our TEST split (the one the papers report); our val split is held out of train.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from flowgen.data.errors import corrupt, not_found
from flowgen.data.folder import list_images, read_image
from flowgen.data.splits import IndexedView, RawSplits, held_out_count, holdout
from flowgen.data.transforms import resize_square

TRAIN_IMAGES = 1_281_149  # in train_SxS.tar (valid_SxS.tar: 49,999)


def split_dirs(size: int) -> tuple[str, str]:
    """The train and valid directories the archives of size ``size`` extract to."""
    return f"train_{size}x{size}", f"valid_{size}x{size}"


class OordImages(Dataset):
    """The PNGs of one split as ``(PIL image, -1)``; an image that is not S x S RGB fails naming its file."""

    def __init__(self, files: list[Path], size: int, name: str) -> None:
        self.files, self.size, self.name = files, size, name

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        img = read_image(self.files[i], self.name)
        if img.size != (self.size, self.size) or img.mode != "RGB":
            raise corrupt(self.name, self.files[i], ValueError(
                f"a {img.mode} image of {img.size[0]}x{img.size[1]} pixels where the release has RGB "
                f"{self.size}x{self.size}"))
        return img, -1


def check_files(root: str | Path, size: int) -> tuple[list[Path], list[Path]]:
    """The train and valid PNG files, or DatasetNotFoundError naming the archives to extract and where."""
    folder = Path(root).expanduser() / f"imagenet{size}"
    train_dir, valid_dir = split_dirs(size)
    found = [list_images(folder / d) if (folder / d).is_dir() else [] for d in (train_dir, valid_dir)]
    missing = [d for d, files in zip((train_dir, valid_dir), found, strict=True) if not files]
    if missing:
        raise not_found(
            f"imagenet{size}", folder.parent, folder.name,
            f"{train_dir}/*.png and {valid_dir}/*.png, extracted there from {train_dir}.tar and {valid_dir}.tar "
            f"of image-net.org/small/download.php (van den Oord et al. 2016); missing {', '.join(missing)}/",
            can_download=False)
    return found[0], found[1]


def load(root: str | Path, *, size: int, image_size: int, val_size: int | float, split_seed: int) -> RawSplits:
    """Train (minus the held-out val) and test (the official valid set) of van den Oord's ImageNet SxS."""
    train_files, test_files = check_files(root, size)
    name = f"imagenet{size}"
    train = OordImages(train_files, size, name)
    keep, held = holdout(len(train), [held_out_count(val_size, len(train))], split_seed)
    return RawSplits(
        train=IndexedView(train, keep),
        val=IndexedView(train, held),
        test=OordImages(test_files, size, name),
        geometry=resize_square(size, image_size),
        num_classes=None,
    )

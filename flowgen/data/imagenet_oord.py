"""Downsampled ImageNet 32x32 / 64x64 of van den Oord et al. (2016), "Pixel Recurrent Neural Networks".

This is the version the likelihood tables of RealNVP, Glow, Flow++ and the later flow papers report
bits per dimension on (``data=imagenet32`` / ``data=imagenet64``). It is not the box-resized release
of Chrabaszcz et al. (2017) (``data=imagenet32_chrabaszcz``, ``flowgen/data/imagenet_chrabaszcz.py``):
the two downsample differently, so their bpd differ and only this one is comparable with those tables.

Files: the official archives ``train_SxS.tar`` and ``valid_SxS.tar`` (image-net.org/small/download.php) in
``root/imagenetS``, read as they are, or extracted there (``root/imagenetS/train_SxS/*.png``, 1,281,149
images, and ``root/imagenetS/valid_SxS/*.png``, 49,999 images; an extracted directory is preferred): RGB
PNGs of S x S pixels, no class labels. The official valid set is our TEST split (the one the papers report);
our val split is held out of train. An archive is indexed once when the split is built (its PNG members, in
name order) and opened once per process when an image is first read.
"""

from __future__ import annotations

import io
import tarfile
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
    """The PNGs of one split as ``(PIL image, -1)``: files of an extracted directory, or members of the split's
    tar archive (``archive``; ``members`` its TarInfo records). An image that is not S x S RGB fails naming it."""

    def __init__(self, files: list[Path], size: int, name: str, archive: Path | None = None,
                 members: list[tarfile.TarInfo] | None = None) -> None:
        self.files, self.size, self.name = files, size, name
        self.archive, self.members = archive, members
        self._tar: tarfile.TarFile | None = None  # opened lazily, once per process

    def __getstate__(self) -> dict:
        # worker processes open the archive themselves rather than receive a pickled file handle
        return {**self.__dict__, "_tar": None}

    def __len__(self) -> int:
        return len(self.members) if self.archive is not None else len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        if self.archive is None:
            where, img = self.files[i], read_image(self.files[i], self.name)
        else:
            if self._tar is None:
                self._tar = tarfile.open(self.archive)
            member = self.members[i]
            where = f"{self.archive}:{member.name}"
            try:
                img = Image.open(io.BytesIO(self._tar.extractfile(member).read()))
                img.load()
            except (OSError, SyntaxError, ValueError, tarfile.TarError) as exc:
                raise corrupt(self.name, where, exc) from exc
        if img.size != (self.size, self.size) or img.mode != "RGB":
            raise corrupt(self.name, where, ValueError(
                f"a {img.mode} image of {img.size[0]}x{img.size[1]} pixels where the release has RGB "
                f"{self.size}x{self.size}"))
        return img, -1


def _split(folder: Path, split_dir: str, size: int, name: str) -> OordImages | None:
    """One split from its extracted directory, else from its archive; None when neither holds a PNG."""
    if (folder / split_dir).is_dir() and (files := list_images(folder / split_dir)):
        return OordImages(files, size, name)
    archive = folder / f"{split_dir}.tar"
    if not archive.is_file():
        return None
    try:
        with tarfile.open(archive) as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(".png")),
                             key=lambda m: m.name)
    except (OSError, tarfile.TarError) as exc:
        raise corrupt(name, archive, exc) from exc
    return OordImages([], size, name, archive=archive, members=members) if members else None


def check_files(root: str | Path, size: int) -> tuple[OordImages, OordImages]:
    """The train and valid splits, or DatasetNotFoundError naming the archives and where they go."""
    folder = Path(root).expanduser() / f"imagenet{size}"
    name = f"imagenet{size}"
    train_dir, valid_dir = split_dirs(size)
    found = [_split(folder, d, size, name) for d in (train_dir, valid_dir)]
    missing = [d for d, split in zip((train_dir, valid_dir), found, strict=True) if split is None]
    if missing:
        raise not_found(
            name, folder.parent, folder.name,
            f"{train_dir}.tar and {valid_dir}.tar of image-net.org/small/download.php (van den Oord et al. 2016), "
            f"as they are or extracted to {train_dir}/*.png and {valid_dir}/*.png; missing {', '.join(missing)}",
            can_download=False)
    return found[0], found[1]


def load(root: str | Path, *, size: int, image_size: int, val_size: int | float, split_seed: int) -> RawSplits:
    """Train (minus the held-out val) and test (the official valid set) of van den Oord's ImageNet SxS."""
    train, test = check_files(root, size)
    keep, held = holdout(len(train), [held_out_count(val_size, len(train))], split_seed)
    return RawSplits(
        train=IndexedView(train, keep),
        val=IndexedView(train, held),
        test=test,
        geometry=resize_square(size, image_size),
        num_classes=None,
    )

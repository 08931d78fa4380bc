"""Any directory of images (``data=folder data.path=...``), searched recursively.

Layouts understood, checked in this order:
  path/train/, path/val/, path/test/   the splits as given; a missing val or test split is
                                       held out of train (``val_size`` images each)
  path/<class>/...                     ImageFolder layout: label = index of the sorted class
                                       directory name (same mapping in every split)
  path/... (images anywhere)           no labels (-1); val and test are each ``val_size``
                                       images held out with ``split_seed``
Images of any size and PIL mode are accepted: the pipeline resizes, centre-crops and
converts them. A file that cannot be decoded fails, when it is read, with its path.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from flowgen.data.errors import DatasetNotFoundError, corrupt
from flowgen.data.splits import IndexedView, LevelImages, RawSplits, held_out_count, holdout
from flowgen.data.transforms import resize_then_crop
from flowgen.errors import InvalidValueError

# torchvision's list plus GIF; matching ignores case (cameras write IMG_0001.JPG).
EXTENSIONS = tuple(sorted(set(IMG_EXTENSIONS) | {".gif"}))
SPLIT_DIRS = ("train", "val", "test")


def read_image(path: str | Path, name: str = "folder") -> Image.Image:
    """Decode one image file fully (so errors surface here, naming the file, not later)."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's decoders raise all three
        raise corrupt(name, path, exc) from exc
    return img


def list_images(directory: Path) -> list[Path]:
    """Every image file under ``directory`` (recursive, symlinks followed), sorted."""
    found = []
    for parent, _, names in os.walk(directory, followlinks=True):
        found += [Path(parent, n) for n in names if has_file_allowed_extension(n, EXTENSIONS)]
    return sorted(found)


class ImageFiles(Dataset):
    """``(PIL image, label)`` for a list of files; label -1 when the layout has no classes."""

    def __init__(self, files: list[Path], labels: list[int]) -> None:
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return read_image(self.files[i]), self.labels[i]


def image_files(split: Dataset) -> list[str] | None:
    """The file each item of a split was read from, in the split's order; None when the split
    does not come from image files (every dataset but ``folder``)."""
    if isinstance(split, LevelImages):
        files = image_files(split.source)
        return None if files is None else files[: len(split)]
    if isinstance(split, IndexedView):
        files = image_files(split.source)
        return None if files is None else [files[int(i)] for i in split.indices]
    if isinstance(split, ImageFiles):
        return [str(f) for f in split.files]
    return None


def class_names(directory: Path) -> list[str] | None:
    """Sorted class directory names if ``directory`` is in ImageFolder layout, else None.

    ImageFolder layout: no image directly in ``directory``, only subdirectories.
    """
    entries = list(os.scandir(directory))
    if any(e.is_file() and has_file_allowed_extension(e.name, EXTENSIONS) for e in entries):
        return None
    # Hidden directories (.ipynb_checkpoints, .cache) are not classes.
    names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    return names or None


def scan_split(directory: Path, classes: list[str] | None) -> ImageFiles:
    """The images of one split directory, labelled by ``classes`` (None: label -1)."""
    files = list_images(directory)
    if classes is None:
        return ImageFiles(files, [-1] * len(files))
    index = {name: i for i, name in enumerate(classes)}
    labels = []
    for file in files:
        parts = file.relative_to(directory).parts
        if len(parts) == 1 or parts[0] not in index:
            raise InvalidValueError(
                f"folder: {file} is not in one of the train split's class directories "
                f"{classes}; give every split the same class directories"
            )
        labels.append(index[parts[0]])
    return ImageFiles(files, labels)


def load(path: str | Path, *, image_size: int, val_size: int | float, split_seed: int) -> RawSplits:
    """Splits of the image directory ``path``; see the module docstring for layouts."""
    root = Path(path).expanduser()
    looked_for = "/".join(e.lstrip(".") for e in EXTENSIONS)
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"folder: {root} is not a directory; set data.path=<a directory of images>"
        )
    given = {s: root / s for s in SPLIT_DIRS if (root / s).is_dir()}
    if "train" not in given:
        given = {"train": root}
    classes = class_names(given["train"])
    splits = {s: scan_split(d, classes) for s, d in given.items()}
    if len(splits["train"]) == 0:
        raise DatasetNotFoundError(
            f"folder: no images ({looked_for}) found under {given['train']}; "
            "set data.path=<a directory of images>"
        )

    # Hold missing splits out of train, each of val_size images, with one permutation.
    missing = [s for s in ("val", "test") if s not in splits]
    if missing:
        train = splits["train"]
        count = held_out_count(val_size, len(train))
        if len(missing) * count >= len(train):
            raise InvalidValueError(
                f"val_size={val_size} holds out {len(missing)} x {count} of the {len(train)} "
                f"images in {root}, leaving none to train on; lower data.val_size"
            )
        keep, *held = holdout(len(train), [count] * len(missing), split_seed)
        splits["train"] = IndexedView(train, keep)
        for split, indices in zip(missing, held, strict=True):
            splits[split] = IndexedView(train, indices)

    return RawSplits(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        geometry=resize_then_crop(image_size),
        num_classes=None if classes is None else len(classes),
    )

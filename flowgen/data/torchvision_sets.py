"""CIFAR-10, MNIST, Fashion-MNIST, SVHN and CelebA, read by torchvision's own classes.

Two things torchvision does that a training run must not depend on, and how we avoid them:

* CIFAR10, SVHN and CelebA re-hash their files with MD5 on every construction (seconds for
  CIFAR, and any re-written copy or test fake is rejected as "not found or corrupted").
  The ``*Files`` subclasses below check PRESENCE instead; MD5 is still verified by
  torchvision's download step, the only place a checksum can tell something new.
* Construction with ``download=True`` reaches for the network whenever a check fails. We
  check presence ourselves first (``check_files``), download only from ``prepare_data``
  and only when files are missing, and turn a failed download into one-line
  ``DatasetNotFoundError``. ``setup`` never downloads.

A file that is present but unreadable fails with ``DatasetCorruptError`` naming that file.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.mnist import read_image_file, read_label_file

from flowgen.data.errors import DatasetCorruptError, corrupt, not_found
from flowgen.data.folder import read_image
from flowgen.data.splits import IndexedView, RawSplits, held_out_count, holdout
from flowgen.data.transforms import crop_then_resize, pad_or_resize, resize_square
from flowgen.errors import one_line


def _present(folder: str | Path, files: list[str]) -> bool:
    return all(os.path.exists(os.path.join(folder, f)) for f in files)


class CIFAR10Files(datasets.CIFAR10):
    """torchvision's CIFAR10 trusting the pickled batches on disk (no MD5; see module doc)."""

    meta = {**datasets.CIFAR10.meta, "md5": None}  # _load_meta then checks presence only

    def __init__(self, root: str | Path, train: bool) -> None:
        try:
            super().__init__(root, train=train, download=False)
        except Exception as exc:  # unpickling garbage raises almost any exception type
            raise corrupt("cifar10", self._first_unreadable(), exc) from exc

    def _check_integrity(self) -> bool:
        files = [name for name, _ in self.train_list + self.test_list]
        return _present(os.path.join(self.root, self.base_folder), files)

    def _first_unreadable(self) -> str:
        """Which file made construction fail (the folder if each file reads on its own)."""
        folder = os.path.join(self.root, self.base_folder)
        batches = self.train_list if self.train else self.test_list
        for name in [name for name, _ in batches] + [self.meta["filename"]]:
            try:
                with open(os.path.join(folder, name), "rb") as f:
                    entry = pickle.load(f, encoding="latin1")
                if name != self.meta["filename"] and np.shape(entry["data"])[1:] != (3072,):
                    return os.path.join(folder, name)
            except Exception:
                return os.path.join(folder, name)
        return folder


class _IdxFiles:
    """Mixin for MNIST-style classes: fixed folder name, unreadable idx files named."""

    name: str  # flowgen's name, for messages
    folder_name: str  # torchvision derives it from the class name, which we change

    @property
    def raw_folder(self) -> str:
        return os.path.join(self.root, self.folder_name, "raw")

    @property
    def processed_folder(self) -> str:
        return os.path.join(self.root, self.folder_name, "processed")

    def _load_data(self):
        prefix = "train" if self.train else "t10k"
        images = self._read(read_image_file, f"{prefix}-images-idx3-ubyte")
        labels = self._read(read_label_file, f"{prefix}-labels-idx1-ubyte")
        if len(images) != len(labels):
            raise corrupt(
                self.name,
                self.raw_folder,
                ValueError(f"{len(images)} {prefix} images but {len(labels)} labels"),
            )
        return images, labels

    def _read(self, reader: Callable, name: str):
        path = os.path.join(self.raw_folder, name)
        try:
            return reader(path)
        except Exception as exc:  # torchvision asserts on bad magic numbers and sizes
            raise corrupt(self.name, path, exc) from exc


class MNISTFiles(_IdxFiles, datasets.MNIST):
    name, folder_name = "mnist", "MNIST"


class FashionMNISTFiles(_IdxFiles, datasets.FashionMNIST):
    name, folder_name = "fashion_mnist", "FashionMNIST"


class SVHNFiles(datasets.SVHN):
    """torchvision's SVHN trusting the .mat file on disk (no MD5; see module doc)."""

    def __init__(self, root: str | Path, split: str) -> None:
        try:
            super().__init__(root, split=split, download=False)
        except Exception as exc:  # scipy.io.loadmat's errors, or a .mat without X / y
            file = os.path.join(root, self.split_list[split][1])
            raise corrupt("svhn", file, exc) from exc

    def _check_integrity(self) -> bool:
        return _present(self.root, [self.filename])


class CelebAFiles(datasets.CelebA):
    """torchvision's CelebA trusting the files on disk, yielding ``(image, None)``.

    No MD5 (see module doc); attributes are parsed by torchvision but not returned (the
    models are unconditional); images are decoded eagerly so a bad JPEG names itself.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        try:
            super().__init__(root, split=split, target_type=[], download=False)
        except DatasetCorruptError:
            raise
        except Exception as exc:  # e.g. annotation files with different numbers of rows
            raise corrupt("celeba", os.path.join(root, self.base_folder), exc) from exc

    def _check_integrity(self) -> bool:
        return _present(os.path.join(self.root, self.base_folder), CELEBA_FILES)

    def _load_csv(self, filename: str, header: int | None = None):
        try:
            return super()._load_csv(filename, header)
        except Exception as exc:
            file = os.path.join(self.root, self.base_folder, filename)
            raise corrupt("celeba", file, exc) from exc

    def __getitem__(self, i: int):
        path = os.path.join(self.root, self.base_folder, "img_align_celeba", self.filename[i])
        return read_image(path, "celeba"), None


CELEBA_FILES = [
    "img_align_celeba/",
    "list_eval_partition.txt",
    "list_attr_celeba.txt",
    "identity_CelebA.txt",
    "list_bbox_celeba.txt",
    "list_landmarks_align_celeba.txt",
]
_IDX_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


@dataclass(frozen=True)
class TorchvisionSet:
    """Where one dataset's files live under ``root`` and how to read and fetch them."""

    folder: str  # relative to root: the directory the files must be in
    files: list[str]  # expected there ("dir/" for a directory)
    open: Callable[[Path, str], Dataset]  # (root, "train" | "val" | "test") -> raw split
    download: Callable[[Path], object]  # torchvision's own class with download=True
    geometry: Callable[[int], list]  # image_size -> transforms from the native size
    channels: int  # of the stored images
    stored_size: tuple[int, int]  # (height, width) of the stored images
    train_images: int  # in the official training split
    num_classes: int | None
    official_val: bool = False  # False: val is held out of train


SETS: dict[str, TorchvisionSet] = {
    "cifar10": TorchvisionSet(
        folder="cifar-10-batches-py",
        files=[f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"],
        open=lambda root, split: CIFAR10Files(root, train=split == "train"),
        download=lambda root: datasets.CIFAR10(root, download=True),
        geometry=lambda size: resize_square(32, size),
        channels=3,
        stored_size=(32, 32),
        train_images=50_000,
        num_classes=10,
    ),
    "mnist": TorchvisionSet(
        folder="MNIST/raw",
        files=_IDX_FILES,
        open=lambda root, split: MNISTFiles(root, train=split == "train"),
        download=lambda root: datasets.MNIST(root, download=True),
        geometry=lambda size: pad_or_resize(28, size),
        channels=1,
        stored_size=(28, 28),
        train_images=60_000,
        num_classes=10,
    ),
    "fashion_mnist": TorchvisionSet(
        folder="FashionMNIST/raw",
        files=_IDX_FILES,
        open=lambda root, split: FashionMNISTFiles(root, train=split == "train"),
        download=lambda root: datasets.FashionMNIST(root, download=True),
        geometry=lambda size: pad_or_resize(28, size),
        channels=1,
        stored_size=(28, 28),
        train_images=60_000,
        num_classes=10,
    ),
    # torchvision's SVHN keeps its .mat files directly in its root: give it root/svhn.
    "svhn": TorchvisionSet(
        folder="svhn",
        files=["train_32x32.mat", "test_32x32.mat"],
        open=lambda root, split: SVHNFiles(root / "svhn", split=split),
        download=lambda root: [
            datasets.SVHN(root / "svhn", split=s, download=True) for s in ("train", "test")
        ],
        geometry=lambda size: resize_square(32, size),
        channels=3,
        stored_size=(32, 32),
        train_images=73_257,
        num_classes=10,
    ),
    # 178x218 aligned faces; the 148x148 centre crop is the RealNVP paper's (Dinh et al. 2017).
    "celeba": TorchvisionSet(
        folder="celeba",
        files=CELEBA_FILES,
        open=lambda root, split: CelebAFiles(root, split="valid" if split == "val" else split),
        download=lambda root: datasets.CelebA(root, split="all", target_type=[], download=True),
        geometry=lambda size: crop_then_resize(148, size),
        channels=3,
        stored_size=(218, 178),
        train_images=162_770,
        num_classes=None,
        official_val=True,
    ),
}


def check_files(name: str, root: str | Path, reason: str | None = None) -> None:
    """Raise DatasetNotFoundError unless every file of ``name`` is under ``root``.

    ``reason``: why the download that should have brought them failed.
    """
    spec = SETS[name]
    root = Path(root).expanduser()
    missing = [f for f in spec.files if not _present(root / spec.folder, [f])]
    if missing:
        expected = ", ".join(spec.files)
        if len(missing) < len(spec.files):
            expected += f"; missing {', '.join(missing)}"
        raise not_found(name, root, spec.folder, expected, can_download=True, reason=reason)


def prepare(name: str, root: str | Path, *, download: bool) -> None:
    """Download ``name`` if its files are missing and ``download`` is set; else just check."""
    root = Path(root).expanduser()
    if _present(root / SETS[name].folder, SETS[name].files) or not download:
        check_files(name, root)
        return
    try:
        SETS[name].download(root)
    except Exception as exc:  # offline: URLError; Google Drive: gdown missing or quota; ...
        # Whatever went wrong, missing files are the user's problem to solve; files that
        # did arrive but do not parse are named by setup(), which reads them next.
        check_files(name, root, reason=one_line(exc, 200))


def load(
    name: str, root: str | Path, *, image_size: int, val_size: int | float, split_seed: int
) -> RawSplits:
    """The official splits of ``name``; val is held out of train unless official."""
    spec = SETS[name]
    root = Path(root).expanduser()
    check_files(name, root)
    train, test = spec.open(root, "train"), spec.open(root, "test")
    if spec.official_val:
        val = spec.open(root, "val")
    else:
        keep, held = holdout(len(train), [held_out_count(val_size, len(train))], split_seed)
        train, val = IndexedView(train, keep), IndexedView(train, held)
    return RawSplits(
        train=train,
        val=val,
        test=test,
        geometry=spec.geometry(image_size),
        num_classes=spec.num_classes,
    )

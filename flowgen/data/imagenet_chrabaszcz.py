"""Downsampled ImageNet 32x32 / 64x64 of Chrabaszcz, Loshchilov and Hutter (2017), "A Downsampled Variant of
ImageNet as an Alternative to the CIFAR datasets" (``data=imagenet32_chrabaszcz`` / ``imagenet64_chrabaszcz``).

This release is box-resized from the full images and carries the 1000 class labels; it is NOT the set the
flow papers' likelihood tables use (van den Oord et al. 2016, ``data=imagenet32``,
``flowgen/data/imagenet_oord.py``): bpd on the two differ, so numbers on this one are comparable only with
results that name it (class-conditional models, for instance).

Files: the official npz release, unzipped into ``root/imagenet32`` (or ``root/imagenet64``), next to van den
Oord's ``train_SxS/`` and ``valid_SxS/`` directories if those are there too:
``train_data_batch_1.npz`` ... ``train_data_batch_10.npz`` and ``val_data.npz``. Each holds
``data``: (N, 3*S*S) uint8, channel-major (all R, then G, then B, each row-major), and
``labels``: 1-based class ids. The official val set is our TEST split (that is what papers
report bpd on); our val split is held out of train.

There is no automatic download (image-net.org requires a login). 1.28M images are 3.9 GB at
32x32 and 15.7 GB at 64x64, so the pixel arrays are memory-mapped straight out of the npz
files instead of being decoded into each worker's memory.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from flowgen.data.errors import corrupt, not_found
from flowgen.data.splits import IndexedView, RawSplits, held_out_count, holdout
from flowgen.data.transforms import resize_square

TRAIN_FILES = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))
TEST_FILES = ("val_data.npz",)
NUM_CLASSES = 1000
TRAIN_IMAGES = 1_281_167  # in the ten train batches (ILSVRC-2012's training set; val_data.npz: 50,000)

# npz format version -> reader of the .npy header (version 3.0 is only for unicode field names)
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _npz_member(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype, int | None]:
    """Shape, dtype and absolute byte offset of array ``key`` inside the npz file ``path``.

    The offset is None when the member cannot be mapped: compressed (np.savez_compressed)
    or Fortran-ordered.
    """
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
        with zf.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version not in _HEADER_READERS:
                raise ValueError(f"unsupported .npy format version {version} for '{key}'")
            shape, fortran, dtype = _HEADER_READERS[version](member)
            header_len = member.tell()
    if info.compress_type != zipfile.ZIP_STORED or fortran:
        return shape, dtype, None
    # A stored member's bytes sit verbatim after its 30-byte local header, whose name and
    # extra-field lengths (bytes 26..30) may differ from the central directory's copy.
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
    return shape, dtype, info.header_offset + 30 + name_len + extra_len + header_len


def open_npz_array(path: Path, key: str) -> np.ndarray:
    """Array ``key`` of an npz file: memory-mapped if stored (np.savez), else read into memory."""
    shape, dtype, offset = _npz_member(path, key)
    if offset is None:
        with np.load(path) as npz:
            return npz[key]
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class DownsampledImageNet(Dataset):
    """The images of some npz batch files as ``(uint8 (3, S, S) tensor, label 0..999)``."""

    def __init__(self, files: list[Path], size: int, name: str) -> None:
        self.files, self.size, self.name = files, size, name
        labels = []
        for file in files:
            try:
                with np.load(file) as npz:
                    file_labels = np.asarray(npz["labels"], dtype=np.int64).reshape(-1) - 1
                shape, dtype, _ = _npz_member(file, "data")
                if shape != (len(file_labels), 3 * size * size) or dtype != np.uint8:
                    raise ValueError(
                        f"'data' is {dtype}{list(shape)}, expected uint8"
                        f"[{len(file_labels)}, {3 * size * size}] for {len(file_labels)} labels"
                    )
            except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
                raise corrupt(name, file, exc) from exc
            labels.append(file_labels)
        self.labels = np.concatenate(labels)
        self.ends = np.cumsum([len(x) for x in labels])  # item i lives in file searchsorted(i)
        self._pixels: list[np.ndarray] | None = None  # opened lazily, once per process

    def __getstate__(self) -> dict:
        # Worker processes reopen the maps themselves rather than receive pickled copies.
        return {**self.__dict__, "_pixels": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._pixels is None:
            self._pixels = [open_npz_array(file, "data") for file in self.files]
        f = int(np.searchsorted(self.ends, i, side="right"))
        row = i - (int(self.ends[f - 1]) if f else 0)
        pixels = np.array(self._pixels[f][row])  # copy out of the read-only map
        return torch.from_numpy(pixels).view(3, self.size, self.size), int(self.labels[i])


def directory(root: str | Path, size: int) -> Path:
    return Path(root).expanduser() / f"imagenet{size}"


def check_files(root: str | Path, size: int) -> None:
    """Raise DatasetNotFoundError unless every npz batch file is present."""
    folder = directory(root, size)
    missing = [f for f in TRAIN_FILES + TEST_FILES if not (folder / f).is_file()]
    if missing:
        raise not_found(
            f"imagenet{size}_chrabaszcz",
            folder.parent,
            folder.name,
            f"{TRAIN_FILES[0]} ... {TRAIN_FILES[-1]} and {TEST_FILES[0]}, unzipped from "
            f"Imagenet{size}_train_npz.zip and Imagenet{size}_val_npz.zip of "
            "image-net.org/download-images (login needed; Chrabaszcz et al. 2017)"
            + (f"; missing {', '.join(missing)}" if len(missing) < 11 else ""),
            can_download=False,
        )


def load(
    root: str | Path, *, size: int, image_size: int, val_size: int | float, split_seed: int
) -> RawSplits:
    """Train (minus the held-out val) and test (the official val set) of ImageNet SxS."""
    check_files(root, size)
    folder = directory(root, size)
    name = f"imagenet{size}_chrabaszcz"
    train = DownsampledImageNet([folder / f for f in TRAIN_FILES], size, name)
    keep, held = holdout(len(train), [held_out_count(val_size, len(train))], split_seed)
    return RawSplits(
        train=IndexedView(train, keep),
        val=IndexedView(train, held),
        test=DownsampledImageNet([folder / f for f in TEST_FILES], size, name),
        geometry=resize_square(size, image_size),
        num_classes=NUM_CLASSES,
    )

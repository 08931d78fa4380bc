"""Train / val / test splits: what every dataset builder returns, and the seeded hold-out.

A builder (torchvision_sets, imagenet_oord, imagenet_chrabaszcz, folder, digits) yields *raw* items
``(image, label)``, image a PIL image or uint8 tensor at the source's native size. The data
module then wraps every split in ``LevelImages`` with that split's pixel pipeline, so the
train and val views of one source can differ (random flip on train only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from flowgen.errors import InvalidValueError

SPLITS = ("train", "val", "test")  # what every data module serves (``eval_dataset(split)``)


@dataclass
class RawSplits:
    """One dataset's three splits plus what the pixel pipeline must know about them."""

    train: Dataset
    val: Dataset
    test: Dataset
    geometry: list  # transforms bringing a native image to image_size x image_size
    num_classes: int | None  # None: the items carry label -1


def held_out_count(size: int | float, n: int, what: str = "val_size") -> int:
    """``size`` as a count of images out of ``n``: an int is a count, a float a fraction."""
    count = round(size * n) if isinstance(size, float) else int(size)
    if not 0 <= count < n:
        raise InvalidValueError(
            f"{what}={size} leaves no training images out of {n}; "
            "use a count below that or a fraction in [0, 1)"
        )
    return count


def holdout(n: int, counts: Sequence[int], seed: int) -> list[np.ndarray]:
    """Split range(n) by one seeded permutation: [rest, first held-out part, second, ...].

    The same (n, counts, seed) always gives the same split, on every machine and rank.
    Each part is sorted so that reads stay in file order (kind to page cache and mmap).
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    parts, start = [], 0
    for count in counts:
        parts.append(perm[start : start + count])
        start += count
    return [np.sort(part) for part in (perm[start:], *parts)]


class IndexedView(Dataset):
    """The items of ``source`` at ``indices`` (like torch's Subset, with a numpy index)."""

    def __init__(self, source: Dataset, indices: np.ndarray) -> None:
        self.source = source
        self.indices = indices  # numpy, not a list: 1.2M Python ints cost ~50 MB per worker

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]


class LevelImages(Dataset):
    """A split as the training code sees it: ``(uint8 (C, H, W) levels, int label or -1)``.

    An item is asked for by index ``i``, or by ``(i, flip)`` from the training sampler, which
    mirrors the image horizontally when ``flip`` is true and the split allows it (``hflip``).
    ``max_items`` keeps only the first that many items (quick runs and tests).
    """

    def __init__(self, source: Dataset, transform: Callable, max_items: int | None = None,
                 hflip: bool = False) -> None:
        self.source = source
        self.transform = transform
        self.hflip = hflip
        self.length = len(source) if max_items is None else min(len(source), max_items)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[torch.Tensor, int]:
        i, flip = key if isinstance(key, tuple) else (key, False)
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a split of {self.length} images")
        image, label = self.source[i]
        x = self.transform(image)
        if flip and self.hflip:
            x = x.flip(-1)  # commutes with the centre crop, resize and quantization before it
        return x, -1 if label is None else int(label)


class WithIndex(Dataset):
    """Evaluation items ``(levels, label, index)``: the index travels with the image, so that its
    dequantization noise can be seeded by it (the same score on 1 or N processes, any batch size)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        x, label = self.dataset[i]
        return x, label, i

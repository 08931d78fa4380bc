"""scikit-learn's 8x8 handwritten digits: the dataset that is always there (no download).

1797 grayscale 8x8 images whose pixels are counts 0..16 (each is a 4x4 block count of a
32x32 bitmap), so K = 17 levels and no bit reduction applies. Labels 0..9.

The set is tiny, so it is split once: ``val_size`` images (297 in configs/data/digits.yaml,
leaving 1500 to train) are held out with ``split_seed``, and the TEST split is the same
images as VAL. A separate test set of ~150 images would make test/bpd too noisy to mean
anything; report digits numbers as validation numbers.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from flowgen.data.splits import IndexedView, RawSplits, held_out_count, holdout
from flowgen.data.transforms import resize_square

NUM_LEVELS = 17  # K: each pixel counts the set bits of a 4x4 block, 0..16
NATIVE_SIZE = 8
NUM_CLASSES = 10
NUM_IMAGES = 1797


class Digits(Dataset):
    """All 1797 digits as ``(uint8 (1, 8, 8) tensor of levels 0..16, label)``."""

    def __init__(self) -> None:
        bunch = load_digits()
        self.images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)
        self.labels = bunch.target.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def load(*, image_size: int, val_size: int | float, split_seed: int) -> RawSplits:
    """Train and val held out of the 1797 digits; test is val (see the module docstring)."""
    digits = Digits()
    keep, held = holdout(len(digits), [held_out_count(val_size, len(digits))], split_seed)
    val = IndexedView(digits, held)
    return RawSplits(
        train=IndexedView(digits, keep),
        val=val,
        test=val,
        geometry=resize_square(NATIVE_SIZE, image_size),
        num_classes=NUM_CLASSES,
    )

"""The typical bpd H of a model's own data (see flowgen.ood), computed once and cached beside the checkpoint.

H is the mean per-image bpd over ``split`` of the run's own data (held-out val by default: a model that
overfits gives its training images a lower bpd than new images of the same data): the whole split, or
``max_images`` of it drawn at random with the evaluation seed (the mean of 5000 images is known to
σ/√5000 = 1.4% of the per-image spread σ of bpd, far finer than the typicality it is compared with).
The images are scored exactly as evaluate.py scores the others (same seed, draws and precision).
The cache ``<checkpoint stem>.typical-<weights>-<split>.json`` keeps the per-image values (the
bootstrap of the batch test needs them) and the key they were computed under: the checkpoint
file's size and modification time, the weights, seed, num_samples, precision and max_images.  A
call under another key recomputes the values and replaces the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from flowgen.build import RestoredRun
from flowgen.cli.errors import UserError
from flowgen.data.splits import WithIndex
from flowgen.evaluation import SplitScore


@dataclass
class TypicalSet:
    """The reference images' per-image bpd, and where they are cached."""

    split: str
    bpd: torch.Tensor  # (N,) float32, one per reference image
    path: Path
    cached: bool  # read from the cache rather than computed by this call

    @property
    def typical_bpd(self) -> float:
        """H = the mean reference bpd (float64), in bits per dimension."""
        return self.bpd.double().mean().item()


def cache_path(run: RestoredRun, split: str) -> Path:
    return run.ckpt.with_name(f"{run.ckpt.stem}.typical-{run.weights}-{split}.json")


def cache_key(run: RestoredRun, split: str, max_images: int | None, num_samples: int, seed: int,
              precision: str) -> dict:
    return {**run.cache_key(), "split": split, "max_images": max_images, "num_samples": num_samples, "seed": seed,
            "precision": precision}


def reference_loader(datamodule, split: str, max_images: int | None, seed: int) -> DataLoader:
    """The split's images (levels, labels, dataset indices), or a seeded random ``max_images`` of them."""
    dataset = WithIndex(datamodule.eval_dataset(split))  # the index seeds the image's noise, as in evaluation
    if len(dataset) == 0:
        raise UserError(f"typicality.split={split}: the run's data has no {split} images; choose another split")
    if max_images is not None and max_images < len(dataset):
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:max_images]
        dataset = Subset(dataset, chosen.sort().values.tolist())
    return DataLoader(dataset, batch_size=datamodule.eval_batch_size, shuffle=False,
                      num_workers=datamodule.num_workers)


def typical_set(run: RestoredRun, split: str, max_images: int | None, *, num_samples: int, seed: int,
                precision: str, make_datamodule: Callable, score: Callable[[str, DataLoader], SplitScore]
                ) -> TypicalSet:
    """The cached reference bpds when their key matches, else ``score`` them and cache them.

    ``make_datamodule()`` builds the run's own data module (only called on a cache miss);
    ``score(description, loader)`` evaluates a loader exactly as the scored split is evaluated.
    """
    path = cache_path(run, split)
    key = cache_key(run, split, max_images, num_samples, seed, precision)
    cached = _read(path, key)
    if cached is not None:
        return TypicalSet(split, cached, path, cached=True)
    datamodule = make_datamodule()
    split_score = score(f"typical set: {datamodule.name}/{split}", reference_loader(datamodule, split, max_images,
                                                                                    seed))
    bpd = split_score.per_image_bpd
    record = {"key": key, "typical_bpd": bpd.double().mean().item(), "num_images": len(bpd), "bpd": bpd.tolist()}
    try:
        path.write_text(json.dumps(record) + "\n")
    except OSError as exc:  # a read-only checkpoint directory: the value is still right, only not kept
        print(f"note: could not cache the typical set in {path} ({exc.strerror})", flush=True)
    return TypicalSet(split, bpd, path, cached=False)


def _read(path: Path, key: dict) -> torch.Tensor | None:
    """The cached per-image bpds if ``path`` holds them under ``key``; a missing or damaged file is a miss."""
    try:
        record = json.loads(path.read_text())
        if record["key"] != key:
            return None
        return torch.tensor(record["bpd"], dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError):
        return None

"""``ImageDataModule``: one LightningDataModule for every dataset flowgen trains on.

Batches are ``(x, y)``: x uint8 (B, C, H, W) of integer levels in {0..K-1}, y int64 (B,)
labels, -1 where the dataset has none. Dequantisation happens later, in the model.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from flowgen.checks import AT_LEAST_ONE, COUNT_OR_FRACTION, NON_NEGATIVE, integer, one_of, require
from flowgen.data import folder
from flowgen.data.registry import dataset
from flowgen.data.registry import num_levels as registry_num_levels
from flowgen.data.sampler import EvaluationShardSampler, ResumableShuffleSampler
from flowgen.data.splits import LevelImages, RawSplits, WithIndex
from flowgen.data.transforms import pixel_pipeline
from flowgen.errors import InvalidValueError


class ImageDataModule(L.LightningDataModule):
    """Train / val / test loaders of integer pixel levels for the dataset ``name``.

    Files are looked for under ``root`` (see configs/data/<name>.yaml for the exact place);
    ``prepare_data`` downloads missing ones when ``download`` is set and torchvision can,
    ``setup`` never touches the network. ``val_size`` (a count, or a fraction of train) is
    held out of train with ``split_seed`` for datasets without an official val split.
    """

    def __init__(
        self,
        *,
        name: str,
        root: str | Path = "data",
        image_size: int = 32,
        channels: int = 3,
        n_bits: int | None = 8,
        num_levels: int | None = None,
        num_classes: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        hflip: bool = False,
        val_size: int | float = 5000,
        split_seed: int = 0,
        download: bool = False,
        path: str | Path | None = None,
        max_items: int | None = None,
    ) -> None:
        super().__init__()
        _validate(
            name=name, image_size=image_size, channels=channels, n_bits=n_bits,
            num_levels=num_levels, batch_size=batch_size, eval_batch_size=eval_batch_size,
            num_workers=num_workers, val_size=val_size, path=path, max_items=max_items,
        )  # fmt: skip
        self.save_hyperparameters(logger=False)
        self.name, self.root, self.path = name, Path(root).expanduser(), path
        self.image_size, self.channels, self.n_bits = image_size, channels, n_bits
        self.record = dataset(name)
        self._num_levels = registry_num_levels(name, n_bits)
        self._num_classes = num_classes
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.hflip, self.val_size, self.split_seed = hflip, val_size, split_seed
        self.download, self.max_items = download, max_items
        self._source_classes: int | None = None  # folder: set by setup()
        self.train_set: Dataset | None = None
        self.train_set_unaugmented: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        # the training order: seeded (train.py sets the run's seed) and resumable inside an epoch
        self.shuffle_seed = 0
        self._resume: dict | None = None

    # ---- what the model needs to know ------------------------------------------------
    @property
    def num_levels(self) -> int:
        """K: pixels are integers in {0..K-1}."""
        return self._num_levels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def num_classes(self) -> int | None:
        """From the config if given, else the dataset's (None: no labels, y = -1)."""
        if self._num_classes is not None:
            return self._num_classes
        if not self.record.needs_path:
            return self.record.num_classes
        self.setup()  # folder: known once the directory has been scanned
        return self._source_classes

    # ---- Lightning hooks -------------------------------------------------------------
    def prepare_data(self) -> None:
        """Rank 0 only: download what is missing (if allowed), or fail early and clearly."""
        self.record.prepare(self.root, self.download)

    def setup(self, stage: str | None = None) -> None:
        """Build all three splits once (every rank; never downloads)."""
        if self.train_set is not None:
            return
        raw = self._load_raw()
        self._source_classes = raw.num_classes

        def wrap(split: Dataset, train: bool) -> LevelImages:
            stores_levels = self.record.fixed_num_levels is not None
            transform = pixel_pipeline(raw.geometry, channels=self.channels,
                                       num_levels=None if stores_levels else self.num_levels)
            return LevelImages(split, transform, self.max_items, hflip=self.hflip and train)

        self.train_set = wrap(raw.train, train=True)
        self.train_set_unaugmented = wrap(raw.train, train=False)
        self.val_set = wrap(raw.val, train=False)
        self.test_set = wrap(raw.test, train=False)

    def _load_raw(self) -> RawSplits:
        return self.record.load(self.root, self.path, image_size=self.image_size, val_size=self.val_size,
                                split_seed=self.split_seed)

    # ---- loaders ---------------------------------------------------------------------
    def _eval_loader(self, dataset: Dataset | None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking ImageDataModule for a dataloader")
        # evaluation sees every image exactly once, in a fixed order; under DDP once over all ranks
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        sampler = EvaluationShardSampler(dataset) if distributed and torch.distributed.get_world_size() > 1 else None
        return DataLoader(
            WithIndex(dataset),  # batches (levels, labels, dataset indices)
            batch_size=self.eval_batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=False,
            # the workers' seed comes from here, not from the global RNG that training draws from
            generator=torch.Generator().manual_seed(0),
            num_workers=self.num_workers,
            # Pinning only helps host-to-GPU copies; without CUDA it only warns.
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("call setup() before asking ImageDataModule for a dataloader")
        sampler = ResumableShuffleSampler(self.train_set, seed=self.shuffle_seed)
        self._apply_resume(sampler)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            # full batches only (ActNorm init and per-batch bpd stay comparable), unless the
            # split is smaller than one batch
            drop_last=len(sampler) > self.batch_size,
            # the workers' seed comes from here, not from the global RNG that the dequantization noise
            # draws from: starting workers (validation, a new epoch) must not shift that stream
            generator=torch.Generator().manual_seed(self.shuffle_seed),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    # ---- mid-epoch resume: where the training order stood, saved in every checkpoint ---------------
    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        epoch, done = trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:  # the epoch is complete: the next one starts afresh
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_done": done, "batch_size": self.batch_size,
                "world_size": trainer.world_size, "shuffle_seed": self.shuffle_seed}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = dict(state_dict) or None

    def _apply_resume(self, sampler: ResumableShuffleSampler) -> None:
        state, self._resume = self._resume, None
        if not state:
            return
        same = (state["batch_size"], state["world_size"], state["shuffle_seed"]) == (
            self.batch_size, sampler.num_replicas, self.shuffle_seed)
        if same:
            sampler.resume(state["epoch"], state["batches_done"] * self.batch_size)
            return
        sampler.set_epoch(state["epoch"])
        rank_zero_warn(
            f"resuming with batch size {self.batch_size} x {sampler.num_replicas} devices (seed {self.shuffle_seed}) "
            f"instead of {state['batch_size']} x {state['world_size']} (seed {state['shuffle_seed']}): the interrupted "
            f"epoch {state['epoch']} restarts its data order from the beginning")

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def eval_dataset(self, split: str) -> Dataset:
        """The images of ``split`` (train, val or test), never augmented."""
        sets = {"train": self.train_set_unaugmented, "val": self.val_set, "test": self.test_set}
        if split not in sets:
            raise InvalidValueError(f"split={split!r} is not a split; choose train, val or test")
        if sets[split] is None:
            raise RuntimeError("call setup() before asking ImageDataModule for a split")
        return sets[split]

    def eval_dataloader(self, split: str) -> DataLoader:
        """Every image of ``split`` exactly once, in order, never augmented: batches (levels, labels, indices)."""
        return self._eval_loader(self.eval_dataset(split))

    def file_names(self, split: str) -> list[str] | None:
        """The file of each image of ``split``, in ``eval_dataloader`` order (data=folder), else None."""
        return folder.image_files(self.eval_dataset(split))

    def images(self, split: str, indices) -> torch.Tensor:
        """The integer images of ``split`` at ``indices``, stacked: uint8 (N, C, H, W)."""
        dataset = self.eval_dataset(split)
        return torch.stack([torch.as_tensor(dataset[i][0]) for i in indices])


def _validate(
    *,
    name: str,
    image_size: int,
    channels: int,
    n_bits: int | None,
    num_levels: int | None,
    batch_size: int,
    eval_batch_size: int | None,
    num_workers: int,
    val_size: int | float,
    path: str | Path | None,
    max_items: int | None,
) -> None:
    """Constructor arguments a user can get wrong, each refused in one line with the fix (the rules of the
    typed schema, ``flowgen.config.schema.DataConfig``, for callers that build the module without a config)."""
    record = dataset(name)
    require("data.image_size", image_size, integer(AT_LEAST_ONE))
    require("data.channels", channels, integer(one_of((1, 3))))
    levels = registry_num_levels(name, n_bits)
    if num_levels is not None and num_levels != levels:
        raise InvalidValueError(f"data.num_levels={num_levels!r} contradicts the {levels} levels of {name} at "
                                f"n_bits={n_bits}; set data.num_levels=null")
    for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("max_items", max_items)):
        if value is not None:
            require(f"data.{key}", value, integer(AT_LEAST_ONE))
    require("data.num_workers", num_workers, integer(NON_NEGATIVE))
    require("data.val_size", val_size, COUNT_OR_FRACTION)
    if record.needs_path and path in (None, ""):
        raise InvalidValueError(f"data={name} needs data.path=<a directory of images>")

"""Datasets as batches of integer pixel levels: ``(x uint8 (B, C, H, W) in {0..K-1}, y)``.

``ImageDataModule(name=...)`` serves every dataset in ``DATASETS``; configs/data/<name>.yaml
says where each one's files must be.
"""

from flowgen.data.datamodule import DATASETS, ImageDataModule
from flowgen.data.errors import DatasetCorruptError, DatasetNotFoundError

__all__ = ["DATASETS", "DatasetCorruptError", "DatasetNotFoundError", "ImageDataModule"]

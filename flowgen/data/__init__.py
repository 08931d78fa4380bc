"""Datasets as batches of integer pixel levels: ``(x uint8 (B, C, H, W) in {0..K-1}, y)``.

``ImageDataModule(name=...)`` serves every dataset of the registry (``flowgen/data/registry.py``: one record
per dataset, and the one rule for K, the number of pixel levels); configs/data/<name>.yaml says where each
one's files must be.

Owns: the datasets' on-disk formats, splits, the pixel pipeline, the samplers, the data module.
May import: torch, torchvision, Lightning, PIL, numpy, scikit-learn, ``flowgen.errors``, ``flowgen.checks``.
"""

from flowgen.data.datamodule import ImageDataModule
from flowgen.data.errors import DatasetCorruptError, DatasetNotFoundError
from flowgen.data.registry import DATASETS, dataset, num_levels

__all__ = ["DATASETS", "DatasetCorruptError", "DatasetNotFoundError", "ImageDataModule", "dataset", "num_levels"]

"""The training order and flips: seeded per epoch, and resumable in the middle of an epoch."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


class ResumableShuffleSampler(DistributedSampler):
    """Epoch e visits the images in the order of ``DistributedSampler`` with ``seed`` (a permutation
    from seed + e, dealt out rank::world_size, the tail dropped so every rank sees as many); a single
    process is the 1-replica case. Lightning leaves a DistributedSampler in place under DDP.

    It yields ``(index, flip)``: whether image ``index`` is mirrored in epoch e is drawn from a
    generator seeded with (seed, e) as well, so every random choice of an epoch's data is a
    function of (seed, epoch, index), whichever process or worker loads the image.

    ``resume(epoch, samples_done)`` makes the next pass start at epoch ``epoch`` after the first
    ``samples_done`` items of this rank's order, so a run stopped inside an epoch continues with
    the very images (and flips) it would have seen; later passes are whole epochs again.
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(dataset, num_replicas=dist.get_world_size() if distributed else 1,
                         rank=dist.get_rank() if distributed else 0, shuffle=True, seed=seed, drop_last=True)
        self._skip = 0

    def resume(self, epoch: int, samples_done: int) -> None:
        self.set_epoch(epoch)
        self._skip = samples_done

    def __iter__(self):
        indices = list(super().__iter__())
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 1)  # not the order's seed
        flips = (torch.rand(len(self.dataset), generator=generator) < 0.5).tolist()
        skip, self._skip = self._skip, 0
        return iter([(i, flips[i]) for i in indices[skip:]])


class EvaluationShardSampler(DistributedSampler):
    """Evaluation under DDP: rank r scores images r, r + W, r + 2W, ... in order, so every image of
    the split is scored exactly once over all ranks. Lightning's default DistributedSampler pads
    the split to a multiple of W by repeating images, which biases an average over images;
    here ranks may simply get one image fewer. (Lightning leaves a DistributedSampler in place.)
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None):
        distributed = dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

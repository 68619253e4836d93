"""A distributed sampler that resumes mid-epoch.

:class:`ResumableDistributedSampler` yields exactly what ``torch.utils.data.DistributedSampler``
yields (same permutation from ``seed + epoch``, same padding to a multiple of the number of
replicas, same ``rank::num_replicas`` shard), and additionally skips the first ``start``
indices of its shard: after :meth:`set_start` with ``steps_done * batch_size``, a resumed run
sees the very batches the interrupted run had not yet seen. ``set_epoch`` resets the start
to 0 (a new epoch begins at its first batch).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableDistributedSampler"]


class ResumableDistributedSampler(Sampler[int]):
    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}")
        self.dataset_len = int(dataset_len)
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        if drop_last and self.dataset_len % num_replicas:
            self.num_samples = math.ceil((self.dataset_len - num_replicas) / num_replicas)
        else:
            self.num_samples = math.ceil(self.dataset_len / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's shard in the current epoch."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.start = int(start)

    def shard(self) -> list[int]:
        """This rank's whole shard of the current epoch (before skipping ``start``)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            indices = list(range(self.dataset_len))
        if not self.drop_last:
            pad = self.total_size - len(indices)
            if pad <= len(indices):
                indices += indices[:pad]
            else:
                indices += (indices * math.ceil(pad / len(indices)))[:pad]
        else:
            indices = indices[: self.total_size]
        return indices[self.rank: self.total_size: self.num_replicas]

    def __iter__(self):
        return iter(self.shard()[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed,
                "num_replicas": self.num_replicas, "rank": self.rank, "dataset_len": self.dataset_len}

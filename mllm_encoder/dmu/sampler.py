"""Batches drawn from one pseudo-label cluster at a time, identical across ranks, resumable by step."""

from dataclasses import dataclass
from typing import Iterator, List, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch of a :class:`ClusterBatchSampler` uses and leaves out (for a stage's ``summary.json``)."""

    batches: int
    samples: int
    clusters_used: int
    clusters_skipped: int
    samples_dropped: int


class ClusterBatchSampler(torch.utils.data.Sampler):
    """Yield this rank's share of global batches that each come from a single cluster.

    Every rank builds the same list of global batches (``batch_size * world_size`` indices from one
    cluster, shuffled by ``seed`` and ``epoch``) and takes its own slice, so at every step all ranks hold
    samples of the same cluster and no sample appears twice in an epoch. With ``drop_last`` (the default,
    as the official ``MCL_batch_sampler_DDP``) a cluster's remainder is dropped, so a cluster smaller than
    one global batch is skipped; without it the last, smaller batch is kept (trimmed to a multiple of
    ``world_size``, at least ``max(2, world_size)`` samples). ``start_step`` skips the first batches, which
    resumes an epoch exactly. One cluster for everything (all labels equal) gives a plain random batch
    sampler; negative labels (samples without features) are never drawn.
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = True,
        start_step: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.epoch, self.drop_last, self.start_step = seed, epoch, drop_last, start_step
        self._global_batches = self._build_global_batches()
        if not self._global_batches:
            largest = int(np.bincount(self.labels[self.labels >= 0]).max(initial=0))
            raise ValueError(
                f"no global batch of {batch_size} x {world_size} fits any cluster (largest cluster: {largest} "
                "samples): lower the batch size or use fewer clusters"
            )

    def _build_global_batches(self) -> List[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        global_size = self.batch_size * self.world_size
        batches = []
        for cluster in np.unique(self.labels[self.labels >= 0]):
            members = rng.permutation(np.flatnonzero(self.labels == cluster))
            for start in range(0, len(members), global_size):
                chunk = members[start : start + global_size]
                if len(chunk) < global_size:
                    keep = len(chunk) // self.world_size * self.world_size
                    if self.drop_last or keep < max(2, self.world_size):
                        continue
                    chunk = chunk[:keep]
                batches.append(chunk)
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def epoch_plan(self) -> EpochPlan:
        """Batches, samples, clusters used and skipped, and samples dropped in the current epoch."""
        drawable = self.labels[self.labels >= 0]
        used = {int(self.labels[batch[0]]) for batch in self._global_batches}
        samples = int(sum(len(batch) for batch in self._global_batches))
        return EpochPlan(
            batches=len(self._global_batches),
            samples=samples,
            clusters_used=len(used),
            clusters_skipped=len(np.unique(drawable)) - len(used),
            samples_dropped=len(drawable) - samples,
        )

    def global_batches(self) -> List[np.ndarray]:
        """All global batches of the epoch (before the rank split), in order."""
        return list(self._global_batches)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Reshuffle for ``epoch``; resume from ``start_step`` within it."""
        self.epoch, self.start_step = epoch, start_step
        self._global_batches = self._build_global_batches()

    def __len__(self) -> int:
        return max(0, len(self._global_batches) - self.start_step)

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self._global_batches[self.start_step :]:
            per_rank = len(batch) // self.world_size
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()

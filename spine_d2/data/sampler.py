"""A training sampler that mixes several datasets at set shares, whatever their sizes.

detectron2 concatenates the datasets of DATASETS.TRAIN, so each one's share of the stream is its
share of the images: 2000 DRR scans would drown 368 real films. Mixing at a set share is what a
sim-to-real study's "mixed loader" arm needs (docs/results-aasce.md, "A mixed loader")."""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch
from detectron2.utils import comm
from torch.utils.data.sampler import Sampler

__all__ = ["MixedDatasetSampler", "dataset_mix"]


def dataset_mix(names: Sequence[str], weights: Sequence[float]) -> list[float]:
    """Check SPINE.TRAIN_DATASET_WEIGHTS against DATASETS.TRAIN; return the shares (sum 1)."""
    names, weights = list(names), list(weights)
    if len(weights) != len(names):
        raise ValueError(
            f"SPINE.TRAIN_DATASET_WEIGHTS has {len(weights)} weights for "
            f"{len(names)} DATASETS.TRAIN entries {names}: give one per dataset"
        )
    ok = all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights)
    if not ok or sum(weights) <= 0:
        raise ValueError(
            f"SPINE.TRAIN_DATASET_WEIGHTS {weights}: weights must be finite, >= 0 and not all 0"
        )
    total = float(sum(weights))
    return [w / total for w in weights]


class MixedDatasetSampler(Sampler):
    """Infinite stream of indices into the concatenation of datasets of ``sizes``: each draw
    picks dataset d with probability ``shares[d]``, then the next image of d's own reshuffled
    epochs, so every image of a dataset is seen once before any is seen twice.

    Sharded by rank like detectron2's TrainingSampler (rank r yields draws r, r + world, ...),
    from one seed shared by all ranks."""

    def __init__(self, sizes: Sequence[int], shares: Sequence[float], seed: Optional[int] = None):
        sizes, shares = [int(s) for s in sizes], [float(s) for s in shares]
        if len(sizes) != len(shares) or not sizes:
            raise ValueError(f"MixedDatasetSampler: {len(sizes)} sizes for {len(shares)} shares")
        if any(s <= 0 for s, w in zip(sizes, shares) if w > 0):
            raise ValueError(f"MixedDatasetSampler: a dataset with a share > 0 is empty: {sizes}")
        self._sizes = sizes
        self._offsets = [0] + list(itertools.accumulate(sizes))[:-1]
        self._shares = torch.tensor(shares, dtype=torch.float64)
        if not (self._shares >= 0).all() or float(self._shares.sum()) <= 0:
            raise ValueError(f"MixedDatasetSampler: shares must be >= 0, not all 0: {shares}")
        self._seed = int(comm.shared_random_seed() if seed is None else seed)
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()

    def __iter__(self):
        yield from itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)

    def _infinite_indices(self):
        g = torch.Generator()
        g.manual_seed(self._seed)
        streams = [self._epochs(size, g) if size > 0 else None for size in self._sizes]
        while True:
            # blocks of draws: one multinomial call per 1024 indices, not per index
            picks = torch.multinomial(self._shares, 1024, replacement=True, generator=g)
            for d in picks.tolist():
                yield self._offsets[d] + next(streams[d])

    @staticmethod
    def _epochs(size: int, g: torch.Generator):
        while True:
            yield from torch.randperm(size, generator=g).tolist()

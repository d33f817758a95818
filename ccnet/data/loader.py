"""Batches from a data set, decoded and augmented in background threads (OpenCV releases the GIL).

The order is a seeded shuffle per epoch and every sample's augmentation has its own seeded generator
(seed, epoch, index), so batches are the same whatever the thread timing, and a resumed run sees the
same data as a straight one. With MPI, each rank takes its own slice of every global batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_batches(
    dataset,
    transform: Callable,
    batch_size: int,
    seed: int,
    start_iter: int = 0,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple]:
    """Endless (images N x C x H x W, labels N x H x W) batches, from global iteration start_iter on.

    batch_size is the global batch; with world_size > 1 this rank gets its slice of it.
    """
    n = len(dataset)
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the data set ({n} samples)")
    local = batch_size // world_size

    def load(item):
        epoch, index = item
        image, label = dataset.read(index)
        return transform(image, label, np.random.default_rng([seed, epoch, index]))

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        it = start_iter
        pending = []

        def submit(iteration):
            epoch, step = divmod(iteration, per_epoch)
            order = epoch_order(n, seed, epoch, shuffle=True)
            chunk = order[step * batch_size : (step + 1) * batch_size][rank * local : (rank + 1) * local]
            return [pool.submit(load, (epoch, int(i))) for i in chunk]

        for ahead in range(2):  # keep two batches in flight
            pending.append(submit(it + ahead))
        while True:
            futures = pending.pop(0)
            pending.append(submit(it + 2))
            samples = [f.result() for f in futures]
            yield np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples])
            it += 1


def eval_samples(
    dataset, transform: Callable, num_workers: int = 2, rank: int = 0, world_size: int = 1
) -> Iterator[tuple]:
    """(index, image C x H x W, label H x W) for every sample of this rank's shard, in order, prefetched."""
    indices = list(range(rank, len(dataset), world_size))

    def load(index):
        image, label = dataset.read(index)
        return index, transform(image), label

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        depth = 2 * max(1, num_workers)  # bounded read-ahead: a large val set never sits in memory at once
        pending = deque()
        for index in indices:
            pending.append(pool.submit(load, index))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

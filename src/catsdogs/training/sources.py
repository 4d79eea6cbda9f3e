"""Batch sources for the loop: in-memory tensors, or images decoded (and augmented) on the fly.

Both yield global batches split across the ranks of a torchrun job, shuffled by the epoch's random
generator so that a resumed epoch draws exactly what the uninterrupted one did.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

import numpy as np
import torch

from catsdogs.preprocessing import PreprocessConfig, preprocess
from catsdogs.training.augment import augment
from catsdogs.training.distributed import Dist
from catsdogs.training.features import Sample, load_image

T = TypeVar("T")


class BatchSource(Protocol):
    """What the loop trains or validates on: labelled batches, this rank's share of each."""

    def __len__(self) -> int: ...

    def batches(
        self, batch_size: int, *, rng: np.random.Generator | None, dist: Dist
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def steps_per_epoch(n: int, batch_size: int, dist: Dist) -> int:
    """How many batches :func:`_batch_indices` yields (a last batch smaller than the world is dropped)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= max(dist.world, 1) else 0)


def _batch_indices(
    n: int, batch_size: int, rng: np.random.Generator | None, dist: Dist
) -> Iterator[np.ndarray]:
    """Global batches (shuffled when ``rng`` is given), each split across ranks."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        batch = order[start : start + batch_size]
        if len(batch) < dist.world:
            return
        yield batch[dist.rank :: dist.world]


class TensorSource:
    """Cached features (or any in-memory tensors) with labels; float16 storage is batched as float32."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        floating = x.dtype if x.dtype in (np.float16, np.float32) else np.float32
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=floating))
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, *, rng: np.random.Generator | None, dist: Dist) -> Iterator[tuple]:
        for index in _batch_indices(len(self), batch_size, rng, dist):
            yield self.x[index].float(), self.y[index]


class ImageSource:
    """Images decoded on the fly; augmented when ``train`` (random draws from the epoch's rng).

    ``prefetch`` batches are decoded ahead in a background thread (see :func:`prefetched`).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        labels: np.ndarray,
        config: PreprocessConfig,
        *,
        train: bool,
        prefetch: int = 0,
    ):
        self.samples, self.labels, self.config, self.train = list(samples), labels, config, train
        self.prefetch = prefetch

    def __len__(self) -> int:
        return len(self.samples)

    def batches(self, batch_size: int, *, rng: np.random.Generator | None, dist: Dist) -> Iterator[tuple]:
        return prefetched(self._decoded(batch_size, rng=rng, dist=dist), self.prefetch)

    def _decoded(self, batch_size: int, *, rng: np.random.Generator | None, dist: Dist) -> Iterator[tuple]:
        for index in _batch_indices(len(self), batch_size, rng, dist):
            arrays = []
            for i in index:
                image = load_image(self.samples[i].path)
                if self.train and rng is not None:
                    image = augment(image, rng)
                arrays.append(preprocess(image, self.config))
            yield torch.from_numpy(np.stack(arrays)), torch.from_numpy(self.labels[index])


_END = object()


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items`` in order, the next ``depth`` of them produced ahead in one background thread.

    Decoding JPEGs (Pillow releases the GIL) then overlaps the model's step: one thread, so the
    items and any random draws they make come in the same order as inline; an exception raised
    while producing an item is raised here, where that item would have been. ``depth`` 0 produces
    them inline.
    """
    if depth <= 0:
        yield from items
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending = deque(pool.submit(next, items, _END) for _ in range(depth))
        while (item := pending.popleft().result()) is not _END:
            pending.append(pool.submit(next, items, _END))
            yield item

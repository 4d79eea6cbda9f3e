"""Dynamic micro-batching in front of ONNX Runtime.

Requests that arrive while a forward pass runs wait in the queue and go together into the next
one (up to ``max_size``; after the first item, at most ``max_wait_s`` more is spent collecting).
Items carry the model they were preprocessed for: a batch never mixes two models, so a hot swap
keeps every answer consistent with the model that produced it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from catsdogs.runtime import single_threaded_blas
from catsdogs.serve.model_store import LoadedModel, Scores

logger = logging.getLogger(__name__)


@dataclass
class _Item:
    model: LoadedModel
    array: np.ndarray
    future: asyncio.Future[Scores]


class MicroBatcher:
    """Collects single images into batches and runs them on a small pool of inference threads."""

    def __init__(
        self,
        *,
        max_size: int,
        max_wait_s: float,
        workers: int,
        observe: Callable[[int, float], None] | None = None,
    ) -> None:
        self.max_size = max(1, max_size)
        self.max_wait_s = max(0.0, max_wait_s)
        self.workers = max(1, workers)
        self._observe = observe
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._pool = ThreadPoolExecutor(
            self.workers, thread_name_prefix="catsdogs-infer", initializer=single_threaded_blas
        )
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(), name=f"batcher-{i}") for i in range(self.workers)]

    async def stop(self) -> None:
        """Finish what is queued, then stop the collectors and the thread pool."""
        while not self._queue.empty():
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pool.shutdown(wait=True)

    async def submit(self, model: LoadedModel, array: np.ndarray) -> Scores:
        """Scores for one preprocessed image (3, H, W)."""
        future: asyncio.Future[Scores] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(model, array, future))
        return await future

    async def _collect(self) -> list[_Item]:
        items = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(items) < self.max_size:
            if not self._queue.empty():
                items.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [item for item in items if not item.future.done()]  # timed-out callers are gone

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            for model, group in _by_model(items):
                try:
                    probs = await loop.run_in_executor(self._pool, self._run, model, group)
                except Exception as exc:  # a failing forward pass fails its batch, not the service
                    logger.exception("inference failed for a batch of %d", len(group))
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                for index, item in enumerate(group):
                    if not item.future.done():
                        item.future.set_result(probs.row(index))

    def _run(self, model: LoadedModel, group: list[_Item]) -> Scores:
        batch = group[0].array[None] if len(group) == 1 else np.stack([item.array for item in group])
        started = time.perf_counter()
        probs = model.run(batch)
        if self._observe:
            self._observe(len(group), time.perf_counter() - started)
        return probs


def _by_model(items: list[_Item]) -> list[tuple[LoadedModel, list[_Item]]]:
    groups: dict[int, tuple[LoadedModel, list[_Item]]] = {}
    for item in items:
        groups.setdefault(id(item.model), (item.model, []))[1].append(item)
    return list(groups.values())

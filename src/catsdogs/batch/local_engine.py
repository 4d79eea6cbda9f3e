"""The default engine: decode threads feeding batched ORT calls, with bounded memory.

At most ``ahead`` chunks of ``batch_size`` images are being decoded while the model runs the
current one, so memory holds a few chunks of arrays whatever the size of the collection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from catsdogs.batch.collection import ImageCollection
from catsdogs.batch.scoring import Prepared, ScoringModel, prepare, score
from catsdogs.runtime import available_cores, single_threaded_blas

#: Chunks decoded ahead of the one the model runs: enough to keep the model busy, no more.
AHEAD = 2


def run_local(
    collection: ImageCollection, model: ScoringModel, *, batch_size: int, workers: int | None = None
) -> Iterator[list[dict[str, Any]]]:
    """Scored rows, one list per chunk, in the collection's order."""
    single_threaded_blas()
    cores = available_cores()
    # Spinning off: idle ORT threads would take CPU from the decode threads between calls.
    session = model.open_session(intra_threads=cores, allow_spinning=False)
    names = collection.names
    chunks = (names[start : start + batch_size] for start in range(0, len(names), batch_size))
    with ThreadPoolExecutor(
        workers or cores, thread_name_prefix="catsdogs-batch", initializer=single_threaded_blas
    ) as pool:

        def submit() -> bool:
            chunk = next(chunks, None)
            if chunk is not None:
                pending.append([pool.submit(prepare, collection, name, model) for name in chunk])
            return chunk is not None

        pending: deque[list[Future[Prepared]]] = deque()
        for _ in range(AHEAD):
            submit()
        while pending:
            futures = pending.popleft()
            submit()
            yield score(session, model, [future.result() for future in futures])

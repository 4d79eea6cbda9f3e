"""The micro-batcher: requests arriving together share one forward pass; models never mix."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from catsdogs.serve.batcher import MicroBatcher
from catsdogs.serve.model_store import Scores


@dataclass
class FakeModel:
    """Stands in for LoadedModel.run: records batch sizes, answers with a per-model constant."""

    offset: float
    batches: list[int] = field(default_factory=list)
    delay_s: float = 0.02

    def run(self, batch: np.ndarray) -> Scores:
        self.batches.append(len(batch))
        time.sleep(self.delay_s)  # a forward pass takes time; arrivals queue meanwhile
        return Scores(batch[:, :, 0, 0] + self.offset, None)


def _item(value: float) -> np.ndarray:
    return np.full((2, 1, 1), value, dtype=np.float32)


async def _submit_all(batcher: MicroBatcher, jobs: list[tuple[FakeModel, float]]) -> list[np.ndarray]:
    """Each job's probabilities row."""
    batcher.start()
    try:
        scores = await asyncio.gather(*(batcher.submit(model, _item(v)) for model, v in jobs))  # type: ignore[arg-type]
        return [row.probabilities for row in scores]
    finally:
        await batcher.stop()


def test_concurrent_requests_share_forward_passes_and_keep_their_order() -> None:
    model = FakeModel(offset=0.0)
    observed: list[int] = []
    batcher = MicroBatcher(max_size=8, max_wait_s=0.005, workers=1, observe=lambda n, s: observed.append(n))
    results = asyncio.run(_submit_all(batcher, [(model, float(i)) for i in range(20)]))
    assert [float(r[0]) for r in results] == [float(i) for i in range(20)]
    assert sum(model.batches) == 20
    assert max(model.batches) == 8  # capped at max_size
    assert len(model.batches) < 20  # and really batched
    assert observed == model.batches


def test_a_batch_never_mixes_two_models() -> None:
    old, new = FakeModel(offset=100.0), FakeModel(offset=200.0)
    batcher = MicroBatcher(max_size=16, max_wait_s=0.005, workers=1)
    jobs = [(old if i % 2 else new, float(i)) for i in range(12)]
    results = asyncio.run(_submit_all(batcher, jobs))
    for (model, value), result in zip(jobs, results, strict=True):
        assert float(result[0]) == value + model.offset
    assert sum(old.batches) == 6 and sum(new.batches) == 6


def test_a_failing_forward_pass_fails_only_its_batch() -> None:
    class Broken(FakeModel):
        def run(self, batch: np.ndarray) -> Scores:
            raise RuntimeError("boom")

    async def scenario() -> tuple[list[object], Scores]:
        batcher = MicroBatcher(max_size=4, max_wait_s=0.0, workers=1)
        batcher.start()
        try:
            broken = await asyncio.gather(
                *(batcher.submit(Broken(offset=0), _item(1)) for _ in range(3)),  # type: ignore[arg-type]
                return_exceptions=True,
            )
            fine = await batcher.submit(FakeModel(offset=1.0), _item(1))  # type: ignore[arg-type]
        finally:
            await batcher.stop()
        return broken, fine

    broken, fine = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) for r in broken)
    assert float(fine.probabilities[0]) == 2.0


def test_default_batch_size_batches_int8_and_many_cores_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from catsdogs.serve import model_store
    from catsdogs.settings import Settings

    monkeypatch.setattr(model_store, "available_cores", lambda: 2)
    assert model_store.batch_size(Settings(batch_max_size=None)) == 1
    assert model_store.batch_size(Settings(batch_max_size=None, serve_int8=True)) == 8
    assert model_store.batch_size(Settings(batch_max_size=1, serve_int8=True)) == 1
    monkeypatch.setattr(model_store, "available_cores", lambda: 16)
    assert model_store.batch_size(Settings(batch_max_size=None)) == 8

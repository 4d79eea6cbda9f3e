"""The same scoring on Ray Data (``--engine ray``, the optional ``.[ray]`` extra).

The file list becomes a Ray dataset; ``map_batches`` runs :class:`ScoreActor`, which opens the ORT
session once per actor and scores each batch with :func:`catsdogs.batch.scoring.score`, the code
of the local engine. Ray is started locally when no cluster is connected: ``num_cpus`` from the
cgroup-aware core count, bound to loopback, no dashboard, no usage statistics.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from catsdogs import CatsdogsError
from catsdogs.batch.collection import ImageCollection
from catsdogs.batch.scoring import ScoringModel, prepare, score
from catsdogs.runtime import available_cores, single_threaded_blas

logger = logging.getLogger(__name__)

MISSING_RAY = "--engine ray needs Ray Data: pip install 'catsdogs[ray]' (or: make setup EXTRAS=ray)"


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise CatsdogsError(MISSING_RAY) from None
    return ray


def start_local(ray: Any) -> bool:
    """Start a local Ray instance unless one is running; whether this call started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=available_cores(),
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
    )
    return True


class ScoreActor:
    """One ORT session per actor, on one core (Ray runs one actor per CPU it was given)."""

    def __init__(self, collection: ImageCollection, model: ScoringModel) -> None:
        self.collection = collection
        self.model = model
        single_threaded_blas()  # the actor's one core belongs to its ORT session
        self.session = model.open_session(intra_threads=1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = [prepare(self.collection, str(name), self.model) for name in batch["path"]]
        rows = score(self.session, self.model, prepared)
        columns: dict[str, Any] = {
            key: [r[key] for r in rows] for key in ("path", "label", "predicted", "error")
        }
        columns["unknown_reason"] = [r["unknown_reason"] or "" for r in rows]
        columns["ood_score"] = [np.nan if r["ood_score"] is None else r["ood_score"] for r in rows]
        for name in self.model.config.class_names:
            columns[f"p_{name}"] = [r["probabilities"].get(name, np.nan) for r in rows]
        return {key: np.asarray(value) for key, value in columns.items()}


def _rows(batch: dict[str, np.ndarray], model: ScoringModel) -> list[dict[str, Any]]:
    """Ray's columns back into the rows of :func:`score`."""
    names = model.config.class_names
    rows = []
    for k, path in enumerate(batch["path"]):
        failed = bool(batch["error"][k])
        probs = {} if failed else {n: float(batch[f"p_{n}"][k]) for n in names}
        ood = float(batch["ood_score"][k])
        rows.append(
            {
                "path": str(path),
                "label": str(batch["label"][k]),
                "predicted": str(batch["predicted"][k]),
                "confidence": None if failed else max(probs.values()),
                "probabilities": probs,
                "ood_score": None if np.isnan(ood) else ood,
                "unknown_reason": str(batch["unknown_reason"][k]) or None,
                "model_version": model.version,
                "error": str(batch["error"][k]),
            }
        )
    return rows


def run_ray(
    collection: ImageCollection, model: ScoringModel, *, batch_size: int, workers: int | None = None
) -> Iterator[list[dict[str, Any]]]:
    """Scored rows in the collection's order, from ``workers`` actors (default: one per Ray CPU)."""
    ray = import_ray()
    started = start_local(ray)
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        actors = workers or max(1, int(ray.available_resources().get("CPU", 1)))
        dataset = ray.data.from_items([{"path": name} for name in collection.names]).map_batches(
            ScoreActor,
            # The actors read by name: the list itself travels only as the dataset's rows.
            fn_constructor_kwargs={"collection": dataclasses.replace(collection, names=[]), "model": model},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
        )
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield _rows(batch, model)
    finally:
        if started:
            ray.shutdown()

"""``predict_batch``: a collection of images scored by a model into one CSV or JSON-lines file."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from catsdogs import CatsdogsError
from catsdogs.batch.collection import ImageCollection
from catsdogs.batch.local_engine import run_local
from catsdogs.batch.output import format_for, open_writer
from catsdogs.batch.scoring import ScoringModel
from catsdogs.registry.model_source import resolve
from catsdogs.settings import Settings

logger = logging.getLogger(__name__)

Engine = Literal["local", "ray"]
ENGINES: tuple[str, ...] = ("local", "ray")


@dataclass
class BatchResult:
    """What a job did: where the rows are, how many images, how many failed, how fast."""

    output: str
    engine: str
    model_uri: str
    model_version: str
    images: int
    failed: int
    seconds: float
    labels: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 2)}


def predict_batch(
    source: Path,
    output: Path,
    *,
    settings: Settings,
    model_uri: str | None = None,
    engine: Engine = "local",
    output_format: str | None = None,
) -> BatchResult:
    """Score every image of ``source`` (a folder tree or zip archive) into ``output``.

    The model comes from ``model_uri`` (default ``settings.model_uri``), resolved as the service
    resolves it. Files that cannot be read or decoded get a row with an ``error``.

    Raises:
        CatsdogsError: unknown engine or format, no image in the source, the model cannot be resolved,
            or Ray is missing for ``engine="ray"``.
    """
    if engine not in ENGINES:
        raise CatsdogsError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    fmt = format_for(output, output_format)
    if engine == "ray":
        from catsdogs.batch.ray_engine import import_ray, run_ray

        import_ray()  # fail before any work when the extra is missing
        runner = run_ray
    else:
        runner = run_local
    resolved = resolve(settings, uri=model_uri)
    bundle = resolved.bundle
    detector = bundle.unknown_detector() if settings.unknown_answers else None
    model = ScoringModel(bundle.root, resolved.version, bundle.preprocessing, detector)
    collection = ImageCollection.open(source)
    labels: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    started = time.perf_counter()
    with open_writer(output, fmt, model.config.class_names) as write:
        for rows in runner(
            collection, model, batch_size=settings.predict_batch_size, workers=settings.predict_workers
        ):
            write(rows)
            labels.update(r["label"] for r in rows if not r["error"])
            errors.update(r["error"].split(":", 1)[0] for r in rows if r["error"])
    seconds = time.perf_counter() - started
    result = BatchResult(
        str(output), engine, resolved.uri, resolved.version, len(collection.names), sum(errors.values()),
        round(seconds, 3), dict(labels), dict(errors),
    )  # fmt: skip
    logger.info("scored %d images (%d failed) in %.1fs (%s)", result.images, result.failed, seconds, engine)
    return result

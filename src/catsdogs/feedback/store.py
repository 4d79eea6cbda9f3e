"""The feedback log: one row per prediction that got a label, shared by every worker and replica.

A UNIQUE nonce makes a replayed prediction id fail its insert, whichever worker, replica or restart
sees it the second time, so the store must be shared too: a SQLite file by default (one machine;
WAL and a busy timeout let the workers write it concurrently), PostgreSQL by URL for several
replicas. The rows are what the rollback guard reads live accuracy from (per model version, across
replicas); the images kept with some of them (only where the operator enabled it, EXIF-stripped,
deleted after the retention period) are what ``catsdogs data ingest --feedback`` turns into training
data. The schema is managed by the alembic migrations in ``migrations/``, run by :meth:`open`.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

from catsdogs.settings import Settings

logger = logging.getLogger(__name__)

SQLITE_FILE = "feedback.sqlite3"
#: alembic's bookkeeping table, named for this schema so a database shared with another alembic
#: user (MLflow's PostgreSQL, say) keeps the two apart.
VERSION_TABLE = "catsdogs_feedback_alembic_version"
MIGRATIONS = "catsdogs.feedback:migrations"
BUSY_TIMEOUT_MS = 5000
#: alembic's ``context`` is one module-level proxy: apps in one process (tests) migrate in turn.
_MIGRATING = threading.Lock()

#: The columns this module writes, typed for binding; the schema itself (constraints, sizes) is the
#: migrations' (feedback_migrations/versions).
feedback_table = sa.table(
    "feedback",
    sa.column("id", sa.Integer()),
    sa.column("nonce", sa.String()),
    sa.column("kid", sa.String()),
    sa.column("model_version", sa.String()),
    sa.column("predicted", sa.String()),
    sa.column("confidence", sa.Float()),
    sa.column("label", sa.String()),
    sa.column("correct", sa.Boolean()),
    sa.column("predicted_at", sa.DateTime(timezone=True)),
    sa.column("received_at", sa.DateTime(timezone=True)),
)
images_table = sa.table(
    "feedback_images",
    sa.column("id", sa.Integer()),
    sa.column("nonce", sa.String()),
    sa.column("label", sa.String()),
    sa.column("sha256", sa.String()),
    sa.column("data", sa.LargeBinary()),
    sa.column("received_at", sa.DateTime(timezone=True)),
)

shadow_table = sa.table(
    "shadow_predictions",
    sa.column("nonce", sa.String()),
    sa.column("champion_version", sa.String()),
    sa.column("champion_label", sa.String()),
    sa.column("challenger_version", sa.String()),
    sa.column("challenger_label", sa.String()),
    sa.column("challenger_confidence", sa.Float()),
    sa.column("created_at", sa.DateTime(timezone=True)),
)


@dataclass(frozen=True)
class ShadowRecord:
    """What the shadow model answered for one live prediction (joined to feedback by ``nonce``)."""

    nonce: str
    champion_version: str
    champion_label: str
    challenger_version: str
    challenger_label: str
    challenger_confidence: float


@dataclass(frozen=True)
class ShadowSummary:
    """A challenger's shadow record: requests it scored, how often it agreed with the champion,
    and, over those that got a feedback label, how often each model was right."""

    shadowed: int
    agreed: int
    labelled: int
    challenger_correct: int
    champion_correct: int

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.shadowed if self.shadowed else None


@dataclass(frozen=True)
class PredictionClaim:
    """What a prediction id says about the prediction it names (``image_sha256``: of the upload,
    only in ids issued while feedback images are kept)."""

    model_version: str
    label: str
    confidence: float
    issued_at: float
    nonce: str
    kid: str
    image_sha256: str | None = None


@dataclass(frozen=True)
class FeedbackImage:
    """A labelled image kept from ``/feedback``: EXIF-stripped JPEG bytes, at most the store size."""

    id: int
    label: str
    sha256: str
    data: bytes
    received_at: datetime


class FeedbackStoreError(RuntimeError):
    """The feedback store cannot be reached or written (not a duplicate: that is a normal answer)."""


def store_url(settings: Settings) -> URL:
    """The configured URL, or the SQLite file in ``cache_dir``; ``postgresql://`` means psycopg 3."""
    if settings.feedback_store_url is None:
        return URL.create("sqlite", database=str(settings.cache_dir / SQLITE_FILE))
    url = make_url(settings.feedback_store_url.get_secret_value())
    if url.drivername == "postgresql":  # SQLAlchemy's default would be psycopg2, which is not installed
        url = url.set(drivername="postgresql+psycopg")
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")  # wait for another worker's write
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
    cursor.close()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Wait for an exclusive lock on ``path`` (released by the kernel if the process dies)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class FeedbackStore:
    """Records feedback once per prediction; built cheaply, connected by :meth:`open`."""

    def __init__(self, url: URL) -> None:
        self.url = url
        self._engine: Engine | None = None
        # An in-memory store is one connection shared by every thread: one transaction at a time on it.
        self._shared_connection = threading.Lock()
        self._in_memory = url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")

    @property
    def sqlite_file(self) -> Path | None:
        """The SQLite database file, if the store is one (``None`` for PostgreSQL and ``sqlite://``)."""
        if self.url.get_backend_name() != "sqlite" or self.url.database in (None, "", ":memory:"):
            return None
        return Path(self.url.database)

    def open(self) -> None:
        """Connect and bring the schema to the latest migration (every worker may do it at once)."""
        try:
            self._engine = self._create_engine()
            self._migrate(self._engine)
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            raise FeedbackStoreError(f"feedback store {self.url!r} is unusable: {exc}") from exc
        logger.info("feedback store ready at %r", self.url)

    def _create_engine(self) -> Engine:
        if self.url.get_backend_name() != "sqlite":
            return sa.create_engine(self.url, pool_pre_ping=True, pool_size=2, max_overflow=8)
        if self.sqlite_file is None:  # in memory: one connection shared by every thread, or each has its own
            return sa.create_engine(
                self.url, poolclass=sa.StaticPool, connect_args={"check_same_thread": False}
            )
        self.sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(self.url)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine

    def _migrate(self, engine: Engine) -> None:
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", MIGRATIONS)
        # PostgreSQL: env.py takes a transaction-level advisory lock; SQLite: a lock file beside it.
        database = self.sqlite_file
        lock = _file_lock(database.with_name(f"{database.name}.migrate.lock")) if database else _no_lock()
        with _MIGRATING, lock, engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def record(
        self,
        claim: PredictionClaim,
        *,
        label: str,
        image: bytes | None = None,
        image_retention: timedelta | None = None,
    ) -> bool:
        """Store the label of this prediction (and ``image``, already stripped, in the same
        transaction); ``False`` if it already had one. Kept images older than ``image_retention``
        are deleted on the way. Blocking: call it from a thread."""
        now = datetime.now(UTC)
        row = {
            "nonce": claim.nonce,
            "kid": claim.kid,
            "model_version": claim.model_version,
            "predicted": claim.label,
            "confidence": claim.confidence,
            "label": label,
            "correct": claim.label == label,
            "predicted_at": datetime.fromtimestamp(claim.issued_at, UTC),
            "received_at": now,
        }
        try:
            with self._transaction() as connection:
                connection.execute(feedback_table.insert().values(**row))
                if image is not None:
                    connection.execute(
                        images_table.insert().values(
                            nonce=claim.nonce,
                            label=label,
                            sha256=hashlib.sha256(image).hexdigest(),
                            data=image,
                            received_at=now,
                        )
                    )
                if image_retention is not None:
                    self._purge(connection, now - image_retention)
        except sa.exc.IntegrityError:
            return False
        except sa.exc.SQLAlchemyError as exc:
            raise FeedbackStoreError(f"cannot write the feedback store: {type(exc).__name__}") from exc
        return True

    @staticmethod
    def _purge(connection: sa.Connection, cutoff: datetime) -> int:
        return connection.execute(images_table.delete().where(images_table.c.received_at < cutoff)).rowcount

    def purge_images(self, *, older_than: timedelta) -> int:
        """Delete kept images received more than ``older_than`` ago; how many went."""
        with self._transaction() as connection:
            return self._purge(connection, datetime.now(UTC) - older_than)

    def images(self, *, after_id: int = 0, batch: int = 256) -> Iterator[FeedbackImage]:
        """Kept images with an id above ``after_id``, oldest first, read ``batch`` rows at a time."""
        columns = [images_table.c[name] for name in ("id", "label", "sha256", "data", "received_at")]
        while True:
            query = (
                sa.select(*columns)
                .where(images_table.c.id > after_id)
                .order_by(images_table.c.id)
                .limit(batch)
            )
            with self._transaction() as connection:
                rows = connection.execute(query).all()
            for row in rows:
                yield FeedbackImage(row.id, row.label, row.sha256, bytes(row.data), _aware(row.received_at))
            if len(rows) < batch:
                return
            after_id = rows[-1].id

    def outcomes(self, model_version: str, *, limit: int, newest: bool) -> list[bool]:
        """Whether each of a version's labelled predictions was right: its first ``limit`` in the
        order the labels arrived, or (``newest``) its latest ``limit``."""
        order = feedback_table.c.id.desc() if newest else feedback_table.c.id.asc()
        query = (
            sa.select(feedback_table.c.correct)
            .where(feedback_table.c.model_version == model_version)
            .order_by(order)
            .limit(limit)
        )
        with self._transaction() as connection:
            return [bool(row.correct) for row in connection.execute(query)]

    def record_shadow(self, record: ShadowRecord) -> None:
        """Keep one shadow prediction (blocking: call it from a thread)."""
        row = {**record.__dict__, "created_at": datetime.now(UTC)}
        try:
            with self._transaction() as connection:
                connection.execute(shadow_table.insert().values(**row))
        except sa.exc.SQLAlchemyError as exc:
            raise FeedbackStoreError(f"cannot write the feedback store: {type(exc).__name__}") from exc

    def shadow_of(self, nonce: str) -> ShadowRecord | None:
        """The shadow prediction of this request, if it was shadowed."""
        columns = [shadow_table.c[name] for name in ShadowRecord.__dataclass_fields__]
        with self._transaction() as connection:
            row = connection.execute(sa.select(*columns).where(shadow_table.c.nonce == nonce)).first()
        return None if row is None else ShadowRecord(*row)

    def shadow_summary(self, challenger_version: str) -> ShadowSummary:
        """Every replica's shadow predictions of ``challenger_version``, with the labels they got."""
        shadow, feedback = shadow_table.c, feedback_table.c
        agreed = sa.case((shadow.challenger_label == shadow.champion_label, 1), else_=0)
        challenger_right = sa.case((shadow.challenger_label == feedback.label, 1), else_=0)
        champion_right = sa.case((shadow.champion_label == feedback.label, 1), else_=0)
        query = (
            sa.select(
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(agreed), 0),
                sa.func.count(feedback.label),
                sa.func.coalesce(sa.func.sum(challenger_right), 0),
                sa.func.coalesce(sa.func.sum(champion_right), 0),
            )
            .select_from(shadow_table.outerjoin(feedback_table, feedback.nonce == shadow.nonce))
            .where(shadow.challenger_version == challenger_version)
        )
        with self._transaction() as connection:
            row = connection.execute(query).one()
        return ShadowSummary(*(int(value) for value in row))

    @contextmanager
    def _transaction(self) -> Iterator[sa.Connection]:
        if self._engine is None:
            raise FeedbackStoreError("the feedback store is not open")
        with (
            self._shared_connection if self._in_memory else nullcontext(),
            self._engine.begin() as connection,
        ):
            yield connection

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


@contextmanager
def _no_lock() -> Iterator[None]:
    yield


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes for what was written in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)

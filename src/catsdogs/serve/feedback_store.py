"""The feedback log: one row per prediction that got a label, shared by every worker and replica.

A UNIQUE nonce makes a replayed prediction id fail its insert, whichever worker, replica or restart
sees it the second time, so the store must be shared too: a SQLite file by default (one machine;
WAL and a busy timeout let the workers write it concurrently), PostgreSQL by URL for several
replicas. The rows are also the labelled feedback that retraining reads later. The schema is
managed by the alembic migrations in ``feedback_migrations/``, run at service start.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

from catsdogs.serve.feedback import PredictionClaim
from catsdogs.settings import Settings

logger = logging.getLogger(__name__)

SQLITE_FILE = "feedback.sqlite3"
#: alembic's bookkeeping table, named for this schema so a database shared with another alembic
#: user (MLflow's PostgreSQL, say) keeps the two apart.
VERSION_TABLE = "catsdogs_feedback_alembic_version"
MIGRATIONS = "catsdogs.serve:feedback_migrations"
BUSY_TIMEOUT_MS = 5000
#: alembic's ``context`` is one module-level proxy: apps in one process (tests) migrate in turn.
_MIGRATING = threading.Lock()

#: The columns this module writes, typed for binding; the schema itself (constraints, sizes) is the
#: migrations' (feedback_migrations/versions).
feedback_table = sa.table(
    "feedback",
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

    def record(self, claim: PredictionClaim, *, label: str) -> bool:
        """Store the label of this prediction; ``False`` if it already had one (blocking: call it
        from a thread)."""
        if self._engine is None:
            raise FeedbackStoreError("the feedback store is not open")
        row = {
            "nonce": claim.nonce,
            "kid": claim.kid,
            "model_version": claim.model_version,
            "predicted": claim.label,
            "confidence": claim.confidence,
            "label": label,
            "correct": claim.label == label,
            "predicted_at": datetime.fromtimestamp(claim.issued_at, UTC),
            "received_at": datetime.now(UTC),
        }
        try:
            shared = self.sqlite_file is None and self.url.get_backend_name() == "sqlite"
            with self._shared_connection if shared else nullcontext(), self._engine.begin() as connection:
                connection.execute(feedback_table.insert().values(**row))
        except sa.exc.IntegrityError:
            return False
        except sa.exc.SQLAlchemyError as exc:
            raise FeedbackStoreError(f"cannot write the feedback store: {type(exc).__name__}") from exc
        return True

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


@contextmanager
def _no_lock() -> Iterator[None]:
    yield

"""Alembic environment of the feedback store: migrate the connection the service hands over."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from catsdogs.feedback.store import VERSION_TABLE

#: pg_advisory_xact_lock key: workers and replicas starting together migrate one at a time.
ADVISORY_LOCK_KEY = 0x6361_7473_646F_6773 & 0x7FFF_FFFF_FFFF_FFFF  # "catsdogs"

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table=VERSION_TABLE)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
    context.run_migrations()

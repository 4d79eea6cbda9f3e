"""Shadow predictions: what the challenger answered for a live request the champion answered.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shadow_predictions",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.Column("champion_version", sa.String(128), nullable=False),
        sa.Column("champion_label", sa.String(64), nullable=False),
        sa.Column("challenger_version", sa.String(128), nullable=False),
        sa.Column("challenger_label", sa.String(64), nullable=False),
        sa.Column("challenger_confidence", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("nonce", name="uq_shadow_predictions_nonce"),
    )
    op.create_index("ix_shadow_predictions_challenger", "shadow_predictions", ["challenger_version"])


def downgrade() -> None:
    op.drop_index("ix_shadow_predictions_challenger", table_name="shadow_predictions")
    op.drop_table("shadow_predictions")

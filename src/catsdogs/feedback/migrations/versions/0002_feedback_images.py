"""Images kept with their feedback label (training data), and live accuracy per model version.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback_images",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("nonce", name="uq_feedback_images_nonce"),
    )
    op.create_index("ix_feedback_images_received_at", "feedback_images", ["received_at"])
    # The rollback guard reads a version's first and latest labels.
    op.create_index("ix_feedback_model_version_id", "feedback", ["model_version", "id"])


def downgrade() -> None:
    op.drop_index("ix_feedback_model_version_id", table_name="feedback")
    op.drop_index("ix_feedback_images_received_at", table_name="feedback_images")
    op.drop_table("feedback_images")

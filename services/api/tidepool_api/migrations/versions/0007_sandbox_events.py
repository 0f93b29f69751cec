"""sandbox events: state changes and notable process endings

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sandbox_event",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("sandbox_id", sa.String(), nullable=False),
        sa.Column("organization_id", sa.String(), nullable=False),
        sa.Column("type", sa.String(), nullable=False),
        sa.Column("dedupe_key", sa.String(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sandbox_id", "dedupe_key", name="uq_sandbox_event_dedupe"),
    )
    op.create_index("ix_sandbox_event_sandbox_time", "sandbox_event", ["sandbox_id", "occurred_at"])


def downgrade() -> None:
    op.drop_index("ix_sandbox_event_sandbox_time", table_name="sandbox_event")
    op.drop_table("sandbox_event")

"""sandbox recoverable flag (an `error` a stop and a start can undo, e.g. an unresponsive toolbox)

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sandbox") as batch:
        batch.add_column(sa.Column("recoverable", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("sandbox") as batch:
        batch.drop_column("recoverable")

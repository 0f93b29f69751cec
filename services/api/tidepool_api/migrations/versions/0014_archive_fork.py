"""sandbox parent_id: the sandbox a fork was made from (a parent with live forks cannot be deleted)

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sandbox") as batch:
        batch.add_column(sa.Column("parent_id", sa.String(), nullable=True))
        batch.create_index("ix_sandbox_parent_id", ["parent_id"])


def downgrade() -> None:
    with op.batch_alter_table("sandbox") as batch:
        batch.drop_index("ix_sandbox_parent_id")
        batch.drop_column("parent_id")

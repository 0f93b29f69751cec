"""sandbox.preview_token: the token of private preview URLs, replaced on every start

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sandbox") as batch:
        batch.add_column(sa.Column("preview_token", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sandbox") as batch:
        batch.drop_column("preview_token")

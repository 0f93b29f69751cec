"""organization.is_admin (the operator's organization, explicit rather than "the oldest") and deleted_at

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("organization") as batch:
        batch.add_column(sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    # An existing installation keeps its admin: until now, admin meant the oldest organization.
    organization = sa.table(
        "organization",
        sa.column("id", sa.String()),
        sa.column("created_at"),
        sa.column("is_admin", sa.Boolean()),
    )
    oldest = sa.select(organization.c.id).order_by(organization.c.created_at).limit(1).scalar_subquery()
    op.execute(organization.update().where(organization.c.id == oldest).values(is_admin=True))


def downgrade() -> None:
    with op.batch_alter_table("organization") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("is_admin")

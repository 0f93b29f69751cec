"""volumes (persistent storage mounted into sandboxes) and each sandbox's volume mounts

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "volume",
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("organization_id", sa.String(), sa.ForeignKey("organization.id"), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("error_reason", sa.String(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_volume_organization_id", "volume", ["organization_id"])
    # A name is unique among the organization's volumes that are not deleted: deletion frees it.
    op.create_index(
        "uq_volume_org_name_live",
        "volume",
        ["organization_id", "name"],
        unique=True,
        postgresql_where=sa.text("state <> 'deleted'"),
        sqlite_where=sa.text("state <> 'deleted'"),
    )
    with op.batch_alter_table("sandbox") as batch:
        batch.add_column(sa.Column("volumes", sa.JSON(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("sandbox") as batch:
        batch.drop_column("volumes")
    op.drop_index("uq_volume_org_name_live", table_name="volume")
    op.drop_index("ix_volume_organization_id", table_name="volume")
    op.drop_table("volume")

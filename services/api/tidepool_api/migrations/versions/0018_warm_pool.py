"""warm_pool: warm pools (wire contract §2.8), sandbox.warm_pool_id (an unclaimed member's pool) and
sandbox.claimed (taken from a pool). The organization owning unclaimed members is made at API start-up.

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "warm_pool",
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("organization_id", sa.String(), sa.ForeignKey("organization.id"), nullable=False),
        sa.Column("snapshot_id", sa.String(), nullable=False),
        sa.Column("snapshot", sa.String(), nullable=False),
        sa.Column("image", sa.String(), nullable=False),
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("pool", sa.Integer(), nullable=False),
        sa.Column("cpu", sa.Integer(), nullable=False),
        sa.Column("memory", sa.Integer(), nullable=False),
        sa.Column("disk", sa.Integer(), nullable=False),
        sa.Column("os_user", sa.String(), nullable=False),
        sa.Column("configured", sa.Boolean(), nullable=False),
        sa.Column("error_reason", sa.String(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("organization_id", "snapshot_id", "target", name="uq_warm_pool"),
    )
    op.create_index("ix_warm_pool_organization_id", "warm_pool", ["organization_id"])
    with op.batch_alter_table("sandbox") as batch:
        batch.add_column(sa.Column("warm_pool_id", sa.String(), nullable=True))
        batch.add_column(sa.Column("claimed", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.create_index("ix_sandbox_warm_pool_id", ["warm_pool_id"])


def downgrade() -> None:
    with op.batch_alter_table("sandbox") as batch:
        batch.drop_index("ix_sandbox_warm_pool_id")
        batch.drop_column("claimed")
        batch.drop_column("warm_pool_id")
    op.drop_index("ix_warm_pool_organization_id", "warm_pool")
    op.drop_table("warm_pool")

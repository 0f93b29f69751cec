"""quotas: per-organization quotas and rate-limit overrides (NULL = the installation's default)

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

COLUMNS = (
    "total_cpu_quota",
    "total_memory_quota",
    "total_disk_quota",
    "snapshot_quota",
    "max_snapshot_size",
    "volume_quota",
    "authenticated_rate_limit",
    "sandbox_create_rate_limit",
    "sandbox_lifecycle_rate_limit",
    "authenticated_rate_limit_ttl_seconds",
    "sandbox_create_rate_limit_ttl_seconds",
    "sandbox_lifecycle_rate_limit_ttl_seconds",
)


def upgrade() -> None:
    with op.batch_alter_table("organization") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("organization") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)

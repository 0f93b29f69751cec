"""api_key.permissions (the key's scopes) and last_used_at.

Keys made before scopes existed keep the full access they had.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# The scopes of 0.226.1 (tidepool_contracts.permissions.ALL_PERMISSIONS at the time of this migration).
ALL_PERMISSIONS = [
    "write:registries",
    "delete:registries",
    "write:snapshots",
    "delete:snapshots",
    "write:sandboxes",
    "delete:sandboxes",
    "read:volumes",
    "write:volumes",
    "delete:volumes",
    "write:regions",
    "delete:regions",
    "read:runners",
    "write:runners",
    "delete:runners",
    "read:audit_logs",
]


def upgrade() -> None:
    with op.batch_alter_table("api_key") as batch:
        batch.add_column(sa.Column("permissions", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
    api_key = sa.table("api_key", sa.column("permissions", sa.JSON()))
    op.execute(api_key.update().values(permissions=ALL_PERMISSIONS))


def downgrade() -> None:
    with op.batch_alter_table("api_key") as batch:
        batch.drop_column("last_used_at")
        batch.drop_column("permissions")

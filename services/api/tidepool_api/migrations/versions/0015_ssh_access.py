"""ssh_access: SSH access tokens of sandboxes (only their SHA-256)

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ssh_access",
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("sandbox_id", sa.String(), sa.ForeignKey("sandbox.id"), nullable=False),
        sa.Column("token_hash", sa.String(), nullable=False, unique=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_ssh_access_sandbox_id", "ssh_access", ["sandbox_id"])


def downgrade() -> None:
    op.drop_index("ix_ssh_access_sandbox_id", "ssh_access")
    op.drop_table("ssh_access")

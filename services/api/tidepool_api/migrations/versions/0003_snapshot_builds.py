"""snapshot builds: refs, build info, entrypoints; sandboxes waiting on a build

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("snapshot") as batch:
        batch.add_column(sa.Column("ref", sa.String(), nullable=True))
        batch.add_column(sa.Column("hidden", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("dockerfile", sa.String(), nullable=True))
        batch.add_column(sa.Column("context_hashes", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("entrypoint", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_snapshot_ref", ["ref"])
    op.execute("UPDATE snapshot SET ref = image_name WHERE ref IS NULL")
    with op.batch_alter_table("sandbox") as batch:
        batch.add_column(sa.Column("build_ref", sa.String(), nullable=True))
        batch.create_index("ix_sandbox_build_ref", ["build_ref"])


def downgrade() -> None:
    with op.batch_alter_table("sandbox") as batch:
        batch.drop_index("ix_sandbox_build_ref")
        batch.drop_column("build_ref")
    with op.batch_alter_table("snapshot") as batch:
        batch.drop_index("ix_snapshot_ref")
        for column in (
            "last_used_at",
            "size_bytes",
            "entrypoint",
            "context_hashes",
            "dockerfile",
            "hidden",
            "ref",
        ):
            batch.drop_column(column)

"""organizations' private registries (passwords encrypted at rest)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "docker_registry",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("organization_id", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("url", sa.String(), nullable=False),
        sa.Column("username", sa.String(), nullable=False),
        sa.Column("password_sealed", sa.String(), nullable=False),
        sa.Column("project", sa.String(), nullable=False),
        sa.Column("registry_type", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["organization_id"], ["organization.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("organization_id", "name", name="uq_registry_org_name"),
    )
    op.create_index("ix_docker_registry_organization_id", "docker_registry", ["organization_id"])


def downgrade() -> None:
    op.drop_index("ix_docker_registry_organization_id", table_name="docker_registry")
    op.drop_table("docker_registry")

"""organization_otel: an organization's OTLP destination (endpoint, sealed headers)

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("organization") as batch:
        batch.add_column(sa.Column("otel_endpoint", sa.String(), nullable=True))
        batch.add_column(sa.Column("otel_headers_sealed", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("organization") as batch:
        batch.drop_column("otel_headers_sealed")
        batch.drop_column("otel_endpoint")

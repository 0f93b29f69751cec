"""network_policy: a sandbox's egress allow lists (IPv4 CIDRs and domains, comma-separated as given)

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sandbox") as batch:
        batch.add_column(sa.Column("network_allow_list", sa.String(), nullable=True))
        batch.add_column(sa.Column("domain_allow_list", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sandbox") as batch:
        batch.drop_column("domain_allow_list")
        batch.drop_column("network_allow_list")

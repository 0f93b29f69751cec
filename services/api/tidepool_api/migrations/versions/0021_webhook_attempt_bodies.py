"""webhook_attempt_bodies: the delivery log no longer keeps a receiver's answer (it could hold what an
internal address answered, shown to the tenant): attempts logged before keep their status code only.

Revision ID: 0021
Revises: 0020
"""

from __future__ import annotations

from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # `HTTP <code>: <first 500 bytes of the body>` was the error of an answered, failed attempt.
    op.execute(
        "UPDATE webhook_attempt SET error = 'HTTP ' || CAST(status_code AS VARCHAR) "
        "WHERE status_code IS NOT NULL AND error IS NOT NULL"
    )


def downgrade() -> None:
    pass  # the bodies are gone

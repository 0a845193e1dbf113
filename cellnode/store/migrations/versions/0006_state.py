"""state: what a request may leave behind in an instance (isolated, persistent, fork)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("state", sa.String(length=16), nullable=False, server_default="isolated"))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("state")

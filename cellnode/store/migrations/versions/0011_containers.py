"""container ("docker") nodes, and custom kernel images for cell nodes

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        # A docker node's image, endpoint, health check and telemetry; a cell node's kernel image; else NULL.
        batch.add_column(sa.Column("container", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("container")

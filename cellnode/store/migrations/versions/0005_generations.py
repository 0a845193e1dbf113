"""generations: rolling updates replace instances of an older generation

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("generation", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("maintenance_limit", sa.Integer(), nullable=False, server_default="1"))
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("generation", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("generation")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("maintenance_limit")
        batch.drop_column("generation")

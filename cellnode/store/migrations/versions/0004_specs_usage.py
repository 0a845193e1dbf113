"""specs and usage: a node's instance spec, and each instance's uptime for accounting

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("spec", sa.String(length=32), nullable=False, server_default="c1.4"))
    op.create_table(
        "usage",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("instance_id", sa.String(length=20), nullable=False),
        sa.Column("node_id", sa.String(length=20), nullable=False),
        sa.Column("folder_id", sa.String(length=20), nullable=False),
        sa.Column("spec", sa.String(length=32), nullable=False),
        sa.Column("units_per_second", sa.Float(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("folder_id", "instance_id", "node_id"):
        op.create_index(op.f(f"ix_usage_{column}"), "usage", [column], unique=False)


def downgrade() -> None:
    for column in ("folder_id", "instance_id", "node_id"):
        op.drop_index(op.f(f"ix_usage_{column}"), table_name="usage")
    op.drop_table("usage")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("spec")

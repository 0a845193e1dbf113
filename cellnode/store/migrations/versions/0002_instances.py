"""instances: desired count and queue size on nodes, observed instance state

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("instance_count", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("max_queue", sa.Integer(), nullable=False, server_default="64"))
    op.create_table(
        "instances",
        sa.Column("id", sa.String(length=20), nullable=False),
        sa.Column("node_id", sa.String(length=20), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_since", sa.DateTime(), nullable=False),
        sa.Column("restarts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_instances_node_id"), "instances", ["node_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_instances_node_id"), table_name="instances")
    op.drop_table("instances")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("max_queue")
        batch.drop_column("instance_count")

"""Aliases: routing names that spread requests over nodes, with shadow copies and automatic rollback

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "aliases",
        sa.Column("id", sa.String(20), primary_key=True),
        sa.Column("folder_id", sa.String(20), sa.ForeignKey("folders.id"), nullable=False, index=True),
        sa.Column("prefix", sa.String(63), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("nodes", sa.JSON(), nullable=False),
        sa.Column("mirrors", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("public", sa.Boolean(), nullable=False),
        sa.Column("acl", sa.JSON(), nullable=False),
        sa.Column("rollback_error_rate", sa.Float(), nullable=True),
        sa.Column("rollback_window", sa.Float(), nullable=True),
        sa.Column("rollback_min_requests", sa.Integer(), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("prefix", "name"),
    )


def downgrade() -> None:
    op.drop_table("aliases")

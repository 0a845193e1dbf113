"""IAM: server admins and descriptions on principals, binding times, secrets (and which nodes use them), the audit log

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("principals") as batch:
        batch.add_column(sa.Column("description", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("server_admin", sa.Boolean(), nullable=False, server_default="0"))
    # The account made at first start manages the server.
    principals = sa.table(
        "principals",
        sa.column("server_admin", sa.Boolean()),
        sa.column("kind", sa.String()),
        sa.column("name", sa.String()),
    )
    op.execute(
        principals.update()
        .where(principals.c.kind == "serviceAccount", principals.c.name == "admin")
        .values(server_admin=True)
    )
    with op.batch_alter_table("access_bindings") as batch:
        batch.add_column(sa.Column("created_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("secrets", sa.JSON(), nullable=True))
    op.execute("UPDATE nodes SET secrets = '[]'")
    with op.batch_alter_table("nodes") as batch:
        batch.alter_column("secrets", existing_type=sa.JSON(), nullable=False)
    op.create_table(
        "secrets",
        sa.Column("id", sa.String(20), primary_key=True),
        sa.Column("folder_id", sa.String(20), sa.ForeignKey("folders.id"), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("nonce", sa.LargeBinary(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("folder_id", "name"),
    )
    op.create_index("ix_secrets_folder_id", "secrets", ["folder_id"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("principal_id", sa.String(20), nullable=True),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("resource", sa.String(255), nullable=False),
        sa.Column("folder_id", sa.String(20), nullable=True),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("code", sa.Integer(), nullable=False),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(32), nullable=False),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_folder_id", "audit_events", ["folder_id"])


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_table("secrets")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("secrets")
    with op.batch_alter_table("access_bindings") as batch:
        batch.drop_column("created_at")
    with op.batch_alter_table("principals") as batch:
        batch.drop_column("server_admin")
        batch.drop_column("description")

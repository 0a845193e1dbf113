"""min/max instances (autoscaling) and zones on nodes; the zone of each instance

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("min_instances", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("max_instances", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("zones", sa.JSON(), nullable=True))
    # A node made before autoscaling runs its fixed count: min = max = count.
    op.execute("UPDATE nodes SET min_instances = instance_count, max_instances = instance_count")
    op.execute("""UPDATE nodes SET zones = '[{"zone": "local", "subnet": ""}]'""")
    with op.batch_alter_table("nodes") as batch:
        batch.alter_column("zones", existing_type=sa.JSON(), nullable=False)
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("zone", sa.String(63), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("zone")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("zones")
        batch.drop_column("max_instances")
        batch.drop_column("min_instances")

"""recovery: the cause of a failed attempt (job or infrastructure) and a ticket's infrastructure failures

Revision ID: 0003_recovery
Revises: 0002
Create Date: 2026-12-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0003_recovery"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cause", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=True))
    # Every failure recorded before this revision replays as the job's own (the event's default).
    op.execute("UPDATE jobs SET cause = 'job' WHERE state = 'failed'")
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("infra_failures", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_column("infra_failures")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("cause")

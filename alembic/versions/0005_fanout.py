"""fanout: tasks.parent (a subtask's step) and the step_checks table (probes and expectations)

Revision ID: 0005_fanout
Revises: 0004_console
Create Date: 2026-11-27 19:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0005_fanout"
down_revision: str | None = "0004_console"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True))
    op.create_table(
        "step_checks",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("ticket", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("task", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("phase", sqlmodel.sql.sqltypes.AutoString(length=10), nullable=False),
        sa.Column("expected", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("observed", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("retryable", sa.Boolean(), nullable=False),
        sa.Column("evaluated_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("step_checks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_step_checks_ticket"), ["ticket"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("step_checks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_step_checks_ticket"))
    op.drop_table("step_checks")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("parent")

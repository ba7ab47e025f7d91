"""evalsuite: the evaluations table (the standing evaluation suite's rows per core version and candidate)

Revision ID: 0010_evalsuite
Revises: 0009_matrix
Create Date: 2026-11-27 23:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0010_evalsuite"
down_revision: str | None = "0009_matrix"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("subject", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("component", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("metric", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("core_version", sa.Integer(), nullable=True),
        sa.Column("proposal", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
        sa.Column("yardstick", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("checkpoint", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("ticket", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("evaluated_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("subject", "component", "metric"),
    )
    op.create_index(op.f("ix_evaluations_core_version"), "evaluations", ["core_version"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_evaluations_core_version"), table_name="evaluations")
    op.drop_table("evaluations")

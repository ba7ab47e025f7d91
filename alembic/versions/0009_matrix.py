"""matrix: the sweeps table (one row per combination of a joined `matrix:` step)

Revision ID: 0009_matrix
Revises: 0008_scale
Create Date: 2026-11-27 21:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0009_matrix"
down_revision: str | None = "0008_scale"  # on top of main at branch time (the lead may re-chain)
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("ticket", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("task", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("subtask", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("best", sa.Boolean(), nullable=False),
        sa.Column("joined_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("ticket", "task", "subtask"),
    )


def downgrade() -> None:
    op.drop_table("sweeps")

"""adapters: working memory as a projection (AdapterActivated / AdapterRetired)

Revision ID: 0006_adapters
Revises: 0005_fanout
Create Date: 2026-11-27 19:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0006_adapters'
down_revision: str | None = '0005_fanout'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('adapters',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=120), nullable=False),
    sa.Column('ticket', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
    sa.Column('task', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
    sa.Column('component', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('base_core_version', sa.Integer(), nullable=False),
    sa.Column('core_checkpoint', sqlmodel.sql.sqltypes.AutoString(length=80), nullable=True),
    sa.Column('artifact', sqlmodel.sql.sqltypes.AutoString(length=80), nullable=True),
    sa.Column('rank', sa.Integer(), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('activated_at', sa.DateTime(), nullable=True),
    sa.Column('retired_at', sa.DateTime(), nullable=True),
    sa.Column('retired_reason', sqlmodel.sql.sqltypes.AutoString(length=20), nullable=True),
    sa.Column('retired_detail', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('replaced_by', sqlmodel.sql.sqltypes.AutoString(length=120), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapters_active'), ['active'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapters_ticket'), ['ticket'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapters_ticket'))
        batch_op.drop_index(batch_op.f('ix_adapters_active'))
    op.drop_table('adapters')

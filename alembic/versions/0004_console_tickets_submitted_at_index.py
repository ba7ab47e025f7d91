"""tickets.submitted_at indexes (the console's newest-first pages, all or of one state)

Revision ID: 0004_console
Revises: 0003_recovery
Create Date: 2026-11-27 17:15:00
"""

from collections.abc import Sequence

from alembic import op


revision: str = '0004_console'
down_revision: str | None = '0003_recovery'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('tickets', schema=None) as batch_op:
        batch_op.create_index('ix_tickets_submitted_at_id', ['submitted_at', 'id'], unique=False)
        batch_op.create_index('ix_tickets_state_submitted_at_id', ['state', 'submitted_at', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('tickets', schema=None) as batch_op:
        batch_op.drop_index('ix_tickets_state_submitted_at_id')
        batch_op.drop_index('ix_tickets_submitted_at_id')

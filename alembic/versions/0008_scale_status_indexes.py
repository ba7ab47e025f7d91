"""tickets indexes for `jbctl status` at 100,000 tickets (live or recently ended; awaiting a proposal)

Revision ID: 0008_scale
Revises: 0007_sched
Create Date: 2026-11-27 20:00:00
"""

from collections.abc import Sequence

from alembic import op


revision: str = "0008_scale"
down_revision: str | None = "0007_sched"  # on top of main at rebase time (the lead may re-chain)
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.create_index("ix_tickets_ended_at_submitted_at_id", ["ended_at", "submitted_at", "id"], unique=False)
        batch_op.create_index("ix_tickets_state_awaiting", ["state", "awaiting"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_index("ix_tickets_state_awaiting")
        batch_op.drop_index("ix_tickets_ended_at_submitted_at_id")

"""peers: drop ix_events_stream, which uq_events_stream_version (stream, version) already covers

Every event insert updated both indexes; the unique index answers `WHERE stream = ?` and the
append path's `max(version) ... WHERE stream = ?` (a covering search) on SQLite and PostgreSQL
alike. One B-tree fewer per event: less CPU and one WAL page fewer per commit (docs/BENCHMARKS.md).

Revision ID: 0010_peers
Revises: 0009_matrix
Create Date: 2026-11-27 23:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010_peers"
down_revision: str | None = "0009_matrix"  # on top of main at branch time (the lead may re-chain)
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_events_stream", table_name="events")


def downgrade() -> None:
    op.create_index("ix_events_stream", "events", ["stream"], unique=False)

"""peers: leaner event log indexes. Drop ix_events_stream, which uq_events_stream_version
(stream, version) already covers; on SQLite, make `seq` the table's rowid (INTEGER PRIMARY KEY).

Every appended event updated five B-trees on SQLite: the table, its `seq` primary-key index, the
(stream, version) unique index, and the stream and type indexes. The unique index answers
`WHERE stream = ?` and the append path's `max(version) ... WHERE stream = ?` (a covering search) on
both dialects, and a rowid `seq` is the table's own key, so three remain: about 15% less CPU per
batched append and fewer WAL pages per commit (docs/BENCHMARKS.md). PostgreSQL keeps BIGINT.

The SQLite step copies the log into a new table once: 3.4 s for 300,000 events (129 MB) here,
about 11 s per million, more with larger rows.

Revision ID: 0011_peers
Revises: 0010_evalsuite
Create Date: 2026-11-27 23:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011_peers"
down_revision: str | None = "0010_evalsuite"  # on top of main at branch time (the lead may re-chain)
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = "seq, stream, version, type, data, meta, recorded_at, hash"


def _rebuild_sqlite(seq_type: str) -> None:
    """Copy the log into a table whose `seq` is declared `seq_type` (INTEGER: the rowid). Views and
    triggers (the `timeline` view reads `events`) are dropped first and recreated as they were."""
    dependents = (
        op.get_bind()
        .exec_driver_sql(
            "SELECT type, name, sql FROM sqlite_master WHERE type IN ('view', 'trigger') AND sql IS NOT NULL"
        )
        .all()
    )
    for kind, name, _sql in dependents:
        op.execute(f'DROP {kind.upper()} "{name}"')
    op.execute(
        f"""CREATE TABLE events_new (
        seq {seq_type} NOT NULL,
        stream VARCHAR(200) NOT NULL,
        version INTEGER NOT NULL,
        type VARCHAR(100) NOT NULL,
        data JSON NOT NULL,
        meta JSON NOT NULL,
        recorded_at DATETIME NOT NULL,
        hash VARCHAR(64) NOT NULL,
        PRIMARY KEY (seq),
        CONSTRAINT uq_events_stream_version UNIQUE (stream, version)
        )"""
    )
    op.execute(f"INSERT INTO events_new ({COLUMNS}) SELECT {COLUMNS} FROM events ORDER BY seq")
    op.execute("DROP TABLE events")
    op.execute("ALTER TABLE events_new RENAME TO events")
    op.execute("CREATE INDEX ix_events_type ON events (type)")
    for kind, _name, sql in sorted(dependents, key=lambda d: d[0] != "view"):  # views before triggers
        op.execute(sql)


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite("INTEGER")  # without ix_events_stream
    else:
        op.drop_index("ix_events_stream", table_name="events")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite("BIGINT")
    op.create_index("ix_events_stream", "events", ["stream"], unique=False)

"""Migrations: upgrade, downgrade, upgrade again; and the models agree with the migrations."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from schema import migrations
from schema.tables import VIEWS, metadata


def test_upgrade_downgrade_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrations.upgrade(url)
    assert migrations.current(url) == migrations.head_revision()
    engine = sa.create_engine(url)
    names = set(sa.inspect(engine).get_table_names())
    assert {
        "events",
        "event_head",
        "checkpoints",
        "tickets",
        "tasks",
        "jobs",
        "proposals",
        "artifacts",
        "metrics",
    } <= names
    assert set(VIEWS) <= set(sa.inspect(engine).get_view_names())
    migrations.downgrade(url, "base")
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    migrations.upgrade(url)
    assert migrations.current(url) == migrations.head_revision()
    engine.dispose()


def test_models_and_migrations_agree(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrations.upgrade(url)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata())
    engine.dispose()
    assert diff == [], f"autogenerate found differences; write a migration: {diff}"


def test_0011_keeps_the_log_and_makes_seq_the_rowid(tmp_path: Path) -> None:
    """0011_peers copies the SQLite log into a table keyed by its rowid: every row, the chain and the
    `timeline` view survive the upgrade and the downgrade."""
    from datetime import UTC, datetime

    from schema import events as ev
    from schema.store import EventStore

    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrations.upgrade(url, "0010_evalsuite")
    store = EventStore(url)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    for n in range(5):
        store.append([ev.TicketCancelled(at=at, ticket=f"TICKET-{n}", reason="r")] * 3, meta={"n": n})
    before = list(store.read(0))
    store.close()

    def shape() -> tuple[str, set[str]]:
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'events'").scalar_one()
            idx = {r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE tbl_name = 'events'")}
            assert conn.exec_driver_sql("SELECT count(*) FROM timeline").scalar_one() == 15
        engine.dispose()
        return sql, idx

    for revision, seq_type, stream_index in (("head", "INTEGER", False), ("0010_evalsuite", "BIGINT", True)):
        (migrations.upgrade if revision == "head" else migrations.downgrade)(url, revision)
        sql, idx = shape()
        assert f"seq {seq_type} NOT NULL" in sql and ("ix_events_stream" in idx) is stream_index
        store = EventStore(url)
        assert list(store.read(0)) == before and store.verify() == (15, None, "ok")
        store.close()
